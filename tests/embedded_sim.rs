//! `--sim`: the README's first command — the whole job on the embedded
//! simulator — and a static build address there (mapped to loopback). The
//! simulator runs fast (`NIXGOLD_SIM_FAST`) and keeps its state in a
//! temporary directory.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn nixgold(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nixgold"))
        .args(args)
        .current_dir(dir)
        .env("NIXGOLD_SIM_DIR", dir.join("sim"))
        .env("NIXGOLD_SIM_FAST", "1")
        .env("NIXOS_PROD_01_PASSWORD", "change-me")
        .env("DB_01_PASSWORD", "change-me")
        .env("NO_COLOR", "1")
        .env_remove("NIXGOLD_SIM")
        .env_remove("NIXGOLD_LOCK")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        !stdout.contains("change-me") && !stderr.contains("change-me"),
        "the password leaked"
    );
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

#[test]
fn the_readme_main_job_runs_on_the_embedded_simulator() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = repo().join("fleets/example.ncl");
    let fleet = fleet.to_str().unwrap();
    let (code, out, err) = nixgold(dir.path(), &["--sim", "apply", fleet, "--auto-approve"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("Apply complete: 3 created, 0 updated, 0 replaced, 0 destroyed."),
        "{out}"
    );
    let lock = std::fs::read_to_string(dir.path().join("sim/nixgold.lock")).unwrap();
    assert!(lock.contains("[image.nixos-golden-template]"), "{lock}");
    let (code, out, _) = nixgold(dir.path(), &["--sim", "plan", fleet]);
    assert_eq!(code, 0);
    assert!(out.starts_with("No changes."), "{out}");
}

#[test]
fn a_static_build_address_works_on_the_embedded_simulator() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(repo().join("fleets/example.ncl")).unwrap();
    let fleet = example
        .replace(
            "address = { call_home = {} },",
            "address = { static = { address = \"192.168.1.250/24\", gateway = \"192.168.1.1\" } },",
        )
        .replace("boot_wait = \"10s\"", "boot_wait = \"1s\"");
    assert_ne!(fleet, example, "the example's build block changed");
    std::fs::write(dir.path().join("fleet.ncl"), fleet).unwrap();
    let (code, out, err) = nixgold(
        dir.path(),
        &["--sim", "apply", "fleet.ncl", "--auto-approve"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("set the build address through the guest agent"),
        "{err}"
    );
    let (code, out, _) = nixgold(dir.path(), &["--sim", "plan", "fleet.ncl"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("No changes."), "{out}");
}

/// Every fleet shipped under `fleets/` is a first run a new user may try:
/// each applies and converges on the embedded simulator (whose storage
/// over-commits thin pools as Proxmox does). Every VM nixgold created then
/// carries the keys Proxmox generates (qemu-server `API2/Qemu.pm`
/// `create_vm`/`clone_vm`: `meta`, `smbios1`, `vmgenid`, `boot`) and still
/// plans empty and shows no drift: nixgold never diffs what it does not own.
#[test]
fn every_shipped_fleet_applies_and_converges_on_the_embedded_simulator() {
    let mut fleets: Vec<PathBuf> = std::fs::read_dir(repo().join("fleets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    fleets.sort();
    assert!(fleets.len() >= 3, "{fleets:?}");
    for fleet in fleets {
        let dir = tempfile::tempdir().unwrap();
        let name = fleet.display().to_string();
        let fleet = fleet.to_str().unwrap();
        let (code, out, err) = nixgold(dir.path(), &["--sim", "apply", fleet, "--auto-approve"]);
        assert_eq!(code, 0, "{name}: {out}{err}");
        let (code, out, err) = nixgold(dir.path(), &["--sim", "plan", fleet]);
        assert_eq!(code, 0, "{name}: {out}{err}");
        assert!(out.starts_with("No changes."), "{name}: {out}");
        let (code, out, err) = nixgold(dir.path(), &["--sim", "drift", fleet]);
        assert_eq!(code, 0, "{name}: {out}{err}");
        assert!(out.starts_with("No drift"), "{name}: {out}");
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("sim/state.json")).unwrap())
                .unwrap();
        let vms = state["vms"].as_object().unwrap();
        assert!(!vms.is_empty(), "{name}");
        for (vmid, vm) in vms {
            let values = &vm["config"]["values"];
            for key in ["meta", "smbios1", "vmgenid", "boot"] {
                assert!(values[key].is_string(), "{name}: VM {vmid} has no {key}");
            }
        }
    }
}
