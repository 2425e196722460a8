//! `nixgold sim serve` as a real process: a third-party client (proxmoxer,
//! from PyPI) lists, creates, clones, polls tasks and reads configs with
//! their digest over HTTPS with the printed CA file, and the `--state` file
//! carries the cluster across a restart; Ansible's
//! `community.proxmox.proxmox_kvm` clones, configures and starts a VM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

struct Server {
    child: Child,
    endpoint: String,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, token: Option<&str>) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixgold"));
    cmd.args([
        "sim",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls",
        "--fast",
        "--user",
        "root@pam:px-password",
    ])
    .arg("--cert-out")
    .arg(dir.join("ca.pem"))
    .arg("--state")
    .arg(dir.join("state.json"))
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(t) = token {
        cmd.args(["--token", t]);
    }
    let mut child = cmd.spawn().expect("nixgold runs");
    let stdout = child.stdout.take().unwrap();
    let mut endpoint = None;
    let mut token = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(e) = line.strip_prefix("endpoint: ") {
            endpoint = Some(e.to_owned());
        }
        if let Some(t) = line.strip_prefix("token: ") {
            token = Some(t.to_owned());
        }
        if line.starts_with("press Ctrl-C") {
            break;
        }
    }
    Server {
        child,
        endpoint: endpoint.expect("the endpoint is printed"),
        token: token.expect("the token is printed"),
    }
}

fn proxmoxer_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import proxmoxer, requests"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "proxmoxer must be installed in CI (pip install proxmoxer requests)"
        );
        eprintln!("SKIPPED: python3 with proxmoxer and requests is not installed");
    }
    ok
}

fn proxmoxer(server: &Server, dir: &Path, phase: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/proxmoxer_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(phase)
        .env("SIM_ENDPOINT", &server.endpoint)
        .env("SIM_TOKEN", &server.token)
        .env("SIM_CA", dir.join("ca.pem"))
        .env("SIM_PASSWORD", "px-password")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "proxmoxer {phase} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn proxmoxer_works_unchanged_against_sim_serve_and_state_persists() {
    if !proxmoxer_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let first = serve(dir.path(), None);
    assert!(
        first.endpoint.starts_with("https://127.0.0.1:"),
        "{}",
        first.endpoint
    );
    assert!(first.token.starts_with("root@pam!nixgold="));
    proxmoxer(&first, dir.path(), "create");
    let token = first.token.clone();
    drop(first);
    // A new process, a new certificate, the same state and token.
    let second = serve(dir.path(), Some(&token));
    proxmoxer(&second, dir.path(), "restarted");
}

fn ansible_available() -> bool {
    let ok = Command::new("ansible-playbook")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "Ansible must be installed in CI (pip install ansible)"
        );
        eprintln!("SKIPPED: ansible-playbook is not installed");
    }
    ok
}

#[test]
fn ansibles_proxmox_kvm_module_works_unchanged_against_sim_serve() {
    if !proxmoxer_available() || !ansible_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), None);
    proxmoxer(&server, dir.path(), "create");
    let (token_id, secret) = server.token.rsplit_once('=').unwrap();
    let (user, token) = token_id.split_once('!').unwrap();
    let port = server.endpoint.rsplit(':').next().unwrap();
    let playbook =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/ansible_proxmox_kvm.yml");
    let out = Command::new("ansible-playbook")
        .arg("-i")
        .arg("localhost,")
        .arg("-c")
        .arg("local")
        .arg(playbook)
        .arg("-e")
        .arg(format!(
            "sim_port={port} sim_user={user} sim_token_id={token} sim_token_secret={secret} \
             ansible_python_interpreter=python3"
        ))
        .env("REQUESTS_CA_BUNDLE", dir.path().join("ca.pem"))
        .env("ANSIBLE_LOCAL_TEMP", dir.path().join("ansible-tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the playbook failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("failed=0"), "{text}");
}

#[test]
fn bad_flags_are_refused_with_the_flag_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_nixgold"))
        .args([
            "sim",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--fault",
            "GET /x => teapot",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--fault \"GET /x => teapot\"") && stderr.contains("unknown action"),
        "{stderr}"
    );
}
