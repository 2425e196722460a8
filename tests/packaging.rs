//! The packaging of Day 2: `schedule --systemd` writes units that systemd
//! itself accepts (`systemd-analyze verify`, Debian's `systemd` package),
//! with secrets only as credentials; `flake.nix` and the NixOS module parse
//! (`nix-instantiate --parse`; no evaluation is possible without nixpkgs).

mod common;

use std::process::Command as Std;

use common::{nixgold, repo};

/// Whether `program` runs; when it does not, the test says so (and fails
/// when `require` is set in the environment, as CI sets it).
fn available(program: &str, require: &str) -> bool {
    let found = Std::new(program).arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os(require).is_none(),
            "{program} is required here ({require} is set) but not installed"
        );
        eprintln!("{program} not found: skipping this check (install it to run it)");
    }
    found
}

#[test]
fn schedule_writes_units_systemd_accepts_with_secrets_as_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = repo().join("fleets/example.yaml");
    let out = nixgold(dir.path())
        .args([
            "schedule",
            "--systemd",
            "--apply",
            "--textfile-dir",
            "/var/lib/node_exporter",
        ])
        .arg(&fleet)
        .arg("--dir")
        .arg(dir.path())
        .env("PROXMOX_VE_API_TOKEN", "root@pam!ci=do-not-print-me")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    let cycle = read("nixgold-cycle.service");
    let needles = [
        "LoadCredential=PROXMOX_VE_API_TOKEN:/etc/nixgold/credentials/PROXMOX_VE_API_TOKEN",
        "Environment=PROXMOX_VE_API_TOKEN_FILE=%d/PROXMOX_VE_API_TOKEN",
        // The example fleet's VM password comes from this variable.
        "LoadCredential=NIXOS_PROD_01_PASSWORD:",
        " cycle ",
        "--plan-out /var/lib/nixgold/cycle.plan --apply --prometheus /var/lib/node_exporter/nixgold-cycle.prom",
        "SuccessExitStatus=2",
    ];
    for needle in needles {
        assert!(cycle.contains(needle), "missing {needle:?} in:\n{cycle}");
    }
    assert!(read("nixgold-drift.service").contains(" drift "));
    assert!(read("nixgold-cycle.timer").contains("OnCalendar=quarterly"));
    assert!(read("nixgold-drift.timer").contains("OnCalendar=hourly"));
    for name in ["nixgold-drift.service", "nixgold-cycle.service"] {
        assert!(
            !read(name).contains("do-not-print-me"),
            "a secret in {name}"
        );
    }
    if !available("systemd-analyze", "NIXGOLD_REQUIRE_SYSTEMD") {
        return;
    }
    let verified = Std::new("systemd-analyze")
        .arg("verify")
        .args(
            [
                "nixgold-drift.service",
                "nixgold-drift.timer",
                "nixgold-cycle.service",
                "nixgold-cycle.timer",
            ]
            .map(|n| dir.path().join(n)),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&verified.stderr);
    assert!(verified.status.success(), "{stderr}");
    // Warnings (an unknown key, a bad specifier) do not fail verify: none allowed.
    assert!(
        !stderr.lines().any(|l| l.contains("nixgold-")),
        "systemd-analyze warned:\n{stderr}"
    );
}

#[test]
fn the_flake_and_the_nixos_module_parse() {
    for file in ["flake.nix", "nix/module.nix"] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        assert!(
            text.contains("services.nixgold"),
            "{file} documents the module"
        );
    }
    if !available("nix-instantiate", "NIXGOLD_REQUIRE_NIX") {
        return;
    }
    for file in ["flake.nix", "nix/module.nix"] {
        let parsed = Std::new("nix-instantiate")
            .arg("--parse")
            .arg(repo().join(file))
            .output()
            .unwrap();
        assert!(
            parsed.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&parsed.stderr)
        );
    }
}

/// The GitLab CI example is YAML that GitLab can read (PyYAML, as CI has it;
/// GitLab refuses a `script` entry that is not a string, which an unquoted
/// `: ` inside a command makes of it), and every `$NIXGOLD` line in its jobs names a subcommand and flags that
/// nixgold has: the example cannot fall behind the CLI unnoticed.
#[test]
fn the_ci_example_parses_and_calls_only_real_subcommands_and_flags() {
    let script = r#"
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
for name, job in doc.items():
    if isinstance(job, dict) and "script" in job:
        for line in job["script"]:
            if not isinstance(line, str):
                sys.exit(f"job {name}: a script entry is not a string (GitLab rejects it): {line!r}")
            for part in line.splitlines():
                if part.strip().startswith("$NIXGOLD "):
                    print(part.strip())
"#;
    let out = Std::new("python3")
        .args(["-c", script])
        .arg(repo().join("examples/ci/gitlab-ci.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "examples/ci/gitlab-ci.yml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        calls.lines().count() >= 3,
        "drift, update and apply jobs: {calls}"
    );
    let dir = tempfile::tempdir().unwrap();
    for call in calls.lines() {
        let words: Vec<&str> = call.split_whitespace().collect();
        let help = nixgold(dir.path())
            .args([words[1], "--help"])
            .output()
            .unwrap();
        assert!(help.status.success(), "{call}: no such subcommand");
        let text = String::from_utf8_lossy(&help.stdout);
        for flag in words.iter().filter(|w| w.starts_with("--")) {
            assert!(text.contains(flag), "{call}: `{}` has no {flag}", words[1]);
        }
    }
}
