//! The lockfile format: compatibility fixtures for every version, exact
//! round trips, `--locked`, and refusal to touch files nixgold cannot read.

mod common;

use std::path::Path;

use common::{nixgold, repo, run};
use nixgold::lock::Lockfile;

fn fixture(name: &str) -> std::path::PathBuf {
    repo().join("tests/fixtures/lock").join(name)
}

#[test]
fn every_version_fixture_parses_and_round_trips_byte_for_byte() {
    for name in ["v1-minimal.lock", "v1-full.lock", "v2-imported.lock"] {
        let path = fixture(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let lock = Lockfile::parse(&path, &text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(lock.render(), text, "{name} does not round-trip");
    }
    let full = Lockfile::read(&fixture("v1-full.lock")).unwrap();
    assert_eq!(
        full.images["base"]
            .current_generation()
            .unwrap()
            .templates
            .len(),
        2
    );
    assert_eq!(full.vmids["vm.web-01"].get(), 2004);
    let imported = Lockfile::read(&fixture("v2-imported.lock")).unwrap();
    let generation = imported.images["golden"].current_generation().unwrap();
    assert!(generation.imported && generation.iso_sha256.is_none());
    assert_eq!(imported.adopt["vm.web-01"].get(), 101);
}

#[test]
fn corrupt_or_newer_lockfiles_are_reported_and_never_overwritten() {
    for (name, message) in [
        ("corrupt-syntax.lock", "is corrupt"),
        ("corrupt-digest.lock", "is corrupt"),
        (
            "newer-version.lock",
            "has format version 3, but this nixgold only knows up to 2",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("nixgold.lock");
        std::fs::copy(fixture(name), &lock).unwrap();
        let before = std::fs::read(&lock).unwrap();
        let (code, _, stderr) = run(nixgold(&repo())
            .args(["lock", "fleets/example.ncl", "--lock"])
            .arg(&lock));
        assert_eq!(code, 1, "{name}");
        assert!(stderr.contains(message), "{name}: {stderr}");
        assert!(stderr.contains("left untouched"), "{name}: {stderr}");
        assert_eq!(std::fs::read(&lock).unwrap(), before, "{name} was modified");
    }
}

fn lock_multi_node(lock: &Path, extra: &[&str]) -> (i32, String, String) {
    run(nixgold(&repo())
        .args(["lock", "fleets/multi-node.ncl", "--lock"])
        .arg(lock)
        .args(extra))
}

#[test]
fn lock_records_allocations_and_does_not_rewrite_an_unchanged_file() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("nixgold.lock");
    let (code, _, stderr) = lock_multi_node(&lock, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("updated"), "{stderr}");
    let written = Lockfile::read(&lock).unwrap();
    assert_eq!(written.fleet, "lab");
    assert_eq!(
        written.vmids.len(),
        10,
        "every VM without a fixed VMID gets one"
    );
    assert!(
        !written.vmids.contains_key("vm.db-01"),
        "fixed VMIDs are not allocations"
    );
    let ids: std::collections::BTreeSet<u32> = written.vmids.values().map(|v| v.get()).collect();
    assert_eq!(ids.len(), 10, "allocations are distinct");
    assert!(ids.iter().all(|id| (2000..=2999).contains(id)));

    let modified = std::fs::metadata(&lock).unwrap().modified().unwrap();
    let (code, _, stderr) = lock_multi_node(&lock, &[]);
    assert_eq!(code, 0);
    assert!(stderr.contains("up to date"), "{stderr}");
    assert_eq!(
        std::fs::metadata(&lock).unwrap().modified().unwrap(),
        modified,
        "rewritten although unchanged"
    );
    let (code, _, _) = lock_multi_node(&lock, &["--locked"]);
    assert_eq!(code, 0, "--locked accepts an up-to-date lockfile");
}

#[test]
fn allocations_are_stable_when_the_fleet_grows() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("nixgold.lock");
    // Pre-existing allocations (as in the fixture) are kept, and new VMs
    // take the lowest free ids around them.
    std::fs::write(
        &lock,
        "version = 1\nfleet = \"lab\"\n\n[vmids]\n\"vm.web-01\" = 2004\n\"vm.monitor-01\" = 2000\n",
    )
    .unwrap();
    let (code, _, stderr) = lock_multi_node(&lock, &[]);
    assert_eq!(code, 0, "{stderr}");
    let written = Lockfile::read(&lock).unwrap();
    assert_eq!(written.vmids["vm.web-01"].get(), 2004);
    assert_eq!(written.vmids["vm.monitor-01"].get(), 2000);
    assert_eq!(written.vmids["vm.runner-01"].get(), 2001);
    assert_eq!(written.vmids["vm.web-02"].get(), 2005);
}

#[test]
fn locked_refuses_to_change_the_lockfile() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("nixgold.lock");
    let (code, _, stderr) = lock_multi_node(&lock, &["--locked"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("needs to be updated, but --locked was given"),
        "{stderr}"
    );
    assert!(!lock.exists(), "--locked created the lockfile");
}

#[test]
fn a_lockfile_of_another_fleet_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("nixgold.lock");
    std::fs::copy(fixture("v1-full.lock"), &lock).unwrap();
    let (code, _, stderr) = run(nixgold(&repo())
        .args(["validate", "fleets/example.ncl", "--lock"])
        .arg(&lock));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("belongs to fleet `lab`, not `homelab`"),
        "{stderr}"
    );
}

