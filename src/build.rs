//! Building one generation of an image on one node: what Packer does, as
//! steps of apply (DESIGN §7).
//!
//! create the build VM (ISO as CD-ROM, disk first in the boot order, OVMF
//! without pre-enrolled keys or SeaBIOS) → start → wait `boot_wait` → type
//! the access sequence with `sendkey` (`sudo -i`, then a one-time call-home
//! to nixgold that carries the VM's address and installs a per-build
//! ephemeral SSH key) → SSH in (host key pinned on first contact) → upload
//! and run the install script, streaming its output → reboot into the
//! installed system → verify (`nixos-version`, the system path, the
//! services asked for) → seal (machine-id, host keys, cloud-init state,
//! the build key) → power off → cloud-init drive in place of the ISO →
//! `POST …/template` → the final stamp, which carries the generation's
//! inputs and results so an interrupted apply can pick them up.
//!
//! A failed build destroys its VM unless `keep_failed_build` is set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pve_api::{Client, ConfigUpdate};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fleet::Bios;

/// Everything a build needs, decided by the planner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildWork {
    pub image: String,
    pub generation: u32,
    pub node: String,
    pub vmid: u32,
    /// `local:iso/…` of the pinned ISO on this node.
    pub iso_volid: String,
    pub iso_sha256: String,
    pub input_hash: String,
    /// Config of the build VM (create parameters, without description).
    pub vm_config: BTreeMap<String, String>,
    pub storage: String,
    pub configuration_nix: String,
    pub install_script: String,
    /// Services `systemctl is-active` must report.
    pub services: Vec<String>,
    pub boot_wait_secs: u64,
    pub timeout_secs: u64,
    pub ssh_timeout_secs: u64,
    pub key_interval_ms: u64,
    /// Where the call-home listener binds, and the address the VM uses.
    pub listen: String,
    pub advertise: Option<String>,
    pub fleet: String,
}

/// What a build leaves for the lockfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildResult {
    pub image: String,
    pub generation: u32,
    pub node: String,
    pub vmid: u32,
    pub input_hash: String,
    pub iso_sha256: String,
    pub nixos_version: String,
    pub system_path: String,
}

/// The stamp of a build VM while it is being built.
pub fn building_stamp(w: &BuildWork) -> String {
    format!(
        "nixgold: fleet={} resource=image.{} generation={} state=building inputs={}",
        w.fleet, w.image, w.generation, w.input_hash
    )
}

/// The stamp of a finished template: enough to record it in the lockfile.
pub fn template_stamp(r: &BuildResult, fleet: &str) -> String {
    format!(
        "nixgold: fleet={fleet} resource=image.{} generation={} inputs={} iso={} nixos={} system={}",
        r.image,
        r.generation,
        r.input_hash,
        r.iso_sha256,
        r.nixos_version.replace(' ', "_"),
        r.system_path
    )
}

/// QEMU key names for `text` on a US layout (shift chords for capitals
/// and symbols).
pub fn keys_for(text: &str) -> Result<Vec<String>, char> {
    text.chars()
        .map(|c| {
            let plain = |k: &str| Ok(k.to_owned());
            let shifted = |k: &str| Ok(format!("shift-{k}"));
            match c {
                'a'..='z' | '0'..='9' => Ok(c.to_string()),
                'A'..='Z' => shifted(&c.to_ascii_lowercase().to_string()),
                ' ' => plain("spc"),
                '\n' => plain("ret"),
                '-' => plain("minus"),
                '_' => shifted("minus"),
                '=' => plain("equal"),
                '+' => shifted("equal"),
                '/' => plain("slash"),
                '?' => shifted("slash"),
                '.' => plain("dot"),
                '>' => shifted("dot"),
                ',' => plain("comma"),
                '<' => shifted("comma"),
                ';' => plain("semicolon"),
                ':' => shifted("semicolon"),
                '\'' => plain("apostrophe"),
                '"' => shifted("apostrophe"),
                '[' => plain("bracket_left"),
                '{' => shifted("bracket_left"),
                ']' => plain("bracket_right"),
                '}' => shifted("bracket_right"),
                '\\' => plain("backslash"),
                '|' => shifted("backslash"),
                '`' => plain("grave_accent"),
                '~' => shifted("grave_accent"),
                '!' => shifted("1"),
                '@' => shifted("2"),
                '#' => shifted("3"),
                '$' => shifted("4"),
                '%' => shifted("5"),
                '^' => shifted("6"),
                '&' => shifted("7"),
                '*' => shifted("8"),
                '(' => shifted("9"),
                ')' => shifted("0"),
                other => Err(other),
            }
        })
        .collect()
}

