//! The guest model: an installer VM reads typed keys, the call-home really
//! reaches a listener, its SSH server accepts only the key the keystrokes
//! installed, checks the install commands, reboots into the installed
//! system and powers off.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Sim, fast, start};
use pve_sim::{ClusterSpec, RemoteFile, SimOptions};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ISO: &str = "https://releases.example.org/nixos-minimal-24.05.4242.abcdef-x86_64-linux.iso";

fn options(boot: Duration) -> SimOptions {
    let mut o = fast();
    o.guest_boot = boot;
    o.remote_files.insert(
        ISO.into(),
        RemoteFile {
            sha256: "e".repeat(64),
            size: 1 << 30,
        },
    );
    o
}

/// An installer VM 9400, started.
async fn installer(boot: Duration) -> Sim {
    installer_with(options(boot), &[]).await
}

/// An installer VM 9400 with `extra` config, started on a simulator with `opts`.
async fn installer_with(opts: SimOptions, extra: &[(&str, &str)]) -> Sim {
    let s = start(ClusterSpec::default(), opts).await;
    let form = [
        ("url", ISO),
        ("content", "iso"),
        (
            "filename",
            "nixos-minimal-24.05.4242.abcdef-x86_64-linux.iso",
        ),
    ];
    assert_eq!(
        s.run("/nodes/pve/storage/local/download-url", &form).await,
        "OK"
    );
    s.create_vm(
        9400,
        &[
            (
                "ide2",
                "local:iso/nixos-minimal-24.05.4242.abcdef-x86_64-linux.iso,media=cdrom",
            ),
            ("boot", "order=scsi0;ide2"),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(s.run("/nodes/pve/qemu/9400/status/start", &[]).await, "OK");
    s
}

/// This test's own US-keyboard encoder (deliberately not the simulator's).
fn keys(text: &str) -> Vec<String> {
    let shifted = |c: char| -> Option<&'static str> {
        Some(match c {
            '!' => "1",
            '@' => "2",
            '#' => "3",
            '$' => "4",
            '%' => "5",
            '^' => "6",
            '&' => "7",
            '*' => "8",
            '(' => "9",
            ')' => "0",
            '_' => "minus",
            '+' => "equal",
            '{' => "bracket_left",
            '}' => "bracket_right",
            ':' => "semicolon",
            '"' => "apostrophe",
            '~' => "grave_accent",
            '|' => "backslash",
            '<' => "comma",
            '>' => "dot",
            '?' => "slash",
            _ => return None,
        })
    };
    text.chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c.to_string(),
            'A'..='Z' => format!("shift-{}", c.to_ascii_lowercase()),
            ' ' => "spc".into(),
            '-' => "minus".into(),
            '=' => "equal".into(),
            '/' => "slash".into(),
            '.' => "dot".into(),
            ',' => "comma".into(),
            ';' => "semicolon".into(),
            '\'' => "apostrophe".into(),
            '[' => "bracket_left".into(),
            ']' => "bracket_right".into(),
            '\\' => "backslash".into(),
            '`' => "grave_accent".into(),
            '\n' => "ret".into(),
            c => format!(
                "shift-{}",
                shifted(c).unwrap_or_else(|| panic!("no key for {c:?}"))
            ),
        })
        .collect()
}

async fn type_text(s: &Sim, text: &str) {
    for key in keys(text) {
        let r = s
            .put("/nodes/pve/qemu/9400/sendkey", &[("key", key.as_str())])
            .await;
        assert_eq!(r.status, 200, "{key}: {}", r.raw);
    }
}

/// A one-shot call-home listener answering with `script`; returns its URL
/// and a receiver for the body the guest posted.
async fn call_home(script: String) -> (String, tokio::sync::oneshot::Receiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/t0k3n", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 8192];
        let n = stream.read(&mut buf).await.unwrap();
        let req = String::from_utf8_lossy(&buf[..n]).into_owned();
        let body = req
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{script}",
            script.len()
        );
        stream.write_all(resp.as_bytes()).await.unwrap();
        let _ = tx.send(body);
    });
    (url, rx)
}

fn key() -> PrivateKey {
    PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap()
}

