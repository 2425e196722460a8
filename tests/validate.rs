//! `nixgold validate` on the example fleets and on the broken-fleet corpus
//! in `tests/fleets/broken/`, where each file states the errors it must
//! produce in `# expect:` lines.

mod common;

use common::{example_fleets, nixgold, repo, run};

#[test]
fn example_fleets_are_valid() {
    for fleet in example_fleets() {
        let lock = tempfile::tempdir().unwrap();
        let (code, stdout, stderr) = run(nixgold(&repo())
            .arg("validate")
            .arg(&fleet)
            .arg("--lock")
            .arg(lock.path().join("nixgold.lock")));
        assert_eq!(code, 0, "{}: {stderr}", fleet.display());
        assert!(stdout.contains("is valid"), "{stdout}");
    }
}

#[test]
fn every_broken_fleet_fails_with_its_expected_errors() {
    let dir = repo().join("tests/fleets/broken");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 15, "the corpus has {} fleets", files.len());
    let lock = tempfile::tempdir().unwrap();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(!expected.is_empty(), "{name} has no `# expect:` line");
        let (code, stdout, stderr) = run(nixgold(&dir)
            .args(["validate", &name, "--lock"])
            .arg(lock.path().join("nixgold.lock")));
        assert_eq!(code, 1, "{name} must fail; stdout: {stdout}");
        for line in &expected {
            assert!(
                stderr.contains(line),
                "{name}: expected {line:?} in:\n{stderr}"
            );
        }
        // The first expectation names the file and field; it is the first
        // error printed.
        assert!(
            stderr.starts_with(&format!("error: {}", expected[0])),
            "{name}: first error is not {:?}:\n{stderr}",
            expected[0]
        );
    }
}

/// Inline, where a variable name belongs, or in a malformed reference: the
/// secret is in neither the error nor (with -v) Nickel's snippet.
#[test]
fn secrets_written_in_the_wrong_place_never_appear_in_the_error() {
    let dir = repo().join("tests/fleets/broken");
    for (file, secret) in [
        ("secret-inline.yaml", "8d6f0e3c"),
        ("password-inline.ncl", "hunter2-very-secret"),
        ("secret-as-env-name.yaml", "5e3b9f2a"),
        ("secret-malformed-ref.yaml", "b4ttery"),
    ] {
        for verbose in [&[][..], &["-v"], &["-vvv", "--json"]] {
            let (code, stdout, stderr) = run(nixgold(&dir).arg("validate").arg(file).args(verbose));
            assert_eq!(code, 1, "{file}");
            assert!(
                !stderr.contains(secret) && !stdout.contains(secret),
                "{file} {verbose:?} leaks its secret:\n{stdout}{stderr}"
            );
        }
    }
}

/// A reference whose variable name does not look like one (the secret
/// itself, most likely) and is not set: the error does not show it.
#[test]
fn an_unset_variable_that_looks_like_a_secret_is_not_named() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = "fleet: homelab\nproxmox:\n  endpoint: https://127.0.0.1:1\n  nodes: [pve]\n  token: { env: Sup3rS3cretValu3x9 }\nisos: {}\nimages: {}\nvms: {}\n";
    std::fs::write(dir.path().join("fleet.yaml"), fleet).unwrap();
    for verbose in [&[][..], &["-vv"]] {
        let (code, stdout, stderr) = run(nixgold(dir.path())
            .env_remove("PROXMOX_VE_API_TOKEN")
            .args(["plan", "fleet.yaml"])
            .args(verbose));
        assert_eq!(code, 1);
        let text = format!("{stdout}{stderr}");
        assert!(!text.contains("Sup3rS3cretValu3x9"), "{text}");
        assert!(
            text.contains(
                "proxmox.token: the environment variable it names is not set (the name is not shown"
            ),
            "{text}"
        );
    }
    // A conventional name is named, so the user knows what to export.
    let path = dir.path().join("fleet.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("Sup3rS3cretValu3x9", "PVE_TOKEN")).unwrap();
    let (code, _, stderr) = run(nixgold(dir.path())
        .env_remove("PROXMOX_VE_API_TOKEN")
        .env_remove("PVE_TOKEN")
        .args(["plan", "fleet.yaml"]));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("proxmox.token: environment variable PVE_TOKEN is not set"),
        "{stderr}"
    );
}