/// The line typed to call home: it posts the VM's addresses and SSH port
/// (`NIXGOLD_SSH_PORT` is unset on a real installer, so 22) and runs the
/// returned script.
pub fn call_home_line(url: &str) -> String {
    format!("curl -fsS -d \"ip=$(hostname -I) port=${{NIXGOLD_SSH_PORT:-22}}\" {url} | sh\n")
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Api(#[from] pve_api::ApiError),
    #[error("{step}: {reason}")]
    Step { step: String, reason: String },
}

fn step_err(step: &str, reason: impl Into<String>) -> BuildError {
    BuildError::Step {
        step: step.to_owned(),
        reason: reason.into(),
    }
}

/// The address the build VM should call: configured, or the local address
/// this machine uses to reach the Proxmox endpoint.
pub fn advertise_address(w: &BuildWork, endpoint_host: &str) -> Result<String, BuildError> {
    if let Some(a) = &w.advertise {
        return Ok(a.clone());
    }
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")
        .map_err(|e| step_err("call-home address", e.to_string()))?;
    let target = if endpoint_host.contains(':') {
        endpoint_host.to_owned()
    } else {
        format!("{endpoint_host}:8006")
    };
    socket.connect(target).map_err(|e| {
        step_err(
            "call-home address",
            format!("cannot route to the Proxmox endpoint: {e}"),
        )
    })?;
    Ok(socket
        .local_addr()
        .map_err(|e| step_err("call-home address", e.to_string()))?
        .ip()
        .to_string())
}

/// A one-shot HTTP listener: the first POST to `/<token>` wins; it answers
/// with `script` and yields the posted body.
pub struct CallHome {
    pub url: String,
    body: tokio::sync::oneshot::Receiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CallHome {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CallHome {
    pub async fn listen(listen: &str, advertise: &str, script: String) -> Result<Self, BuildError> {
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            step_err(
                "call-home listener",
                format!("cannot listen on {listen}: {e}"),
            )
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| step_err("call-home listener", e.to_string()))?
            .port();
        let token: String = (0..24)
            .map(|_| format!("{:x}", rand::random::<u8>() % 16))
            .collect();
        let url = format!("http://{advertise}:{port}/{token}");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = vec![0u8; 16 * 1024];
                let Ok(n) = stream.read(&mut buf).await else {
                    continue;
                };
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let authorised = req.starts_with(&format!("POST /{token} "));
                let (status, body) = if authorised {
                    ("200 OK", script.as_str())
                } else {
                    ("404 Not Found", "")
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(resp.as_bytes()).await;
                if authorised && let Some(tx) = tx.take() {
                    let posted = req
                        .split_once("\r\n\r\n")
                        .map(|(_, b)| b.to_owned())
                        .unwrap_or_default();
                    let _ = tx.send(posted);
                }
            }
        });
        Ok(CallHome {
            url,
            body: rx,
            task,
        })
    }

    /// The VM's (address, SSH port) once it called.
    pub async fn wait(mut self, deadline: Duration) -> Result<(String, u16), BuildError> {
        let posted = tokio::time::timeout(deadline, &mut self.body)
            .await
            .map_err(|_| {
                step_err(
                    "call-home",
                    format!(
                        "the build VM did not call home within {}s: check that it can reach nixgold's listener (build.address.call_home)",
                        deadline.as_secs()
                    ),
                )
            })?
            .map_err(|_| step_err("call-home", "the listener stopped"))?;
        parse_call_home_body(&posted)
            .ok_or_else(|| step_err("call-home", format!("unexpected body {posted:?}")))
    }
}

/// `ip=10.0.0.5 fe80::1 port=22` → ("10.0.0.5", 22): the first IPv4.
pub fn parse_call_home_body(body: &str) -> Option<(String, u16)> {
    let ips = body.split("port=").next()?.trim().strip_prefix("ip=")?;
    let ip = ips.split_whitespace().find(|a| {
        a.parse::<std::net::Ipv4Addr>()
            .is_ok_and(|v4| !v4.is_link_local())
    })?;
    let port = body.split("port=").nth(1)?.trim().parse().ok()?;
    Some((ip.to_owned(), port))
}

/// An SSH session with the build VM; the host key is pinned on first
/// contact per phase (installer, installed system).
pub struct Ssh {
    handle: russh::client::Handle<Pin>,
}

struct Pin {
    seen: Arc<Mutex<Option<String>>>,
}

