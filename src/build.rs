//! Building one generation of an image on one node: what Packer does, as
//! steps of apply (DESIGN §7), each with its own deadline
//! (`build.timeouts`, all capped by `build.timeout`):
//!
//! 1. create the build VM (ISO as CD-ROM, disk first in the boot order,
//!    OVMF without pre-enrolled keys or SeaBIOS);
//! 2. start it;
//! 3. access: wait `boot_wait`, type the access sequence with `sendkey`
//!    (`sudo -i`; then either a per-build call-home to nixgold that carries
//!    the VM's address and installs a per-build ephemeral SSH key, or a
//!    static address and the key), retyped until the VM answers; SSH in
//!    (host key pinned on first contact);
//! 4. upload and run the install script, streaming its output;
//! 5. reboot into the installed system (a static address is put back
//!    through the guest agent, for that boot only) and SSH in again;
//! 6. verify (`nixos-version`, the system path, the services asked for);
//! 7. seal (machine-id, host keys, cloud-init state, the build key);
//! 8. power off;
//! 9. cloud-init drive in place of the ISO → `POST …/template` → the final
//!    stamp, which carries the generation's inputs and results so an
//!    interrupted apply can pick them up.
//!
//! A failed build destroys its VM unless `keep_failed_build` is set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pve_api::{Client, ConfigUpdate};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fleet::{Bios, StepTimeouts};
use crate::stamp::Stamp;

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
    pub boot_wait_ms: u64,
    /// Deadline of the whole build.
    pub timeout_secs: u64,
    pub timeouts: StepTimeouts,
    pub key_interval_ms: u64,
    pub access: Access,
    /// The image runs qemu-guest-agent: after the reboot nixgold asks it
    /// for the installed system's address.
    pub guest_agent: bool,
    pub fleet: String,
}

/// How nixgold reaches the build VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// The installer posts its address to a per-build listener: where it
    /// binds, and the address the VM is told.
    CallHome {
        listen: String,
        advertise: Option<String>,
    },
    /// A fixed address (`a.b.c.d/len`) typed into the installer and set
    /// again through the guest agent after the reboot.
    Static {
        address: String,
        gateway: Option<String>,
        ssh_port: u16,
    },
}

impl Access {
    /// The same access for a build on the embedded simulator, whose guests
    /// live on this machine: the call-home listener binds loopback, and a
    /// static build address `a.b.c.d/len` becomes `127.b.c.d/8` at the
    /// simulator's guest SSH port.
    pub fn localise(&mut self, guest_port: u16) {
        match self {
            Access::CallHome { listen, advertise } => {
                *listen = "127.0.0.1:0".to_owned();
                *advertise = Some("127.0.0.1".to_owned());
            }
            Access::Static {
                address,
                gateway,
                ssh_port,
            } => {
                let host = address.split('/').next().unwrap_or_default();
                let octets: Vec<&str> = host.split('.').skip(1).collect();
                *address = format!("127.{}/8", octets.join("."));
                *gateway = None;
                *ssh_port = guest_port;
            }
        }
    }
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
    Stamp {
        fleet: w.fleet.clone(),
        resource: format!("image.{}", w.image),
        generation: Some(w.generation),
        building: true,
        inputs: Some(w.input_hash.clone()),
        ..Stamp::default()
    }
    .to_string()
}

/// The stamp of a finished template: enough to record it in the lockfile.
pub fn template_stamp(r: &BuildResult, fleet: &str) -> String {
    Stamp {
        fleet: fleet.to_owned(),
        resource: format!("image.{}", r.image),
        generation: Some(r.generation),
        inputs: Some(r.input_hash.clone()),
        iso: Some(r.iso_sha256.clone()),
        nixos: Some(r.nixos_version.clone()),
        system: Some(r.system_path.clone()),
        ..Stamp::default()
    }
    .to_string()
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
    /// A step failed at, or ran past, its deadline (named by the hint).
    #[error("{} ({hint})", .cause.as_deref().map_or("did not finish in time".to_owned(), ToString::to_string))]
    Deadline {
        cause: Option<Box<BuildError>>,
        hint: String,
    },
}

fn step_err(step: &str, reason: impl Into<String>) -> BuildError {
    BuildError::Step {
        step: step.to_owned(),
        reason: reason.into(),
    }
}

