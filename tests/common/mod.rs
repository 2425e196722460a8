//! Helpers shared by the integration tests: the real binary, run in a
//! chosen directory, and the repository's paths.

#![allow(dead_code)] // each test crate uses a different subset

use std::path::{Path, PathBuf};

use assert_cmd::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `nixgold` with a clean environment for the variables it reads.
pub fn nixgold(dir: &Path) -> Command {
    let mut cmd = Command::cargo_bin("nixgold").expect("binary is built");
    cmd.current_dir(dir)
        .env_remove("NIXGOLD_FLEET")
        .env_remove("NIXGOLD_LOCK")
        .env_remove("NIXGOLD_LOG")
        .env("NO_COLOR", "1");
    cmd
}

pub fn example_fleets() -> Vec<PathBuf> {
    ["example.ncl", "example.yaml", "multi-node.ncl"]
        .iter()
        .map(|f| repo().join("fleets").join(f))
        .collect()
}

/// Runs a command and returns (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("command runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `python3` can import `modules` (comma-separated). Required in CI
/// (`.ci/run` installs them); elsewhere a missing module skips the check,
/// saying so.
pub fn python_has(modules: &str) -> bool {
    let probe = std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output();
    if matches!(probe, Ok(ref o) if o.status.success()) {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "python3 with {modules} is required in CI"
    );
    eprintln!("python3 {modules} not available: skipping this check");
    false
}