impl russh::client::Handler for Pin {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let text = format!("{key:?}");
        let mut seen = self.seen.lock().expect("pin");
        match seen.as_ref() {
            None => {
                *seen = Some(text);
                Ok(true)
            }
            Some(pinned) => Ok(*pinned == text),
        }
    }
}

impl Ssh {
    pub async fn connect(
        host: &str,
        port: u16,
        key: &russh::keys::PrivateKey,
        pin: Arc<Mutex<Option<String>>>,
    ) -> Result<Self, BuildError> {
        let config = Arc::new(russh::client::Config {
            inactivity_timeout: Some(Duration::from_secs(3600)),
            ..Default::default()
        });
        let mut handle = russh::client::connect(config, (host, port), Pin { seen: pin })
            .await
            .map_err(|e| step_err("ssh", format!("{host}:{port}: {e}")))?;
        let auth = handle
            .authenticate_publickey(
                "root",
                russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key.clone()), None),
            )
            .await
            .map_err(|e| step_err("ssh", e.to_string()))?;
        if !auth.success() {
            return Err(step_err(
                "ssh",
                format!("{host}:{port} refused the build key"),
            ));
        }
        Ok(Ssh { handle })
    }

    /// Runs `command` with `stdin`; returns (exit code, output). Each output
    /// line is also passed to `on_line`.
    pub async fn run(
        &self,
        command: &str,
        stdin: &str,
        mut on_line: impl FnMut(&str),
    ) -> Result<(u32, String), BuildError> {
        let mut ch = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| step_err("ssh", e.to_string()))?;
        ch.exec(true, command)
            .await
            .map_err(|e| step_err("ssh", e.to_string()))?;
        if !stdin.is_empty() {
            ch.data(stdin.as_bytes())
                .await
                .map_err(|e| step_err("ssh", e.to_string()))?;
        }
        ch.eof().await.map_err(|e| step_err("ssh", e.to_string()))?;
        let mut output = String::new();
        let mut code = None;
        while let Some(msg) = ch.wait().await {
            match msg {
                russh::ChannelMsg::Data { data } => {
                    let text = String::from_utf8_lossy(&data);
                    for line in text.lines() {
                        on_line(line);
                    }
                    output.push_str(&text);
                }
                russh::ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status),
                _ => {}
            }
        }
        Ok((code.unwrap_or(255), output))
    }
}

/// Types `text` on the VM's console, one `sendkey` per key.
pub async fn type_text(
    client: &Client,
    node: &str,
    vmid: u32,
    text: &str,
    interval: Duration,
) -> Result<(), BuildError> {
    let keys = keys_for(text).map_err(|c| step_err("type", format!("no key for {c:?}")))?;
    for key in keys {
        client.sendkey(node, vmid, &key).await?;
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
    }
    Ok(())
}

/// The build VM's create parameters.
pub fn build_vm_config(
    hw: &crate::fleet::Hardware,
    name: &str,
    iso_volid: &str,
) -> BTreeMap<String, String> {
    let gib = hw.disk.mib().div_ceil(1024);
    let mut c = BTreeMap::new();
    c.insert("name".into(), name.to_owned());
    c.insert("cores".into(), hw.cores.to_string());
    c.insert("sockets".into(), hw.sockets.to_string());
    c.insert("memory".into(), hw.memory.to_string());
    c.insert("cpu".into(), hw.cpu.clone());
    c.insert("machine".into(), hw.machine.clone());
    c.insert("scsihw".into(), hw.scsihw.clone());
    c.insert("ostype".into(), "l26".into());
    c.insert("agent".into(), "1".into());
    let mut net = format!("virtio,bridge={}", hw.bridge);
    if let Some(tag) = hw.vlan {
        net.push_str(&format!(",tag={tag}"));
    }
    c.insert("net0".into(), net);
    c.insert("scsi0".into(), format!("{}:{gib}", hw.storage));
    c.insert("ide2".into(), format!("{iso_volid},media=cdrom"));
    c.insert("boot".into(), "order=scsi0;ide2".into());
    match hw.bios {
        Bios::Ovmf => {
            c.insert("bios".into(), "ovmf".into());
            c.insert(
                "efidisk0".into(),
                format!("{}:1,efitype=4m,pre-enrolled-keys=0", hw.storage),
            );
        }
        Bios::Seabios => {
            c.insert("bios".into(), "seabios".into());
        }
    }
    c
}

/// Progress of a build, one line per step or install output line.
pub type Progress<'a> = &'a (dyn Fn(&str) + Sync);

