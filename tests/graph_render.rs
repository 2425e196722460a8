//! `nixgold graph` and `nixgold render` on the example fleets: the graph is
//! deterministic and the same for Nickel and YAML; every rendered
//! configuration.nix passes a real Nix parser and every install script
//! passes `bash -n`.

mod common;

use std::process::Command as Std;

use common::{example_fleets, nixgold, repo, run};

fn graph(fleet: &str, format: &[&str]) -> String {
    let lock = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(nixgold(&repo())
        .args(["graph", fleet, "--lock"])
        .arg(lock.path().join("nixgold.lock"))
        .args(format));
    assert_eq!(code, 0, "{stderr}");
    stdout
}

#[test]
fn nickel_and_yaml_examples_give_the_same_desired_graph() {
    let ncl = graph("fleets/example.ncl", &["--json"]);
    let yaml = graph("fleets/example.yaml", &["--json"]);
    let value: serde_json::Value = serde_json::from_str(&ncl).unwrap();
    assert_eq!(value["nodes"].as_array().unwrap().len(), 3, "{ncl}");
    assert_eq!(ncl, yaml);
    assert_eq!(
        graph("fleets/example.ncl", &[]),
        graph("fleets/example.yaml", &[])
    );
}

#[test]
fn graph_is_deterministic_and_follows_iso_template_vm() {
    let first = graph("fleets/multi-node.ncl", &["--format", "text"]);
    assert_eq!(first, graph("fleets/multi-node.ncl", &["--format", "text"]));
    // Shared storage: one template of `base`; local storage: one replica of
    // `ci-runner` per node that runs a runner.
    assert_eq!(first.matches("image.base[").count(), 1, "{first}");
    assert!(
        first.contains("image.ci-runner[pve2]") && first.contains("image.ci-runner[pve3]"),
        "{first}"
    );
    assert!(!first.contains("image.ci-runner[pve1]"), "{first}");
    let dot = graph("fleets/multi-node.ncl", &[]);
    assert!(dot.starts_with("digraph nixgold {"), "{dot}");
    assert!(
        dot.contains("\"image.base[pve1]\" -> \"vm.web-03\";"),
        "{dot}"
    );
    assert!(
        dot.contains("\"image.ci-runner[pve3]\" -> \"vm.runner-02\";"),
        "{dot}"
    );
}

#[test]
fn secrets_appear_in_the_graph_only_as_references() {
    let json = graph("fleets/example.ncl", &["--json"]);
    assert!(
        json.contains("\"password\": \"env:NIXOS_PROD_01_PASSWORD\""),
        "{json}"
    );
}

fn images_of(fleet: &std::path::Path) -> Vec<String> {
    nixgold::fleet::load(fleet)
        .unwrap()
        .fleet
        .images
        .keys()
        .cloned()
        .collect()
}

fn nix_parser_available() -> bool {
    let found = Std::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("NIXGOLD_REQUIRE_NIX").is_none(),
            "nix-instantiate is required here (NIXGOLD_REQUIRE_NIX is set) but not installed"
        );
        eprintln!(
            "nix-instantiate not found: checking rendered Nix with rnix only (install nix-bin for the full check)"
        );
    }
    found
}

#[test]
fn rendered_configurations_and_scripts_pass_the_real_parsers() {
    let with_nix = nix_parser_available();
    let mut rendered = 0;
    for fleet in example_fleets() {
        for image in images_of(&fleet) {
            let (code, stdout, stderr) = run(nixgold(&repo())
                .args(["--json", "render", "--image", &image, "--lock"])
                .arg(tempfile::tempdir().unwrap().path().join("l"))
                .arg(&fleet));
            assert_eq!(code, 0, "{stderr}");
            let value: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            let config = value["configuration_nix"].as_str().unwrap();
            let script = value["install_script"].as_str().unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("configuration.nix"), config).unwrap();
            std::fs::write(dir.path().join("install.sh"), script).unwrap();
            assert!(
                nixgold::nixos::check_nix(config).is_empty(),
                "{image}: rnix rejects:\n{config}"
            );
            if with_nix {
                let out = Std::new("nix-instantiate")
                    .arg("--parse")
                    .arg(dir.path().join("configuration.nix"))
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{image}: {}\n{config}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let out = Std::new("bash")
                .arg("-n")
                .arg(dir.path().join("install.sh"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{image}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            rendered += 1;
        }
    }
    assert_eq!(
        rendered, 4,
        "one image per example fleet plus two in multi-node"
    );
}

fn render_multi_node(image: &str) -> String {
    let (code, stdout, stderr) = run(nixgold(&repo()).args([
        "render",
        "fleets/multi-node.ncl",
        "--image",
        image,
        "--lock",
        "/nonexistent/nixgold.lock",
    ]));
    assert_eq!(code, 0, "{stderr}");
    stdout
}

#[test]
fn rendering_follows_the_firmware_and_merges_raw_nix_as_a_module() {
    let runner = render_multi_node("ci-runner");
    assert!(
        runner.contains("boot.loader.grub.device = \"/dev/sda\";"),
        "{runner}"
    );
    assert!(!runner.contains("systemd-boot"), "{runner}");
    assert!(
        runner.contains("parted -s \"$DISK\" -- mklabel msdos"),
        "{runner}"
    );
    assert!(
        runner.contains("      virtualisation.docker.enable = true;"),
        "{runner}"
    );
    let base = render_multi_node("base");
    assert!(
        base.contains("boot.loader.systemd-boot.enable = true;"),
        "{base}"
    );
    assert!(base.contains("allowedTCPPorts = [ 22 80 443 ];"), "{base}");
    assert!(base.contains("users.users.\"ops\""), "{base}");
    assert!(
        base.contains("time.timeZone = \"Europe/Berlin\";"),
        "{base}"
    );
    assert!(base.contains("nixos-install --no-root-passwd"), "{base}");
}

#[test]
fn render_of_an_unknown_image_names_the_known_ones() {
    let (code, _, stderr) =
        run(nixgold(&repo()).args(["render", "fleets/example.ncl", "--image", "nope"]));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("images in this fleet: nixos-golden-template"),
        "{stderr}"
    );
}

#[test]
fn the_example_images_configuration_is_snapshot_tested() {
    let (code, stdout, stderr) = run(nixgold(&repo()).args([
        "--json",
        "render",
        "fleets/example.ncl",
        "--image",
        "nixos-golden-template",
        "--lock",
        "/nonexistent/nixgold.lock",
    ]));
    assert_eq!(code, 0, "{stderr}");
    let value: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let config = value["configuration_nix"].as_str().unwrap();
    // Structural checks beside the snapshot, so a wrong one cannot be
    // blessed quietly.
    assert!(
        config.contains("services.cloud-init = {\n    enable = true;\n    network.enable = true;"),
        "{config}"
    );
    assert!(config.contains("networking.hostName = \"\";"));
    assert!(config.contains("users.mutableUsers = true;"));
    assert!(config.contains("services.qemuGuest.enable = true;"));
    insta::assert_snapshot!("example_configuration_nix", config);
    insta::assert_snapshot!(
        "example_install_sh",
        value["install_script"].as_str().unwrap()
    );
}