/// The local address this machine uses to reach the Proxmox endpoint: the
/// address the build VM calls unless `advertise` says otherwise.
pub fn advertise_address(endpoint_host: &str) -> Result<String, BuildError> {
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

/// A call-home listener for one build: every POST to `/<token>` is
/// answered with `script` and yields the posted body (a retyped access
/// sequence calls again); anything else is a 404.
pub struct CallHome {
    pub url: String,
    bodies: tokio::sync::mpsc::UnboundedReceiver<String>,
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
        let token = crate::ids::random_hex(24);
        let url = format!("http://{advertise}:{port}/{token}");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
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
                if authorised {
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
            bodies: rx,
            task,
        })
    }

    /// The VM's (address, SSH port) once it called, if it does `within`.
    pub async fn wait(&mut self, within: Duration) -> Result<(String, u16), BuildError> {
        let posted = tokio::time::timeout(within, self.bodies.recv())
            .await
            .map_err(|_| step_err("call-home", "no call yet"))?
            .ok_or_else(|| step_err("call-home", "the listener stopped"))?;
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
        let program = command.split_whitespace().next().unwrap_or(command);
        let code = code.ok_or_else(|| {
            step_err(
                "ssh",
                format!("the connection closed before `{program}` finished"),
            )
        })?;
        Ok((code, output))
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

/// The steps of a build, in order; each is a step of the apply executor
/// with its own deadline (`build.timeouts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Create,
    Start,
    Access,
    Install,
    Reboot,
    Verify,
    Seal,
    PowerOff,
    Template,
}

impl Step {
    pub const ALL: [Step; 9] = [
        Step::Create,
        Step::Start,
        Step::Access,
        Step::Install,
        Step::Reboot,
        Step::Verify,
        Step::Seal,
        Step::PowerOff,
        Step::Template,
    ];

    /// The step's key in `build.timeouts`.
    pub fn key(self) -> &'static str {
        match self {
            Step::Create => "create",
            Step::Start => "start",
            Step::Access => "access",
            Step::Install => "install",
            Step::Reboot => "reboot",
            Step::Verify => "verify",
            Step::Seal => "seal",
            Step::PowerOff => "power_off",
            Step::Template => "template",
        }
    }

    /// The step's position in a build, from 1 (shown as `N/9`).
    pub fn number(self) -> usize {
        Step::ALL
            .iter()
            .position(|s| *s == self)
            .map_or(0, |i| i + 1)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Step::Create => "create the build VM",
            Step::Start => "start it from the installer ISO",
            Step::Access => "get SSH access to the installer",
            Step::Install => "install NixOS",
            Step::Reboot => "reboot into the installed system",
            Step::Verify => "verify the installed system",
            Step::Seal => "seal (machine-id, host keys, cloud-init state, build key)",
            Step::PowerOff => "power off",
            Step::Template => "swap the ISO for a cloud-init drive, convert to a template",
        }
    }
}

impl Step {
    /// This step's deadline in `build.timeouts`.
    pub fn timeout(self, t: &StepTimeouts) -> Duration {
        match self {
            Step::Create => t.create,
            Step::Start => t.start,
            Step::Access => t.access,
            Step::Install => t.install,
            Step::Reboot => t.reboot,
            Step::Verify => t.verify,
            Step::Seal => t.seal,
            Step::PowerOff => t.power_off,
            Step::Template => t.template,
        }
        .get()
    }
}

/// What a build reports while it runs.
#[derive(Debug, Clone, Copy)]
pub enum BuildEvent<'a> {
    Started(Step),
    Finished(Step, Duration),
    /// A note of the running step, or a line of the install's output.
    Line(&'a str),
}