/// Runs the pipeline. The build VM must not exist (the caller cleans up).
pub async fn run(
    client: &Client,
    endpoint_host: &str,
    w: &BuildWork,
    progress: Progress<'_>,
) -> Result<BuildResult, BuildError> {
    let deadline = Instant::now() + Duration::from_secs(w.timeout_secs);
    let task_wait = |remaining: Instant| remaining.saturating_duration_since(Instant::now());
    // A task still running at the build's deadline is stopped, so it does
    // not hold the VM while the build VM is cleaned up.
    let wait = |upid: pve_api::Upid| async move {
        let result = client.wait_task_for(&upid, task_wait(deadline)).await;
        if let Err(pve_api::ApiError::TaskTimeout { .. }) = &result {
            let _ = client.stop_task(&upid).await;
        }
        result.map(|_| ())
    };

    progress("create the build VM");
    let mut config = w.vm_config.clone();
    config.insert("description".into(), building_stamp(w));
    wait(client.create_vm(&w.node, w.vmid, &config).await?).await?;
    progress("start it from the installer ISO");
    wait(client.start(&w.node, w.vmid).await?).await?;

    // The per-build key and the call-home that installs it.
    let key = russh::keys::PrivateKey::random(&mut rand10::rng(), russh::keys::Algorithm::Ed25519)
        .map_err(|e| step_err("key", e.to_string()))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| step_err("key", e.to_string()))?;
    let script = format!(
        "mkdir -p /root/.ssh\nchmod 700 /root/.ssh\necho '{public} nixgold-build' >> /root/.ssh/authorized_keys\nchmod 600 /root/.ssh/authorized_keys\n"
    );
    let advertise = advertise_address(w, endpoint_host)?;
    let call_home = CallHome::listen(&w.listen, &advertise, script).await?;
    progress(&format!(
        "wait {}s for the installer to boot",
        w.boot_wait_secs
    ));
    tokio::time::sleep(Duration::from_secs(w.boot_wait_secs)).await;
    progress("type the access sequence");
    let interval = Duration::from_millis(w.key_interval_ms);
    type_text(client, &w.node, w.vmid, "sudo -i\n", interval).await?;
    type_text(
        client,
        &w.node,
        w.vmid,
        &call_home_line(&call_home.url),
        interval,
    )
    .await?;
    let (host, port) = call_home
        .wait(Duration::from_secs(w.ssh_timeout_secs))
        .await?;
    progress(&format!("the VM called home from {host}; connect over SSH"));
    // Each system (installer, installed) pins its own host key on first contact.
    let connect = || {
        connect_retry(
            &host,
            port,
            &key,
            Arc::new(Mutex::new(None)),
            Duration::from_secs(w.ssh_timeout_secs),
        )
    };
    let ssh = connect().await?;
    let (code, out) = ssh
        .run(
            "mkdir -p /tmp/nixgold && cat > /tmp/nixgold/configuration.nix",
            &w.configuration_nix,
            |_| {},
        )
        .await?;
    check("upload configuration.nix", code, &out)?;
    let (code, out) = ssh
        .run("cat > /tmp/nixgold/install.sh", &w.install_script, |_| {})
        .await?;
    check("upload install.sh", code, &out)?;
    progress("install NixOS");
    let (code, out) = ssh
        .run(
            "bash /tmp/nixgold/install.sh /tmp/nixgold/configuration.nix",
            "",
            |l| progress(&format!("  | {l}")),
        )
        .await?;
    check("install", code, &out)?;
    let _ = ssh.run("reboot", "", |_| {}).await;
    drop(ssh);

    progress("reboot into the installed system");
    let ssh = connect().await?;
    let (code, version) = ssh.run("nixos-version", "", |_| {}).await?;
    check("nixos-version", code, &version)?;
    let (code, system) = ssh
        .run("readlink -f /run/current-system", "", |_| {})
        .await?;
    check("read the system path", code, &system)?;
    if !w.services.is_empty() {
        let (code, states) = ssh
            .run(
                &format!("systemctl is-active {}", w.services.join(" ")),
                "",
                |_| {},
            )
            .await?;
        let inactive: Vec<String> = w
            .services
            .iter()
            .zip(states.lines().chain(std::iter::repeat("unknown")))
            .filter(|(_, s)| *s != "active")
            .map(|(svc, s)| format!("{svc} is {s}"))
            .collect();
        if code != 0 || !inactive.is_empty() {
            return Err(step_err("verify services", inactive.join(", ")));
        }
    }
    progress("seal: machine-id, host keys, cloud-init state, build key");
    let (code, out) = ssh
        .run(
            "truncate -s 0 /etc/machine-id && rm -f /etc/ssh/ssh_host_* && cloud-init clean --logs && rm -f /root/.ssh/authorized_keys",
            "",
            |_| {},
        )
        .await?;
    check("seal", code, &out)?;
    let _ = ssh.run("poweroff", "", |_| {}).await;
    drop(ssh);

    progress("wait for power-off");
    loop {
        if !client.vm_status(&w.node, w.vmid).await?.is_running() {
            break;
        }
        if Instant::now() > deadline {
            return Err(step_err("power-off", "the build VM did not power off"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let result = BuildResult {
        image: w.image.clone(),
        generation: w.generation,
        node: w.node.clone(),
        vmid: w.vmid,
        input_hash: w.input_hash.clone(),
        iso_sha256: w.iso_sha256.clone(),
        nixos_version: version.trim().to_owned(),
        system_path: system.trim().to_owned(),
    };
    progress("replace the ISO with a cloud-init drive, convert to a template");
    let detach = ConfigUpdate {
        set: BTreeMap::new(),
        delete: vec!["ide2".into()],
        digest: None,
    };
    client.update_config_sync(&w.node, w.vmid, &detach).await?;
    let attach = ConfigUpdate {
        set: BTreeMap::from([
            ("ide2".to_owned(), format!("{}:cloudinit", w.storage)),
            ("description".to_owned(), template_stamp(&result, &w.fleet)),
        ]),
        delete: Vec::new(),
        digest: None,
    };
    client.update_config_sync(&w.node, w.vmid, &attach).await?;
    wait(client.template(&w.node, w.vmid).await?).await?;
    Ok(result)
}

async fn connect_retry(
    host: &str,
    port: u16,
    key: &russh::keys::PrivateKey,
    pin: Arc<Mutex<Option<String>>>,
    deadline: Duration,
) -> Result<Ssh, BuildError> {
    let until = Instant::now() + deadline;
    let mut delay = Duration::from_millis(100);
    loop {
        match Ssh::connect(host, port, key, pin.clone()).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > until => return Err(e),
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(3));
            }
        }
    }
}

