//! `nixgold init` without a source: a starter fleet from flags, which
//! validates; without a terminal, a missing setting names its flag; an
//! existing file is never replaced silently. (Drafting from a cluster and
//! converting Packer/Terraform run against the simulator in
//! `tests/scenarios.rs`.)

mod common;

use common::{nixgold, run};

#[test]
fn a_starter_fleet_from_flags_validates_and_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "init",
        "-o",
        "lab.yaml",
        "--name",
        "lab",
        "--endpoint",
        "https://10.0.0.2:8006",
        "--node",
        "pve1",
        "--storage",
        "local-zfs",
        "--bridge",
        "vmbr1",
    ];
    let (code, _, err) = run(nixgold(dir.path()).args(flags).write_stdin(""));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("wrote lab.yaml (valid)"), "{err}");
    let text = std::fs::read_to_string(dir.path().join("lab.yaml")).unwrap();
    assert!(text.contains("fleet: \"lab\"\n"), "{text}");
    assert!(text.contains("  nodes: [\"pve1\"]\n"), "{text}");
    assert!(text.contains("    channel: \"nixos-24.05\"\n"), "{text}");
    assert!(
        text.contains("      storage: \"local-zfs\"\n      bridge: \"vmbr1\"\n"),
        "{text}"
    );
    let (code, _, err) = run(nixgold(dir.path()).args(["validate", "lab.yaml"]));
    assert_eq!(code, 0, "{err}");

    let (code, _, err) = run(nixgold(dir.path()).args(flags).write_stdin(""));
    assert_eq!(code, 1);
    assert!(err.contains("lab.yaml exists"), "{err}");
    assert!(err.contains("--force"), "{err}");
}

#[test]
fn without_a_terminal_a_missing_setting_names_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(nixgold(dir.path())
        .args(["init", "--endpoint", "https://10.0.0.2:8006"])
        .env_remove("PROXMOX_VE_ENDPOINT")
        .write_stdin(""));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("init needs the default node"), "{err}");
    assert!(err.contains("hint: pass --node NODE"), "{err}");
    assert!(!dir.path().join("fleet.ncl").exists());
}