#[test]
fn lockfile_vmids_take_part_in_duplicate_detection() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("nixgold.lock");
    // web-01 is allocated 1500 in the lockfile, which db-01 fixes.
    std::fs::write(
        &lock,
        "version = 1\nfleet = \"lab\"\n\n[vmids]\n\"vm.web-01\" = 1500\n",
    )
    .unwrap();
    let (code, _, stderr) = run(nixgold(&repo())
        .args(["validate", "fleets/multi-node.ncl", "--lock"])
        .arg(&lock));
    assert_eq!(code, 1);
    assert!(
        stderr.contains(
            "vms.web-01 (allocated in the lockfile): VMID 1500 is also used by vms.db-01.vmid"
        ),
        "{stderr}"
    );
}

/// Copies the example fleets into a fresh directory, with the repository's
/// (homelab) lockfile under its old default name `nixgold.lock`.
fn two_fleets_and_an_old_lockfile() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("fleets")).unwrap();
    for name in ["example.ncl", "multi-node.ncl"] {
        std::fs::copy(
            repo().join("fleets").join(name),
            dir.path().join("fleets").join(name),
        )
        .unwrap();
    }
    std::fs::copy(
        repo().join("fleets/example.lock"),
        dir.path().join("nixgold.lock"),
    )
    .unwrap();
    dir
}

#[test]
fn each_fleet_has_its_own_lockfile_beside_it() {
    let dir = two_fleets_and_an_old_lockfile();
    std::fs::remove_file(dir.path().join("nixgold.lock")).unwrap();
    for (fleet, lock, name) in [
        ("fleets/multi-node.ncl", "fleets/multi-node.lock", "lab"),
        ("fleets/example.ncl", "fleets/example.lock", "homelab"),
    ] {
        let (code, _, err) = run(nixgold(dir.path()).args(["lock", fleet]));
        assert_eq!(code, 0, "{fleet}: {err}");
        assert!(err.contains(&format!("{lock}: updated")), "{err}");
        let written = Lockfile::read(&dir.path().join(lock)).unwrap();
        assert_eq!(written.fleet, name);
    }
    assert!(!dir.path().join("nixgold.lock").exists());
}

#[test]
fn an_old_nixgold_lock_is_used_by_its_own_fleet_only() {
    let dir = two_fleets_and_an_old_lockfile();
    // The homelab lockfile no longer trips over another fleet.
    let (code, out, err) = run(nixgold(dir.path()).args(["validate", "fleets/multi-node.ncl"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("fleet `lab` is valid"), "{out}");
    assert!(!err.contains("nixgold.lock"), "{err}");
    // Its own fleet keeps using it, and is told how to rename it.
    let old = std::fs::read_to_string(dir.path().join("nixgold.lock")).unwrap();
    let (code, _, err) = run(nixgold(dir.path()).args(["lock", "fleets/example.ncl"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("note: using nixgold.lock (fleet `homelab`), the lockfile's old default name")
            && err.contains("`mv nixgold.lock fleets/example.lock`"),
        "{err}"
    );
    assert!(err.contains("nixgold.lock: up to date"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("nixgold.lock")).unwrap(),
        old
    );
    assert!(!dir.path().join("fleets/example.lock").exists());
    // Once renamed, the note is gone.
    std::fs::rename(
        dir.path().join("nixgold.lock"),
        dir.path().join("fleets/example.lock"),
    )
    .unwrap();
    let (code, _, err) = run(nixgold(dir.path()).args(["lock", "fleets/example.ncl"]));
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("old default name"), "{err}");
    assert!(err.contains("fleets/example.lock: up to date"), "{err}");
}