fn check(step: &str, code: u32, output: &str) -> Result<(), BuildError> {
    if code == 0 {
        return Ok(());
    }
    let tail: Vec<&str> = output
        .lines()
        .rev()
        .take(10)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(step_err(step, format!("exit {code}: {}", tail.join(" | "))))
}

/// Reads a finished template's stamp back into a result (an apply that was
/// interrupted after the build but before writing the lockfile).
pub fn result_from_stamp(description: &str, node: &str, vmid: u32) -> Option<BuildResult> {
    let stamp = crate::plan::read_stamp(description)?;
    if stamp.contains_key("state") {
        return None;
    }
    Some(BuildResult {
        image: stamp.get("resource")?.strip_prefix("image.")?.to_owned(),
        generation: stamp.get("generation")?.parse().ok()?,
        node: node.to_owned(),
        vmid,
        input_hash: stamp.get("inputs")?.clone(),
        iso_sha256: stamp.get("iso")?.clone(),
        nixos_version: stamp.get("nixos")?.replace('_', " "),
        system_path: stamp.get("system")?.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_sequence_types_with_shift_chords() {
        let keys = keys_for("A:\"$(x)\"|\n").unwrap();
        assert_eq!(
            keys,
            [
                "shift-a",
                "shift-semicolon",
                "shift-apostrophe",
                "shift-4",
                "shift-9",
                "x",
                "shift-0",
                "shift-apostrophe",
                "shift-backslash",
                "ret"
            ]
        );
        assert!(keys_for("é").is_err());
        assert!(keys_for(&call_home_line("http://10.0.0.1:4242/abc")).is_ok());
    }

    #[test]
    fn call_home_bodies_give_the_first_routable_ipv4() {
        assert_eq!(
            parse_call_home_body("ip=169.254.3.4 10.0.0.5 fe80::1  port=22"),
            Some(("10.0.0.5".into(), 22))
        );
        assert_eq!(parse_call_home_body("garbage"), None);
    }

    #[test]
    fn finished_stamps_round_trip() {
        let r = BuildResult {
            image: "golden".into(),
            generation: 2,
            node: "pve".into(),
            vmid: 9401,
            input_hash: "abc".into(),
            iso_sha256: "def".into(),
            nixos_version: "24.05.1 (Uakari)".into(),
            system_path: "/nix/store/x-nixos-system".into(),
        };
        assert_eq!(
            result_from_stamp(&template_stamp(&r, "homelab"), "pve", 9401),
            Some(r)
        );
    }
}