fn public(k: &PrivateKey) -> String {
    k.public_key().to_openssh().unwrap()
}

struct Accept;
impl russh::client::Handler for Accept {
    type Error = russh::Error;
    async fn check_server_key(
        &mut self,
        _: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

async fn ssh(port: u16, k: &PrivateKey) -> Option<russh::client::Handle<Accept>> {
    let config = Arc::new(russh::client::Config::default());
    let mut handle = russh::client::connect(config, ("127.0.0.1", port), Accept)
        .await
        .ok()?;
    let auth = handle
        .authenticate_publickey(
            "root",
            PrivateKeyWithHashAlg::new(Arc::new(k.clone()), None),
        )
        .await
        .ok()?;
    auth.success().then_some(handle)
}

async fn exec(h: &russh::client::Handle<Accept>, command: &str, stdin: &str) -> (u32, String) {
    let mut ch = h.channel_open_session().await.unwrap();
    ch.exec(true, command).await.unwrap();
    if !stdin.is_empty() {
        ch.data(stdin.as_bytes()).await.unwrap();
    }
    ch.eof().await.unwrap();
    let mut out = Vec::new();
    let mut code = None;
    while let Some(msg) = ch.wait().await {
        match msg {
            russh::ChannelMsg::Data { data } => out.extend_from_slice(&data),
            russh::ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status),
            _ => {}
        }
    }
    (
        code.expect("an exit status"),
        String::from_utf8_lossy(&out).into_owned(),
    )
}

/// Uploads the configuration and the install script the way nixgold does,
/// then runs the install: its exit code and output.
async fn install(
    h: &russh::client::Handle<Accept>,
    configuration: &str,
    script: &str,
) -> (u32, String) {
    let upload = "mkdir -p /tmp/nixgold && cat > /tmp/nixgold/configuration.nix";
    assert_eq!(exec(h, upload, configuration).await.0, 0);
    assert_eq!(exec(h, "cat > /tmp/nixgold/install.sh", script).await.0, 0);
    exec(
        h,
        "bash /tmp/nixgold/install.sh /tmp/nixgold/configuration.nix",
        "",
    )
    .await
}

async fn port(s: &Sim) -> u16 {
    for _ in 0..200 {
        s.get("/nodes/pve/qemu/9400/status/current").await;
        if let Some(p) = s.sim.guests().ssh_port(9400) {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the guest never booted");
}

const SCRIPT: &str = "#!/usr/bin/env bash\nparted -s \"$DISK\" -- mklabel gpt\nmkfs.ext4 -L nixos x\nmount /dev/disk/by-label/nixos /mnt\nnixos-generate-config --root /mnt\nmkdir -p /mnt/root/.ssh && cp /root/.ssh/authorized_keys /mnt/root/.ssh/\nnixos-install --no-root-passwd\n";
const CONFIG: &str = "{ config, pkgs, ... }: { services.openssh.enable = true; boot.loader.grub.device = \"/dev/sda\"; fileSystems.\"/\".device = \"/dev/disk/by-label/nixos\"; system.stateVersion = \"24.05\"; }\n";

async fn access(s: &Sim, k: &PrivateKey, sudo: bool) -> String {
    let script = format!(
        "mkdir -p /root/.ssh\necho '{}' >> /root/.ssh/authorized_keys\nchmod 600 /root/.ssh/authorized_keys\n",
        public(k)
    );
    let (url, rx) = call_home(script).await;
    if sudo {
        type_text(s, "sudo -i\n").await;
    }
    type_text(
        s,
        &format!("curl -fsS -d \"ip=$(hostname -I) port=${{NIXGOLD_SSH_PORT:-22}}\" {url} | sh\n"),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("the guest called home")
        .unwrap()
}

#[tokio::test]
async fn a_build_runs_end_to_end_inside_the_guest() {
    let s = installer(Duration::ZERO).await;
    let k = key();
    let posted = access(&s, &k, true).await;
    let p = port(&s).await;
    assert_eq!(
        posted,
        format!("ip=127.0.0.1  port={p}"),
        "the guest reports its address and SSH port"
    );
    assert!(
        ssh(p, &key()).await.is_none(),
        "only the installed key is accepted"
    );
    let h = ssh(p, &k).await.expect("the typed key works");
    let (code, out) = install(&h, CONFIG, SCRIPT).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("[nixgold] partition\n[nixgold] format\n[nixgold] mount\n"),
        "{out}"
    );
    exec(&h, "reboot", "").await;
    drop(h);
    // The installed system: a new SSH server, the copied key.
    let mut p2 = port(&s).await;
    for _ in 0..100 {
        if p2 != p {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        p2 = port(&s).await;
    }
    let h = ssh(p2, &k)
        .await
        .expect("the installed system accepts the build key");
    let (_, version) = exec(&h, "nixos-version", "").await;
    assert_eq!(version, "24.05.4242.abcdef (Simulated)\n");
    let (_, path) = exec(&h, "readlink -f /run/current-system", "").await;
    assert!(
        path.starts_with("/nix/store/")
            && path
                .trim_end()
                .ends_with("-nixos-system-nixos-24.05.4242.abcdef"),
        "{path}"
    );
    // NixOS puts cloud-init on no PATH (nixos/modules/services/system/cloud-init.nix).
    let (code, out) = exec(&h, "cloud-init clean --logs", "").await;
    assert_eq!(
        (code, out.as_str()),
        (127, "bash: line 1: cloud-init: command not found\n")
    );
    let (code, _) = exec(&h, "truncate -s 0 /etc/machine-id && rm -f /etc/ssh/ssh_host_* && rm -rf /var/lib/cloud /var/log/cloud-init.log /var/log/cloud-init-output.log && rm -f /root/.ssh/authorized_keys", "").await;
    assert_eq!(code, 0);
    exec(&h, "poweroff", "").await;
    let st = s.get("/nodes/pve/qemu/9400/status/current").await;
    assert_eq!(st.data()["status"], "stopped");
    let installed = s.sim.inspect(|st| st.vms[&9400].installed.clone()).unwrap();
    assert!(
        installed.machine_id_empty
            && !installed.host_keys
            && installed.cloud_init_clean
            && installed.root_keys.is_empty()
    );
}

#[tokio::test]
async fn without_sudo_the_key_is_not_installed() {
    let s = installer(Duration::ZERO).await;
    let k = key();
    access(&s, &k, false).await;
    let p = port(&s).await;
    assert!(ssh(p, &k).await.is_none());
    let history = s.sim.guests().history(9400);
    assert!(
        history.iter().any(|l| l.contains("Permission denied")),
        "{history:?}"
    );
}

#[tokio::test]
async fn keys_typed_before_the_console_is_up_are_lost() {
    let s = installer(Duration::from_secs(30)).await;
    type_text(&s, "sudo -i\n").await;
    assert_eq!(s.sim.guests().lost_keys(9400), 8);
    assert!(s.sim.guests().history(9400).is_empty());
}

#[tokio::test]
async fn broken_configurations_and_scripts_out_of_order_fail_the_install() {
    let s = installer(Duration::ZERO).await;
    let k = key();
    access(&s, &k, true).await;
    let h = ssh(port(&s).await, &k).await.unwrap();
    let (code, out) = install(&h, "{ services.openssh.enable = true }", SCRIPT).await;
    assert_eq!(code, 1);
    assert!(out.contains("syntax error in configuration.nix"), "{out}");
    let swapped = SCRIPT
        .replace("mount /dev", "XX")
        .replace("nixos-install", "mount /dev/x /mnt\nnixos-install");
    let (code, out) = install(&h, CONFIG, &swapped).await;
    assert_eq!(code, 1);
    assert!(
        out.contains("step `generate the hardware configuration`"),
        "{out}"
    );
    // The installer ISO has what nixos/modules/profiles/base.nix and
    // installation-device.nix give it, no Debian tooling.
    let foreign = SCRIPT.replace("nixos-install", "apt-get install -y grub-pc\nnixos-install");
    let (code, out) = install(&h, CONFIG, &foreign).await;
    assert_eq!(
        (code, out.as_str()),
        (
            127,
            "/tmp/nixgold/install.sh: line 7: apt-get: command not found\n"
        )
    );
    let (code, out) = exec(&h, "rm -rf /", "").await;
    assert_eq!((code, out.as_str()), (127, "rm -rf /: command not found\n"));
    assert!(s.sim.inspect(|st| st.vms[&9400].installed.is_none()));
}

/// Reboots the guest behind `h` and connects to the system it boots.
async fn reboot_into_installed(
    s: &Sim,
    h: russh::client::Handle<Accept>,
    k: &PrivateKey,
) -> russh::client::Handle<Accept> {
    exec(&h, "reboot", "").await;
    drop(h);
    for _ in 0..200 {
        // The port stays across the reboot; the installed system answers
        // `nixos-version`, the installer does not.
        if let Some(h) = ssh(port(s).await, k).await
            && exec(&h, "nixos-version", "").await.0 == 0
        {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the installed system never came up");
}

/// The agent of the installed system answers `get-osinfo` from its
/// /etc/os-release as NixOS writes it (nixpkgs
/// nixos/modules/misc/version.nix `osReleaseContents`: VERSION_ID is the
/// release) and as qemu-ga reads it (qga/commands-posix.c
/// `qmp_guest_get_osinfo`: no BUILD_ID). `nixos-rebuild switch --upgrade`
/// through `agent/exec` moves the system to the channel's newer build:
/// `nixos-version` and the system path change, the release does not.
#[tokio::test]
async fn the_agent_reports_the_installed_nixos_and_a_rebuild_inside_moves_it() {
    let mut opts = options(Duration::ZERO);
    let newer = "24.05.5678.f00dfeed";
    opts.channel_releases.insert("24.05".into(), newer.into());
    let s = installer_with(opts, &[("agent", "1")]).await;
    let k = key();
    access(&s, &k, true).await;
    let h = ssh(port(&s).await, &k).await.expect("the typed key works");
    let config = CONFIG.replace(
        "services.openssh.enable = true;",
        "services.openssh.enable = true; services.qemuGuest.enable = true;",
    );
    let (code, out) = install(&h, &config, SCRIPT).await;
    assert_eq!(code, 0, "{out}");
    let installer_osinfo = s.get("/nodes/pve/qemu/9400/agent/get-osinfo").await;
    assert_eq!(
        installer_osinfo.status, 500,
        "the installer ISO runs no agent"
    );
    let h = reboot_into_installed(&s, h, &k).await;
    let osinfo = s.get("/nodes/pve/qemu/9400/agent/get-osinfo").await;
    let result = &osinfo.data()["result"];
    assert_eq!(result["id"], "nixos");
    assert_eq!(result["version-id"], "24.05");
    assert_eq!(result["pretty-name"], "NixOS 24.05 (Uakari)");
    let (_, before) = exec(&h, "readlink -f /run/current-system", "").await;

    let started = s
        .post(
            "/nodes/pve/qemu/9400/agent/exec",
            &[
                ("command", "nixos-rebuild"),
                ("command", "switch"),
                ("command", "--upgrade"),
            ],
        )
        .await;
    let pid = started.data()["pid"].to_string();
    let status = s
        .get(&format!("/nodes/pve/qemu/9400/agent/exec-status?pid={pid}"))
        .await;
    assert_eq!(status.data()["exitcode"], 0, "{:?}", status.data());
    assert!(
        status.data()["out-data"]
            .as_str()
            .unwrap()
            .starts_with("unpacking channels...\n")
    );
    let (_, version) = exec(&h, "nixos-version", "").await;
    assert_eq!(version, format!("{newer} (Simulated)\n"));
    let (_, after) = exec(&h, "readlink -f /run/current-system", "").await;
    assert_ne!(after, before);
    assert!(
        after
            .trim_end()
            .ends_with(&format!("-nixos-system-nixos-{newer}")),
        "{after}"
    );
    let osinfo = s.get("/nodes/pve/qemu/9400/agent/get-osinfo").await;
    assert_eq!(
        osinfo.data()["result"]["version-id"],
        "24.05",
        "the release stays"
    );
    // Without an upgrade, the same configuration builds the same system.
    let (code, _) = exec(&h, "nixos-rebuild switch", "").await;
    assert_eq!(code, 0);
    let (_, again) = exec(&h, "readlink -f /run/current-system", "").await;
    assert_eq!(again, after);
}
