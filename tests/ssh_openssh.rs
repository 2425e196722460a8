//! The build's SSH layer against a real OpenSSH server on 127.0.0.1
//! (Debian's openssh-server, started here with its own config and host
//! key): key authentication, commands with stdin, exit codes, streamed
//! output, and host-key pinning.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixgold::build::Ssh;

struct Sshd {
    child: Child,
    port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts sshd, or explains why this machine cannot (and fails in CI).
fn sshd(dir: &Path, authorized: &str) -> Option<Sshd> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if !Path::new("/usr/sbin/sshd").exists() || !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide /usr/sbin/sshd (openssh-server) and run as root"
        );
        eprintln!("SKIPPED: needs /usr/sbin/sshd (apt-get install openssh-server) and root");
        return None;
    }
    std::fs::create_dir_all("/run/sshd").unwrap();
    let host_key = dir.join("host_key");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(dir.join("authorized_keys"), authorized).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowUsers root\n",
        host_key.display(),
        dir.join("authorized_keys").display(),
        dir.join("sshd.pid").display()
    );
    std::fs::write(dir.join("sshd_config"), config).unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sshd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Sshd { child, port })
}

fn key() -> russh::keys::PrivateKey {
    russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap()
}

#[tokio::test]
async fn the_build_ssh_layer_works_against_openssh() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let line = k.public_key().to_openssh().unwrap();
    let Some(server) = sshd(dir.path(), &format!("{line} nixgold-test\n")) else {
        return;
    };

    let pin = Arc::new(Mutex::new(None));
    let ssh = Ssh::connect("127.0.0.1", server.port, &k, pin.clone())
        .await
        .unwrap();
    assert!(
        pin.lock().unwrap().is_some(),
        "the host key is pinned on first contact"
    );
    let target = dir.path().join("uploaded.nix");
    let (code, _) = ssh
        .run(
            &format!(
                "mkdir -p {0} && cat > {1}",
                dir.path().display(),
                target.display()
            ),
            "{ x = 1; }\n",
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "{ x = 1; }\n");
    let mut streamed = Vec::new();
    let (code, out) = ssh
        .run("printf 'one\\ntwo\\n'; exit 3", "", |l| {
            streamed.push(l.to_owned())
        })
        .await
        .unwrap();
    assert_eq!((code, out.as_str()), (3, "one\ntwo\n"));
    assert_eq!(streamed, ["one", "two"]);

    // The same pin accepts the same server again …
    assert!(
        Ssh::connect("127.0.0.1", server.port, &k, pin.clone())
            .await
            .is_ok()
    );
    // … and refuses a server whose key is not the pinned one.
    let other = Arc::new(Mutex::new(Some("a different host key".to_owned())));
    assert!(
        Ssh::connect("127.0.0.1", server.port, &k, other)
            .await
            .is_err()
    );
    // A key that is not authorised is refused.
    let err = Ssh::connect("127.0.0.1", server.port, &key(), Arc::new(Mutex::new(None)))
        .await
        .err()
        .expect("an unknown key is refused");
    assert!(err.to_string().contains("refused the build key"), "{err}");
}