#[test]
fn json_output_lists_problems_as_data() {
    let dir = repo().join("tests/fleets/broken");
    let (code, stdout, _) =
        run(nixgold(&dir).args(["--json", "validate", "several-problems.yaml"]));
    assert_eq!(code, 1);
    let value: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(value["ok"], false);
    let fields: Vec<&str> = value["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["vms.a.image", "vms.b.disk", "vms.c.network.gateway"]
    );
}

#[test]
fn fleet_comes_from_the_flag_or_the_environment() {
    let lock = tempfile::tempdir().unwrap();
    let lock = lock.path().join("nixgold.lock");
    let (code, _, _) = run(nixgold(&repo())
        .args(["validate", "--fleet", "fleets/example.yaml", "--lock"])
        .arg(&lock));
    assert_eq!(code, 0);
    let (code, _, _) = run(nixgold(&repo())
        .env("NIXGOLD_FLEET", "fleets/example.yaml")
        .args(["validate", "--lock"])
        .arg(&lock));
    assert_eq!(code, 0);
    let (code, _, stderr) = run(nixgold(&repo()).arg("validate"));
    assert_eq!(code, 1);
    assert!(stderr.contains("no fleet file given"), "{stderr}");
}

#[test]
fn insecure_tls_with_the_opt_in_validates_but_warns() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        std::fs::read_to_string(repo().join("tests/fleets/broken/insecure-without-opt-in.yaml"))
            .unwrap()
            .replace(
                "tls: { insecure: true }",
                "tls: { insecure: true, allow_insecure: true }",
            );
    std::fs::write(dir.path().join("fleet.yaml"), text).unwrap();
    let (code, _, stderr) = run(nixgold(dir.path()).args(["validate", "fleet.yaml"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("will NOT be verified"), "{stderr}");
}

/// A fleet nested 5,000 levels deep — written out, or built by a Nickel
/// function — is an error with a position, not a stack overflow.
#[test]
fn a_fleet_nested_five_thousand_levels_is_an_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let n = 5000;
    let head = "fleet = \"homelab\", proxmox = { endpoint = \"https://127.0.0.1:1\", nodes = [\"pve\"], token = { env = \"PVE_TOKEN\" } }, isos = {}, images = {}, vms = {}";
    let written = format!(
        "{{ {head}, deep = {}1{} }}\n",
        "{ a = ".repeat(n),
        " }".repeat(n)
    );
    let computed = format!(
        "let rec f = fun n => if n == 0 then 1 else {{ a = f (n - 1) }} in\n{{ {head}, deep = f {n} }}\n"
    );
    let json = format!(
        "{{\"fleet\": \"homelab\", \"deep\": {}1{}}}\n",
        "[".repeat(n),
        "]".repeat(n)
    );
    for (file, text, reason) in [
        (
            "written.ncl",
            written,
            "written.ncl:1:1353: records and lists nest deeper than 200 levels",
        ),
        ("computed.ncl", computed, "unknown field `deep`"),
        (
            "deep.json",
            json,
            "records and lists nest deeper than 200 levels",
        ),
    ] {
        std::fs::write(dir.path().join(file), text).unwrap();
        let (code, _, stderr) = run(nixgold(dir.path()).args(["validate", file]));
        assert_eq!(code, 1, "{file}: {stderr}");
        assert!(stderr.contains(reason), "{file}: {stderr}");
        assert!(!stderr.contains("overflow"), "{file}: {stderr}");
    }
}