pub type Observer<'a> = &'a (dyn Fn(BuildEvent<'_>) + Sync);

/// The line typed (and, after the reboot, run through the guest agent)
/// that puts a static build address on the first Ethernet link.
/// Idempotent: `replace` instead of `add`.
pub fn static_address_line(address: &str, gateway: Option<&str>) -> String {
    let mut line =
        format!("d=$(ls /sys/class/net|grep -m1 ^en);ip l set $d up;ip a replace {address} dev $d");
    if let Some(gw) = gateway {
        line.push_str(&format!(";ip r replace default via {gw}"));
    }
    line.push('\n');
    line
}

/// What verify runs on the installed system: the NixOS version, the
/// system's store path, and the services' states (followed by their names).
pub const VERIFY_VERSION: &str = "nixos-version";
pub const VERIFY_SYSTEM: &str = "readlink -f /run/current-system";
pub const VERIFY_SERVICES: &str = "systemctl is-active";

/// The units verify asks `systemctl is-active` for, by what the image
/// enables: sshd (its socket, when extra_config makes sshd
/// socket-activated with `services.openssh.startWhenNeeded = true`,
/// nixos/modules/services/networking/ssh/sshd.nix), the guest agent,
/// cloud-init. cloud-init's stages after `cloud-init.service` are left
/// out: without a datasource (the build VM has none) cloud-final warns
/// "Used fallback datasource" and exits 2, which NixOS's unit (no
/// SuccessExitStatus) reports as failed on a healthy image (docs/nixos.md).
pub fn verified_services(name: &str, image: &crate::fleet::Image) -> Vec<String> {
    let nixos = &image.nixos;
    let socket = pve_sim::nixos::literal(
        &crate::nixos::configuration_nix(name, image),
        "services.openssh.startWhenNeeded",
    ) == Some(pve_sim::nixos::eval::Value::Bool(true));
    [
        (
            nixos.openssh.enable,
            if socket { "sshd.socket" } else { "sshd" },
        ),
        (nixos.guest_agent, "qemu-guest-agent"),
        (nixos.cloud_init, "cloud-init"),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .map(|(_, s)| s.to_owned())
    .collect()
}

/// What sealing runs on the installed system. cloud-init's state goes by
/// path (what `cloud-init clean --logs` removes, canonical/cloud-init:
/// cloudinit/cmd/clean.py `remove_artifacts`: its logs and
/// /var/lib/cloud): NixOS puts the `cloud-init` program only on the path of
/// its own units (nixos/modules/services/system/cloud-init.nix), and the
/// paths simply do not exist on an image without cloud-init.
pub const SEAL: &str = "truncate -s 0 /etc/machine-id && rm -f /etc/ssh/ssh_host_* && rm -rf /var/lib/cloud /var/log/cloud-init.log /var/log/cloud-init-output.log && rm -f /root/.ssh/authorized_keys";

/// The commands that authorise the per-build key for root.
fn key_commands(public: &str) -> [String; 4] {
    [
        "mkdir -p /root/.ssh".to_owned(),
        "chmod 700 /root/.ssh".to_owned(),
        format!("echo '{public} nixgold-build' >> /root/.ssh/authorized_keys"),
        "chmod 600 /root/.ssh/authorized_keys".to_owned(),
    ]
}

/// Headroom after a step's deadline, so the step's own handling of it
/// (stopping a running Proxmox task) comes first.
const GRACE: Duration = Duration::from_secs(5);

/// Runs the pipeline. The build VM must not exist (the caller cleans up).
pub async fn run(
    client: &Client,
    endpoint_host: &str,
    w: &BuildWork,
    observe: Observer<'_>,
) -> Result<BuildResult, BuildError> {
    let key = russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
        .map_err(|e| step_err("key", e.to_string()))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| step_err("key", e.to_string()))?;
    let started = Instant::now();
    let mut b = Build {
        client,
        endpoint_host,
        w,
        observe,
        key,
        public,
        step_deadline: started,
        target: None,
        pin: Arc::new(Mutex::new(None)),
        ssh: None,
        version: String::new(),
        system: String::new(),
    };
    let build_deadline = started + Duration::from_secs(w.timeout_secs);
    for step in Step::ALL {
        let now = Instant::now();
        let own = step.timeout(&w.timeouts);
        let left = build_deadline.saturating_duration_since(now);
        let (limit, setting) = if own <= left {
            (
                own,
                format!("build.timeouts.{} = {}s", step.key(), own.as_secs()),
            )
        } else {
            (
                left,
                format!("build.timeout = {}s for the whole build", w.timeout_secs),
            )
        };
        b.step_deadline = now + limit;
        observe(BuildEvent::Started(step));
        let hint = || format!("the deadline is {setting}");
        match tokio::time::timeout(limit + GRACE, b.step(step)).await {
            Ok(Ok(())) => observe(BuildEvent::Finished(step, now.elapsed())),
            Ok(Err(e)) if Instant::now() >= b.step_deadline => {
                return Err(BuildError::Deadline {
                    cause: Some(Box::new(e)),
                    hint: hint(),
                });
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(BuildError::Deadline {
                    cause: None,
                    hint: hint(),
                });
            }
        }
    }
    Ok(b.result())
}

/// The state a build carries from step to step.
struct Build<'a> {
    client: &'a Client,
    endpoint_host: &'a str,
    w: &'a BuildWork,
    observe: Observer<'a>,
    /// The per-build key and its public half.
    key: russh::keys::PrivateKey,
    public: String,
    /// When the running step must be done.
    step_deadline: Instant,
    /// Where the VM answers SSH, once known.
    target: Option<(String, u16)>,
    /// The host key of the system being talked to, pinned on first contact
    /// (the installer's, then — after the reboot — the installed system's).
    pin: Arc<Mutex<Option<String>>>,
    ssh: Option<Ssh>,
    version: String,
    system: String,
}

impl Build<'_> {
    fn note(&self, line: &str) {
        (self.observe)(BuildEvent::Line(line));
    }

    fn left(&self) -> Duration {
        self.step_deadline.saturating_duration_since(Instant::now())
    }

    /// Waits for a task; one still running at the step's deadline is
    /// stopped, so it does not hold the VM while the VM is cleaned up.
    async fn wait(&self, upid: pve_api::Upid) -> Result<(), BuildError> {
        self.wait_task(upid).await.map_err(BuildError::from)
    }

    /// [`Build::wait`], keeping Proxmox's error (for [`Build::contended`]).
    async fn wait_task(&self, upid: pve_api::Upid) -> Result<(), pve_api::ApiError> {
        let result = self.client.wait_task_for(&upid, self.left()).await;
        if let Err(pve_api::ApiError::TaskTimeout { .. }) = &result {
            let _ = self.client.stop_task(&upid).await;
        }
        result.map(|_| ())
    }

    /// Runs a config write (or the conversion) again while Proxmox reports
    /// lock contention ("can't lock file … got timeout": a backup, a
    /// replication or another task holds the VM), with backoff, until the
    /// step's deadline — a finished install is not thrown away for it.
    async fn contended<F, Fut>(&self, what: &str, mut f: F) -> Result<(), BuildError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), pve_api::ApiError>>,
    {
        let mut delay = Duration::from_millis(500);
        loop {
            match f().await {
                Err(e) if e.is_lock_contention() && self.left() > delay => {
                    self.note(&format!(
                        "{what}: {e}; retrying in {}s",
                        delay.as_secs_f32()
                    ));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
                other => return other.map_err(BuildError::from),
            }
        }
    }

    fn ssh(&self) -> Result<&Ssh, BuildError> {
        self.ssh
            .as_ref()
            .ok_or_else(|| step_err("ssh", "no session"))
    }

    /// Runs `command` over SSH and fails the step on a non-zero exit.
    async fn run_checked(
        &self,
        what: &str,
        command: &str,
        stdin: &str,
    ) -> Result<String, BuildError> {
        let (code, out) = self.ssh()?.run(command, stdin, |_| {}).await?;
        check(what, code, &out)?;
        Ok(out)
    }

    async fn step(&mut self, step: Step) -> Result<(), BuildError> {
        let (client, w) = (self.client, self.w);
        match step {
            Step::Create => {
                let mut config = w.vm_config.clone();
                config.insert("description".into(), building_stamp(w));
                self.wait(client.create_vm(&w.node, w.vmid, &config).await?)
                    .await
            }
            Step::Start => self.wait(client.start(&w.node, w.vmid).await?).await,
            Step::Access => self.access().await,
            Step::Install => {
                self.run_checked(
                    "upload configuration.nix",
                    "mkdir -p /tmp/nixgold && cat > /tmp/nixgold/configuration.nix",
                    &w.configuration_nix,
                )
                .await?;
                self.run_checked(
                    "upload install.sh",
                    "cat > /tmp/nixgold/install.sh",
                    &w.install_script,
                )
                .await?;
                let observe = self.observe;
                let (code, out) = self
                    .ssh()?
                    .run(
                        "bash /tmp/nixgold/install.sh /tmp/nixgold/configuration.nix",
                        "",
                        |l| observe(BuildEvent::Line(&format!("  | {l}"))),
                    )
                    .await?;
                check("install", code, &out)
            }
            Step::Reboot => {
                if let Some(ssh) = self.ssh.take() {
                    let _ = ssh.run("reboot", "", |_| {}).await;
                }
                self.pin = Arc::new(Mutex::new(None));
                match &w.access {
                    Access::Static {
                        address, gateway, ..
                    } => {
                        self.address_through_agent(&static_address_line(
                            address,
                            gateway.as_deref(),
                        ))
                        .await?
                    }
                    // DHCP may give the installed system another address
                    // than the installer had: its agent says which.
                    Access::CallHome { .. } if w.guest_agent => self.address_from_agent().await?,
                    Access::CallHome { .. } => {
                        return self.connect(self.left()).await.map_err(|e| {
                            step_err(
                                "ssh",
                                format!(
                                    "{e}; if DHCP gave the installed system another address, enable nixos.guest_agent so nixgold can ask it"
                                ),
                            )
                        });
                    }
                }
                self.connect(self.left()).await
            }
            Step::Verify => self.verify().await,
            Step::Seal => self.run_checked("seal", SEAL, "").await.map(drop),
            Step::PowerOff => {
                if let Some(ssh) = self.ssh.take() {
                    let _ = ssh.run("poweroff", "", |_| {}).await;
                }
                while client.vm_status(&w.node, w.vmid).await?.is_running() {
                    if Instant::now() >= self.step_deadline {
                        return Err(step_err("power-off", "the build VM did not power off"));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(())
            }
            Step::Template => {
                let detach = ConfigUpdate {
                    set: BTreeMap::new(),
                    delete: vec!["ide2".into()],
                    digest: None,
                };
                self.contended("detach the ISO", || {
                    client.update_config_sync(&w.node, w.vmid, &detach)
                })
                .await?;
                let attach = ConfigUpdate {
                    set: BTreeMap::from([
                        ("ide2".to_owned(), format!("{}:cloudinit", w.storage)),
                        (
                            "description".to_owned(),
                            template_stamp(&self.result(), &w.fleet),
                        ),
                    ]),
                    delete: Vec::new(),
                    digest: None,
                };
                self.contended("attach the cloud-init drive", || {
                    client.update_config_sync(&w.node, w.vmid, &attach)
                })
                .await?;
                self.contended("convert to a template", || async {
                    self.wait_task(client.template(&w.node, w.vmid).await?)
                        .await
                })
                .await
            }
        }
    }

    /// boot_wait, then the access sequence typed until the VM answers
    /// (call-home received, or SSH up on the static address), retyped
    /// after each quiet window: keys typed before the console was ready
    /// are lost, and every typed line is idempotent.
    async fn access(&mut self) -> Result<(), BuildError> {
        let w = self.w;
        let boot_wait = Duration::from_millis(w.boot_wait_ms);
        self.note(&format!(
            "wait {} for the installer to boot",
            humantime::format_duration(boot_wait)
        ));
        tokio::time::sleep(boot_wait.min(self.left())).await;
        let window = (Step::Access.timeout(&w.timeouts) / 4).max(Duration::from_secs(1));
        let mut lines = vec!["sudo -i\n".to_owned()];
        // What answers once the sequence worked.
        enum Answer {
            CallHome(CallHome),
            Ssh(String, u16),
        }
        let mut answer = match &w.access {
            Access::CallHome { listen, advertise } => {
                let script = key_commands(&self.public).join("\n") + "\n";
                let advertise = match advertise {
                    Some(a) => a.clone(),
                    None => advertise_address(self.endpoint_host)?,
                };
                let call_home = CallHome::listen(listen, &advertise, script).await?;
                lines.push(call_home_line(&call_home.url));
                Answer::CallHome(call_home)
            }
            Access::Static {
                address,
                gateway,
                ssh_port,
            } => {
                lines.push(static_address_line(address, gateway.as_deref()));
                lines.push(key_commands(&self.public).join(";") + "\n");
                let host = address.split('/').next().unwrap_or(address);
                Answer::Ssh(host.to_owned(), *ssh_port)
            }
        };
        let mut typed = 0;
        loop {
            typed += 1;
            self.note(if typed == 1 {
                "type the access sequence"
            } else {
                "no answer yet: type the access sequence again"
            });
            for line in &lines {
                type_text(
                    self.client,
                    &w.node,
                    w.vmid,
                    line,
                    Duration::from_millis(w.key_interval_ms),
                )
                .await?;
            }
            let quiet = window.min(self.left());
            let outcome = match &mut answer {
                Answer::CallHome(call_home) => match call_home.wait(quiet).await {
                    Ok((host, port)) => {
                        self.note(&format!("the VM called home from {host}"));
                        self.target = Some((host, port));
                        // sshd already runs on the installer: if it does
                        // not take the key now, the sequence went wrong.
                        self.connect(quiet.min(self.left())).await
                    }
                    Err(e) => Err(e),
                },
                Answer::Ssh(host, port) => {
                    self.target = Some((host.clone(), *port));
                    self.connect(quiet).await
                }
            };
            let Err(e) = outcome else {
                return Ok(());
            };
            if Instant::now() < self.step_deadline {
                continue;
            }
            let what = match (&answer, &self.target) {
                (Answer::CallHome(_), Some((host, _))) => format!(
                    "the build VM called home from {host}, but SSH did not take the build key (the typed sequence went wrong?); last error: {e}"
                ),
                (Answer::CallHome(_), None) => "the build VM did not call home: check that it can reach nixgold's listener (build.address.call_home), or raise build.boot_wait".to_owned(),
                (Answer::Ssh(host, _), _) => format!(
                    "no SSH on the static build address {host}: check that the address is free and reachable from nixgold, or raise build.boot_wait; last error: {e}"
                ),
            };
            return Err(step_err(
                "access",
                format!("{what} (typed the access sequence {typed} times)"),
            ));
        }
    }

    /// SSH to the target, pinning the host key of the system that answers.
    async fn connect(&mut self, within: Duration) -> Result<(), BuildError> {
        let (host, port) = self
            .target
            .clone()
            .ok_or_else(|| step_err("ssh", "the VM's address is unknown"))?;
        self.ssh = Some(connect_retry(&host, port, &self.key, self.pin.clone(), within).await?);
        Ok(())
    }

    /// After the reboot, the installed system has no build address (it is
    /// not part of the template): the guest agent puts it back, for this
    /// boot only.
    async fn address_through_agent(&self, line: &str) -> Result<(), BuildError> {
        let (client, w) = (self.client, self.w);
        self.wait_for_agent().await?;
        self.note("set the build address through the guest agent");
        let command = [
            "/run/current-system/sw/bin/sh".to_owned(),
            "-c".to_owned(),
            format!("PATH=/run/current-system/sw/bin:$PATH;{}", line.trim_end()),
        ];
        let exit = client
            .agent_run(&w.node, w.vmid, &command, self.left())
            .await?;
        check(
            "set the build address through the guest agent",
            exit.code,
            &format!("{}{}", exit.out, exit.err),
        )
    }

    /// After the reboot of a call-home build: the installed system's
    /// address as its agent reports it — the installer's, if it still has
    /// that one, else its first other IPv4 address — once it has one.
    async fn address_from_agent(&mut self) -> Result<(), BuildError> {
        let (client, w) = (self.client, self.w);
        self.wait_for_agent().await?;
        let (old, port) = self
            .target
            .clone()
            .ok_or_else(|| step_err("ssh", "the VM's address is unknown"))?;
        loop {
            let interfaces = client.agent_interfaces(&w.node, w.vmid).await?;
            let addresses: Vec<String> = interfaces
                .iter()
                .filter(|i| i.name != "lo")
                .flat_map(|i| &i.ip_addresses)
                .filter_map(|a| a.ip_address.parse::<std::net::Ipv4Addr>().ok())
                .filter(|a| !a.is_link_local())
                .map(|a| a.to_string())
                .collect();
            let host = addresses.iter().find(|a| **a == old).or(addresses.first());
            if let Some(host) = host {
                if *host != old {
                    self.note(&format!(
                        "the installed system is at {host} (the installer was at {old})"
                    ));
                }
                self.target = Some((host.clone(), port));
                return Ok(());
            }
            if Instant::now() >= self.step_deadline {
                return Err(step_err(
                    "guest agent",
                    "the installed system's guest agent reports no IPv4 address",
                ));
            }
            tokio::time::sleep(Duration::from_secs(1).min(self.left())).await;
        }
    }

    /// Polls `agent/ping` until the installed system's agent answers.
    async fn wait_for_agent(&self) -> Result<(), BuildError> {
        let (client, w) = (self.client, self.w);
        self.note("wait for the installed system's guest agent");
        loop {
            match client.agent_ping(&w.node, w.vmid).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= self.step_deadline => {
                    return Err(step_err(
                        "guest agent",
                        format!("the installed system's guest agent did not answer: {e}"),
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(1).min(self.left())).await,
            }
        }
    }

    async fn verify(&mut self) -> Result<(), BuildError> {
        let w = self.w;
        self.version = self
            .run_checked("nixos-version", VERIFY_VERSION, "")
            .await?
            .trim()
            .to_owned();
        self.system = self
            .run_checked("read the system path", VERIFY_SYSTEM, "")
            .await?
            .trim()
            .to_owned();
        if w.services.is_empty() {
            return Ok(());
        }
        self.check_services().await
    }

    /// `systemctl is-active` until no service is still starting, then every
    /// one must be `active`. A `Type=oneshot` unit (cloud-init's) is
    /// `activating` until its process exits (systemd.service(5)), which can
    /// be after sshd already answers; with `RemainAfterExit=yes` it is
    /// `active` once it exited 0, `failed` otherwise.
    async fn check_services(&self) -> Result<(), BuildError> {
        let w = self.w;
        let command = format!("{VERIFY_SERVICES} {}", w.services.join(" "));
        loop {
            let (_, out) = self.ssh()?.run(&command, "", |_| {}).await?;
            let states: Vec<(&String, &str)> = w
                .services
                .iter()
                .zip(out.lines().chain(std::iter::repeat("unknown")))
                .collect();
            let starting = states
                .iter()
                .any(|(_, s)| matches!(*s, "activating" | "reloading"));
            if starting && Instant::now() < self.step_deadline {
                tokio::time::sleep(Duration::from_secs(1).min(self.left())).await;
                continue;
            }
            let inactive: Vec<String> = states
                .iter()
                .filter(|(_, s)| *s != "active")
                .map(|(svc, s)| format!("{svc} is {s}"))
                .collect();
            if inactive.is_empty() {
                return Ok(());
            }
            return Err(step_err("verify services", inactive.join(", ")));
        }
    }

    fn result(&self) -> BuildResult {
        let w = self.w;
        BuildResult {
            image: w.image.clone(),
            generation: w.generation,
            node: w.node.clone(),
            vmid: w.vmid,
            input_hash: w.input_hash.clone(),
            iso_sha256: w.iso_sha256.clone(),
            nixos_version: self.version.clone(),
            system_path: self.system.clone(),
        }
    }
}

async fn connect_retry(
    host: &str,
    port: u16,
    key: &russh::keys::PrivateKey,
    pin: Arc<Mutex<Option<String>>>,
    within: Duration,
) -> Result<Ssh, BuildError> {
    let until = Instant::now() + within;
    let mut delay = Duration::from_millis(100);
    loop {
        // An address nobody answers on would hang in TCP's own timeout.
        let attempt = until
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(100), Duration::from_secs(10));
        let connected = tokio::time::timeout(attempt, Ssh::connect(host, port, key, pin.clone()))
            .await
            .unwrap_or_else(|_| {
                Err(step_err(
                    "ssh",
                    format!("{host}:{port}: no answer within {}s", attempt.as_secs()),
                ))
            });
        match connected {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() + delay > until => return Err(e),
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
pub fn result_from_stamp(stamp: &Stamp, node: &str, vmid: u32) -> Option<BuildResult> {
    if stamp.building {
        return None;
    }
    Some(BuildResult {
        image: stamp.resource.strip_prefix("image.")?.to_owned(),
        generation: stamp.generation?,
        node: node.to_owned(),
        vmid,
        input_hash: stamp.inputs.clone()?,
        iso_sha256: stamp.iso.clone()?,
        nixos_version: stamp.nixos.clone()?,
        system_path: stamp.system.clone()?,
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
            Stamp::parse(&template_stamp(&r, "homelab"))
                .and_then(|s| result_from_stamp(&s, "pve", 9401)),
            Some(r)
        );
    }
}
