//! The guest model: what runs inside a simulated VM, for template builds.
//!
//! A VM that boots the NixOS installer ISO (its disk holds no system yet)
//! gets a console that autologs in as `nixos` after a boot delay. Keys sent
//! with `sendkey` are decoded the way a US keyboard would produce them
//! (shift chords included) into lines; keys sent before the console is up
//! are lost, as on the real thing. A tiny shell runs the access sequence a
//! build types: `sudo -i`, and a `curl … | sh` call-home that really POSTs
//! to the given URL and runs the returned script (which may only make
//! directories and append to files — enough to install an SSH key).
//!
//! Each booted guest runs an SSH server (russh) on 127.0.0.1 that accepts
//! only public keys listed in root's `authorized_keys` as the typed commands
//! left it, and checks what it is asked to run: uploads with `cat > FILE`,
//! the install script (only programs the installer ISO has; partition →
//! format → mount → nixos-generate-config → nixos-install, in that order)
//! against a `configuration.nix` that NixOS must accept — decided by the
//! NixOS facts in [`crate::nixos`], which also give the installed system
//! its `PATH` and units — then, after `reboot` into the installed system,
//! verification, clean-up and `poweroff`. A program NixOS did not put on
//! `PATH` is "command not found" (exit 127), as in bash.
//!
//! Deliberately an approximation of a shell: it accepts the forms nixgold
//! and the README document, and rejects the rest loudly.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::server::{Auth, Handler, Msg, Server as _, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Inner;
use crate::routes::RouteId;
use crate::state::ApiError;

/// The environment variable the simulated installer shell sets to its SSH
/// server's port. A real installer does not set it, so `${NIXGOLD_SSH_PORT:-22}`
/// in a typed command means port 22 there.
pub const SSH_PORT_VARIABLE: &str = "NIXGOLD_SSH_PORT";

/// A NixOS system installed on a VM's disk (persisted with the VM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub nixos_version: String,
    pub system_path: String,
    /// Keys in /root/.ssh/authorized_keys of the installed system.
    pub root_keys: Vec<String>,
    pub machine_id_empty: bool,
    pub host_keys: bool,
    pub cloud_init_clean: bool,
    /// What NixOS built from the configuration: programs on `PATH`, units.
    #[serde(default)]
    pub system: crate::nixos::System,
}

impl Installed {
    /// The release (`24.05`) of its version (`24.05.4242.abcdef`).
    pub fn release(&self) -> &str {
        let mut dots = self.nixos_version.match_indices('.').map(|(i, _)| i);
        let end = dots.nth(1).unwrap_or(self.nixos_version.len());
        &self.nixos_version[..end]
    }

    /// `nixos-rebuild switch [--upgrade]` (nixpkgs
    /// pkgs/os-specific/linux/nixos-rebuild): the configuration in
    /// /etc/nixos is built against the release channel — updated first
    /// with `--upgrade` (`nix-channel --update nixos`) — and activated. The
    /// same configuration on the same channel builds the same store path;
    /// a newer channel builds another one, which the system then runs.
    fn rebuild(&mut self, upgrade: bool, channels: &BTreeMap<String, String>, out: &mut String) {
        if upgrade {
            out.push_str("unpacking channels...\n");
            if let Some(newer) = channels
                .get(self.release())
                .filter(|v| **v != self.nixos_version)
            {
                let digest: String = Sha256::digest(format!("{}{newer}", self.system_path))
                    .iter()
                    .take(16)
                    .map(|b| format!("{b:02x}"))
                    .collect();
                self.system_path = format!("/nix/store/{digest}-nixos-system-nixos-{newer}");
                self.nixos_version = newer.clone();
            }
        }
        out.push_str("building the system configuration...\n");
        out.push_str(&format!(
            "activating the configuration...\nsetting up /etc...\n{}\n",
            self.system_path
        ));
    }

    /// `systemctl is-active UNIT` on the VM `vm` this system boots on,
    /// `settle` after boot its oneshot units have finished.
    pub fn unit_state(&self, unit: &str, vm: &crate::state::Vm, settle: Duration) -> &'static str {
        let hw = crate::nixos::Hardware {
            agent_port: crate::handlers::agent_enabled(&vm.config),
            cloud_init_drive: vm.config.drives().any(|(_, v)| v.contains("cloudinit")),
            settled: crate::state::now_ms().saturating_sub(vm.started_ms)
                >= settle.as_millis() as u64,
        };
        self.system.unit_state(unit, hw)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Installer,
    Installed,
}

/// A running guest (not persisted: a reboot starts afresh).
#[derive(Debug)]
pub struct Runtime {
    pub mode: Mode,
    pub ssh_port: u16,
    /// When the console starts reading keys (ms since the epoch).
    pub ready_ms: u64,
    line: String,
    root: bool,
    /// Files of the live system (installer mode), by path.
    files: BTreeMap<String, String>,
    /// Keys that arrived before the console was up.
    pub lost_keys: usize,
    /// ISO the installer booted from (names the NixOS version).
    iso: String,
    /// The SSH server's configuration (its host key lives for this boot).
    sshd: Arc<russh::server::Config>,
    /// SSH servers: 127.0.0.1 first, then one per address given with `ip`.
    servers: Vec<tokio::task::JoinHandle<()>>,
    addresses: Vec<String>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.servers.iter().for_each(|s| s.abort());
    }
}

/// The NixOS version an installer ISO's file name carries.
fn version_from_iso(iso: &str) -> String {
    let file = iso.rsplit('/').next().unwrap_or(iso);
    file.trim_start_matches("nixos-minimal-")
        .trim_end_matches(".iso")
        .trim_end_matches("-x86_64-linux")
        .trim_end_matches("-aarch64-linux")
        .to_owned()
}

/// Decodes one QEMU key (`a`, `shift-a`, `ret`, `shift-semicolon`) as a US
/// keyboard would type it. `None` for keys that type nothing.
pub fn decode_key(key: &str) -> Option<Typed> {
    let shift = key.contains("shift");
    let base = key.rsplit('-').next().unwrap_or(key);
    let pair = |plain: char, shifted: char| Some(Typed::Char(if shift { shifted } else { plain }));
    match base {
        "ret" | "kp_enter" => Some(Typed::Enter),
        "backspace" => Some(Typed::Backspace),
        "spc" => Some(Typed::Char(' ')),
        "tab" => Some(Typed::Char('\t')),
        "minus" => pair('-', '_'),
        "equal" => pair('=', '+'),
        "bracket_left" => pair('[', '{'),
        "bracket_right" => pair(']', '}'),
        "semicolon" => pair(';', ':'),
        "apostrophe" => pair('\'', '"'),
        "grave_accent" => pair('`', '~'),
        "backslash" => pair('\\', '|'),
        "comma" => pair(',', '<'),
        "dot" => pair('.', '>'),
        "slash" => pair('/', '?'),
        b if b.len() == 1 => {
            let c = b.chars().next()?;
            if c.is_ascii_lowercase() {
                pair(c, c.to_ascii_uppercase())
            } else if c.is_ascii_digit() {
                let shifted = b")!@#$%^&*("[c as usize - '0' as usize] as char;
                pair(c, shifted)
            } else {
                None
            }
        }
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Typed {
    Char(char),
    Enter,
    Backspace,
}

/// The simulator's guests, by VMID.
#[derive(Debug, Default)]
pub struct Guests {
    running: Mutex<BTreeMap<u32, Runtime>>,
    /// Each VM's SSH port, kept across reboots (as port 22 is on a host).
    ports: Mutex<BTreeMap<u32, u16>>,
    /// What each VM's guest executed, across reboots and power-offs.
    histories: Mutex<BTreeMap<u32, Vec<String>>>,
    /// Finished `agent/exec` commands not yet collected, by (VMID, pid).
    execs: Mutex<BTreeMap<(u32, u64), Exited>>,
    /// The address DHCP gave each VM, when it is not 127.0.0.1 (a guest
    /// that got a new lease at a reboot).
    leases: Mutex<BTreeMap<u32, std::net::Ipv4Addr>>,
    /// Running VMs whose boot found nothing to run (no installer ISO, no
    /// installed system), by the start time of that boot: what a VM boots
    /// is decided when it starts, so [`sync`] looks once per boot, not at
    /// every request (a thousand such VMs made that look most of a
    /// request's cost).
    inert: Mutex<BTreeMap<u32, u64>>,
}

impl Guests {
    /// Everything VM `vmid`'s guests executed, in order, across reboots:
    /// typed lines (`console$ …`), call-home script lines (`script$ …`),
    /// SSH commands (`ssh$ …`) and notes (for tests and snapshots).
    pub fn history(&self, vmid: u32) -> Vec<String> {
        self.histories
            .lock()
            .expect("guests")
            .get(&vmid)
            .cloned()
            .unwrap_or_default()
    }

    fn record(&self, vmid: u32, line: String) {
        self.histories
            .lock()
            .expect("guests")
            .entry(vmid)
            .or_default()
            .push(line);
    }

    /// The address VM `vmid` has from DHCP (its SSH server listens there).
    pub fn lease(&self, vmid: u32) -> std::net::Ipv4Addr {
        self.leases
            .lock()
            .expect("guests")
            .get(&vmid)
            .copied()
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST)
    }

    /// The next boot of VM `vmid` gets another address from DHCP.
    fn renew_lease(&self, vmid: u32) {
        let next = u32::from(self.lease(vmid)) + 1;
        self.leases
            .lock()
            .expect("guests")
            .insert(vmid, std::net::Ipv4Addr::from(next));
    }

    pub fn ssh_port(&self, vmid: u32) -> Option<u16> {
        self.running
            .lock()
            .expect("guests")
            .get(&vmid)
            .map(|r| r.ssh_port)
    }

    pub fn lost_keys(&self, vmid: u32) -> usize {
        self.running
            .lock()
            .expect("guests")
            .get(&vmid)
            .map_or(0, |r| r.lost_keys)
    }
}

/// What booting a VM finds: the installed system, or the installer ISO —
/// named by the URL it was downloaded from (what the file *is*: the
/// release its name carries there), else by its volume name.
fn boot_mode(
    vm: &crate::state::Vm,
    volumes: &std::collections::BTreeMap<String, crate::state::Volume>,
) -> Option<(Mode, String)> {
    if vm.installed.is_some() {
        return Some((Mode::Installed, String::new()));
    }
    let iso = vm
        .config
        .drives()
        .filter(|(_, v)| v.contains("media=cdrom"))
        .filter_map(|(_, v)| v.split(',').next())
        .find(|f| f.contains(":iso/") && f.to_ascii_lowercase().contains("nixos"))?;
    let source = volumes
        .values()
        .find(|v| v.volid == iso)
        .and_then(|v| v.source_url.clone());
    Some((Mode::Installer, source.unwrap_or_else(|| iso.to_owned())))
}

/// Brings guests in line with the VMs' power state and feeds typed keys
/// to the consoles. Called after every request (`after_request`: only if
/// something the guests follow changed since they last looked — a read
/// changes nothing, and looking at a thousand VMs after each of a
/// thousand reads was most of a plan's cost on the simulator) and every
/// 100 ms.
pub(crate) async fn sync(inner: &Arc<Inner>, after_request: bool) {
    let now = crate::state::now_ms();
    let mut to_boot = Vec::new();
    let mut lines: Vec<(u32, String)> = Vec::new();
    {
        let mut guard = inner.state.lock().expect("state");
        guard.advance(&inner.opts);
        if !std::mem::take(&mut guard.guests_stale) && after_request {
            return;
        }
        let state = &mut *guard;
        let mut guests = inner.guests.running.lock().expect("guests");
        // A guest lives for one boot: a VM stopped, or started again
        // (`status/reboot`), drops it.
        let boot = inner.opts.guest_boot.as_millis() as u64;
        guests.retain(|vmid, g| {
            state
                .vms
                .get(vmid)
                .is_some_and(|vm| vm.running && g.ready_ms == vm.started_ms + boot)
        });
        // An entry of an earlier boot names another start time: stale
        // entries need no sweep.
        let mut inert = inner.guests.inert.lock().expect("guests");
        for (vmid, vm) in state.vms.iter_mut().filter(|(_, vm)| vm.running) {
            let Some(runtime) = guests.get_mut(vmid) else {
                if inert.get(vmid) == Some(&vm.started_ms) {
                    continue;
                }
                match boot_mode(vm, &state.volumes) {
                    Some((mode, iso)) => to_boot.push((*vmid, mode, iso, vm.started_ms)),
                    None => {
                        inert.insert(*vmid, vm.started_ms);
                    }
                }
                continue;
            };
            for key in vm.console.drain(..) {
                if runtime.mode != Mode::Installer || now < runtime.ready_ms {
                    runtime.lost_keys += 1;
                    continue;
                }
                match decode_key(&key) {
                    Some(Typed::Char(c)) => runtime.line.push(c),
                    Some(Typed::Backspace) => {
                        runtime.line.pop();
                    }
                    Some(Typed::Enter) => lines.push((*vmid, std::mem::take(&mut runtime.line))),
                    None => {}
                }
            }
        }
    }
    for (vmid, mode, iso, started) in to_boot {
        boot(inner, vmid, mode, iso, started).await;
    }
    for (vmid, line) in lines {
        run_line(inner, vmid, &line).await;
    }
}

async fn boot(inner: &Arc<Inner>, vmid: u32, mode: Mode, iso: String, started_ms: u64) {
    let known = inner
        .guests
        .ports
        .lock()
        .expect("guests")
        .get(&vmid)
        .copied();
    let lease = inner.guests.lease(vmid);
    let listener = tokio::net::TcpListener::bind((lease, known.unwrap_or(0))).await;
    let Ok(listener) = listener else {
        tracing::error!("guest {vmid}: cannot bind its SSH server");
        return;
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    inner
        .guests
        .ports
        .lock()
        .expect("guests")
        .insert(vmid, port);
    let config = Arc::new(russh::server::Config {
        keys: vec![
            russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
                .expect("ed25519 key"),
        ],
        auth_rejection_time: std::time::Duration::from_millis(50),
        auth_rejection_time_initial: Some(std::time::Duration::ZERO),
        inactivity_timeout: Some(std::time::Duration::from_secs(3600)),
        ..Default::default()
    });
    let server = spawn_sshd(inner, vmid, config.clone(), listener);
    let ready_ms = started_ms + inner.opts.guest_boot.as_millis() as u64;
    let runtime = Runtime {
        mode,
        ssh_port: port,
        ready_ms,
        line: String::new(),
        root: false,
        files: BTreeMap::new(),
        lost_keys: 0,
        iso,
        sshd: config,
        servers: vec![server],
        addresses: Vec::new(),
    };
    inner
        .guests
        .running
        .lock()
        .expect("guests")
        .insert(vmid, runtime);
}

fn spawn_sshd(
    inner: &Arc<Inner>,
    vmid: u32,
    config: Arc<russh::server::Config>,
    listener: tokio::net::TcpListener,
) -> tokio::task::JoinHandle<()> {
    let mut sshd = Sshd {
        inner: Arc::downgrade(inner),
        vmid,
    };
    tokio::spawn(async move {
        let _ = sshd.run_on_socket(config, &listener).await;
    })
}

/// `ip a replace ADDR/LEN dev …`: the guest's SSH server also listens on
/// ADDR, at the simulator's guest SSH port (22 unless configured).
async fn add_address(inner: &Arc<Inner>, vmid: u32, cidr: &str) -> Result<(), String> {
    let ip: std::net::IpAddr = cidr
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("Error: any valid prefix is expected rather than \"{cidr}\"."))?;
    let config = {
        let guests = inner.guests.running.lock().expect("guests");
        let g = guests.get(&vmid).ok_or("guest gone")?;
        if g.addresses.iter().any(|a| a == cidr) {
            return Ok(());
        }
        g.sshd.clone()
    };
    let port = inner.opts.guest_ssh_port;
    let listener = tokio::net::TcpListener::bind((ip, port))
        .await
        .map_err(|e| format!("sshd: cannot listen on {ip}:{port}: {e}"))?;
    let server = spawn_sshd(inner, vmid, config, listener);
    let mut guests = inner.guests.running.lock().expect("guests");
    match guests.get_mut(&vmid) {
        Some(g) => {
            g.servers.push(server);
            g.addresses.push(cidr.to_owned());
            Ok(())
        }
        None => {
            server.abort();
            Err("guest gone".into())
        }
    }
}

/// Runs a `;`-separated command line as root or not: variable
/// assignments, the `ip` commands of a static build address, and what
/// [`script_line`] accepts. Stops at the first failing command.
async fn shell(inner: &Arc<Inner>, vmid: u32, line: &str, root: bool) -> Result<(), String> {
    for cmd in line.split(';').map(str::trim).filter(|c| !c.is_empty()) {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let is_assignment = cmd.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if is_assignment {
            inner.guests.record(vmid, format!("script$ {cmd}"));
            continue;
        }
        if words.first() == Some(&"ip") {
            inner.guests.record(vmid, format!("script$ {cmd}"));
            if !root {
                return Err("RTNETLINK answers: Operation not permitted".into());
            }
            match words.get(1..4) {
                Some([obj, "replace" | "add", cidr]) if obj.starts_with('a') => {
                    add_address(inner, vmid, cidr).await?
                }
                Some([obj, "set" | "replace" | "add", _])
                    if obj.starts_with('l') || obj.starts_with('r') => {}
                _ => return Err(format!("{cmd}: not supported by the simulated shell")),
            }
            continue;
        }
        script_line(inner, vmid, cmd, root)?;
    }
    Ok(())
}

/// Runs a line typed on the installer console.
async fn run_line(inner: &Arc<Inner>, vmid: u32, line: &str) {
    let (root, port) = {
        let guests = inner.guests.running.lock().expect("guests");
        let Some(g) = guests.get(&vmid) else {
            return;
        };
        (g.root, g.ssh_port)
    };
    inner.guests.record(vmid, format!("console$ {line}"));
    let trimmed = line.trim();
    if trimmed == "sudo -i" || trimmed == "sudo su -" {
        if let Some(g) = inner.guests.running.lock().expect("guests").get_mut(&vmid) {
            g.root = true;
        }
        return;
    }
    let Some((data, url)) = parse_call_home(trimmed) else {
        if let Err(e) = shell(inner, vmid, trimmed, root).await {
            note(inner, vmid, &format!("console: {e}"));
        }
        return;
    };
    let data = data
        .replace("$(hostname -I)", &format!("{} ", inner.guests.lease(vmid)))
        .replace(&format!("${{{SSH_PORT_VARIABLE}:-22}}"), &port.to_string());
    match http_post(&url, &data).await {
        Ok(script) => {
            for cmd in script
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                if let Err(e) = script_line(inner, vmid, cmd, root) {
                    note(inner, vmid, &format!("console: {e}"));
                    break;
                }
            }
        }
        Err(e) => note(inner, vmid, &format!("console: curl: {e}")),
    }
}

fn note(inner: &Arc<Inner>, vmid: u32, text: &str) {
    inner.guests.record(vmid, text.to_owned());
}

/// `curl -fsS -d "DATA" URL | sh` → (DATA, URL).
fn parse_call_home(line: &str) -> Option<(String, String)> {
    let cmd = line.strip_suffix("| sh")?.trim();
    let rest = cmd.strip_prefix("curl ")?;
    let (_, after_d) = rest.split_once("-d \"")?;
    let (data, after) = after_d.split_once('"')?;
    let url = after
        .split_whitespace()
        .find(|w| w.starts_with("http://"))?;
    Some((data.to_owned(), url.to_owned()))
}

/// A POST over a plain HTTP/1.1 connection; returns the body.
async fn http_post(url: &str, body: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// is supported")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| format!("{host}: {e}"))?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(head.lines().next().unwrap_or_default().to_owned());
    }
    Ok(body.to_owned())
}

/// One line of a script the call-home returned.
fn script_line(inner: &Arc<Inner>, vmid: u32, cmd: &str, root: bool) -> Result<(), String> {
    inner.guests.record(vmid, format!("script$ {cmd}"));
    let mut guests = inner.guests.running.lock().expect("guests");
    let g = guests.get_mut(&vmid).ok_or("guest gone")?;
    let needs_root = |path: &str| path.starts_with("/root") && !root;
    if let Some(dir) = cmd.strip_prefix("mkdir -p ") {
        return if needs_root(dir) {
            Err(format!(
                "mkdir: cannot create directory '{dir}': Permission denied"
            ))
        } else {
            Ok(())
        };
    }
    if cmd.starts_with("chmod ") {
        return Ok(());
    }
    if let Some((text, path)) = parse_append(cmd) {
        if needs_root(&path) {
            return Err(format!("{path}: Permission denied"));
        }
        let file = g.files.entry(path).or_default();
        file.push_str(&text);
        file.push('\n');
        return Ok(());
    }
    Err(format!("{cmd}: not supported by the simulated shell"))
}

/// `echo 'TEXT' >> PATH` or `printf '%s\n' 'TEXT' >> PATH`.
fn parse_append(cmd: &str) -> Option<(String, String)> {
    let (lhs, path) = cmd.split_once(">>")?;
    let lhs = lhs.trim();
    let quoted = lhs
        .strip_prefix("echo ")
        .or_else(|| lhs.strip_prefix("printf '%s\\n' "))?
        .trim();
    let text = quoted.strip_prefix('\'')?.strip_suffix('\'')?;
    Some((text.to_owned(), path.trim().to_owned()))
}

/// The SSH server of one guest.
#[derive(Clone)]
struct Sshd {
    inner: std::sync::Weak<Inner>,
    vmid: u32,
}

impl russh::server::Server for Sshd {
    type Handler = Connection;
    fn new_client(&mut self, _: Option<std::net::SocketAddr>) -> Connection {
        Connection {
            inner: self.inner.clone(),
            vmid: self.vmid,
            commands: BTreeMap::new(),
        }
    }
}

struct Connection {
    inner: std::sync::Weak<Inner>,
    vmid: u32,
    /// Per channel: the exec command and the stdin received so far.
    commands: BTreeMap<ChannelId, (String, Vec<u8>)>,
}

impl Connection {
    fn authorized(&self) -> Vec<String> {
        let Some(inner) = self.inner.upgrade() else {
            return Vec::new();
        };
        let guests = inner.guests.running.lock().expect("guests");
        let Some(g) = guests.get(&self.vmid) else {
            return Vec::new();
        };
        match g.mode {
            Mode::Installer => g
                .files
                .get("/root/.ssh/authorized_keys")
                .map(|f| f.lines().map(str::to_owned).collect())
                .unwrap_or_default(),
            Mode::Installed => {
                let state = inner.state.lock().expect("state");
                state
                    .vms
                    .get(&self.vmid)
                    .and_then(|vm| vm.installed.as_ref())
                    .map(|i| i.root_keys.clone())
                    .unwrap_or_default()
            }
        }
    }
}

/// `ssh-ed25519 AAAA…` without the comment.
fn key_body(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let offered = key
            .public_key
            .to_openssh()
            .map(|k| key_body(&k))
            .unwrap_or_default();
        let ok = user == "root"
            && self
                .authorized()
                .iter()
                .any(|line| key_body(line) == offered);
        Ok(if ok { Auth::Accept } else { Auth::reject() })
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.commands.insert(
            channel,
            (String::from_utf8_lossy(data).into_owned(), Vec::new()),
        );
        session.channel_success(channel)?;
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some((_, stdin)) = self.commands.get_mut(&channel) {
            stdin.extend_from_slice(data);
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some((command, stdin)) = self.commands.remove(&channel) else {
            return Ok(());
        };
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        // Faults for guests: `SSH <first word of the command> => drop` cuts
        // the connection, `=> task-fail:MSG` makes the command fail.
        let program = command
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        match inner.opts.faults.take("SSH", &program) {
            Some(crate::options::FaultAction::Drop) => {
                inner
                    .guests
                    .record(self.vmid, format!("ssh$ {command} (connection dropped)"));
                return Err(russh::Error::Disconnect);
            }
            Some(crate::options::FaultAction::TaskFail(message)) => {
                inner
                    .guests
                    .record(self.vmid, format!("ssh$ {command} (failed: {message})"));
                session.data(channel, format!("{message}\n").into_bytes())?;
                session.exit_status_request(channel, 1)?;
                session.eof(channel)?;
                session.close(channel)?;
                return Ok(());
            }
            Some(crate::options::FaultAction::NewLease) => {
                inner.guests.renew_lease(self.vmid);
                inner.guests.record(
                    self.vmid,
                    format!(
                        "note: the next boot gets {} from DHCP",
                        inner.guests.lease(self.vmid)
                    ),
                );
            }
            _ => {}
        }
        let (code, output, after) = execute(
            &inner,
            self.vmid,
            &command,
            &String::from_utf8_lossy(&stdin),
        );
        if !output.is_empty() {
            session.data(channel, output.into_bytes())?;
        }
        session.exit_status_request(channel, code)?;
        session.eof(channel)?;
        session.close(channel)?;
        match after {
            After::Nothing => {}
            After::Reboot => reboot(&inner, self.vmid),
            After::PowerOff => power_off(&inner, self.vmid),
        }
        Ok(())
    }
}

enum After {
    Nothing,
    Reboot,
    PowerOff,
}

/// A guest reboot: the runtime ends; the next sync boots the disk.
fn reboot(inner: &Arc<Inner>, vmid: u32) {
    let runtime = inner.guests.running.lock().expect("guests").remove(&vmid);
    {
        let mut state = inner.state.lock().expect("state");
        state.guests_stale = true;
        if let Some(vm) = state.vms.get_mut(&vmid) {
            vm.started_ms = crate::state::now_ms();
        }
    }
    drop(runtime);
}

fn power_off(inner: &Arc<Inner>, vmid: u32) {
    let runtime = inner.guests.running.lock().expect("guests").remove(&vmid);
    {
        let mut state = inner.state.lock().expect("state");
        state.guests_stale = true;
        if let Some(vm) = state.vms.get_mut(&vmid) {
            vm.set_running(false);
        }
    }
    drop(runtime);
}

/// A finished command: (exit code, stdout, stderr).
type Exited = (u32, String, String);

/// Whether VM `vmid`'s guest agent answers, with Proxmox's messages: it
/// must be configured, the VM running, the agent started (`agent_delay`
/// after boot); the installer ISO runs none, and an installed system only
/// if its configuration enabled it. VMs without a guest model (clones)
/// have a generic agent.
pub(crate) fn agent_ready(
    inner: &Inner,
    node: &str,
    vmid: u32,
    agent_down: bool,
) -> Result<(), ApiError> {
    let state = inner.state.lock().expect("state");
    let vm = state.vm_on(node, vmid)?;
    if !crate::handlers::agent_enabled(&vm.config) {
        return Err(ApiError::fail("No QEMU guest agent configured"));
    }
    if !vm.running {
        return Err(ApiError::fail(format!("VM {vmid} is not running")));
    }
    let not_running = || ApiError::fail("QEMU guest agent is not running");
    let since_boot = crate::state::now_ms().saturating_sub(vm.started_ms);
    if agent_down || since_boot < inner.opts.agent_delay.as_millis() as u64 {
        return Err(not_running());
    }
    match inner.guests.running.lock().expect("guests").get(&vmid) {
        Some(g) if g.mode == Mode::Installer => Err(not_running()),
        // The installed system's agent runs only if its configuration
        // enables the unit (and the VM has the agent's port).
        Some(_)
            if vm.installed.as_ref().is_none_or(|i| {
                i.unit_state("qemu-guest-agent", vm, Duration::ZERO) != "active"
            }) =>
        {
            Err(not_running())
        }
        _ => Ok(()),
    }
}

/// Whether the guest model answers `route` (the guest-agent routes).
pub(crate) fn answers(route: RouteId) -> bool {
    matches!(
        route,
        RouteId::AgentNetwork
            | RouteId::AgentOsinfo
            | RouteId::AgentPing
            | RouteId::AgentExec
            | RouteId::AgentExecStatus
    )
}

/// Answers the guest-agent routes (`None` for any other route; for
/// `network-get-interfaces` only the readiness check, the handler answers).
/// `exec` runs synchronously; its result waits for one `exec-status`, which
/// then forgets it, as qemu-ga does.
pub(crate) async fn agent(
    inner: &Arc<Inner>,
    route: RouteId,
    params: &BTreeMap<String, String>,
    agent_down: bool,
) -> Option<Result<serde_json::Value, ApiError>> {
    use serde_json::json;
    if !answers(route) {
        return None;
    }
    let node = params.get("node").map(String::as_str).unwrap_or_default();
    let vmid: u32 = params.get("vmid").and_then(|v| v.parse().ok()).unwrap_or(0);
    sync(inner, false).await;
    if let Err(e) = agent_ready(inner, node, vmid, agent_down) {
        return Some(Err(e));
    }
    match route {
        RouteId::AgentNetwork => agent_interfaces(inner, vmid).map(Ok),
        RouteId::AgentOsinfo => Some(agent_osinfo(inner, vmid)),
        RouteId::AgentPing => Some(Ok(json!({ "result": {} }))),
        RouteId::AgentExec => {
            let argv: Vec<&str> = params
                .get("command")
                .map(|c| c.split('\0').collect())
                .unwrap_or_default();
            let input = params.get("input-data").cloned().unwrap_or_default();
            inner
                .guests
                .record(vmid, format!("agent$ {}", argv.join(" ")));
            let (code, out, err) = agent_exec(inner, vmid, &argv, &input).await;
            inner.persist(&inner.state.lock().expect("state"));
            let mut execs = inner.guests.execs.lock().expect("guests");
            let pid = 1000 + execs.len() as u64 + u64::from(vmid) * 100_000;
            execs.insert((vmid, pid), (code, out, err));
            Some(Ok(json!({ "pid": pid })))
        }
        RouteId::AgentExecStatus => {
            let pid: u64 = params.get("pid").and_then(|p| p.parse().ok()).unwrap_or(0);
            let done = inner
                .guests
                .execs
                .lock()
                .expect("guests")
                .remove(&(vmid, pid));
            Some(match done {
                Some((code, out, err)) => {
                    let mut status = json!({ "exited": true, "exitcode": code });
                    if !out.is_empty() {
                        status["out-data"] = json!(out);
                    }
                    if !err.is_empty() {
                        status["err-data"] = json!(err);
                    }
                    Ok(status)
                }
                None => Err(ApiError::fail("Agent error: Invalid parameter 'pid'")),
            })
        }
        _ => None,
    }
}

/// What the agent of a guest-modelled VM reports: loopback, and the first
/// NIC with the DHCP lease and any address given with `ip`; `None` for VMs
/// without a guest model (the generic handler answers for those).
fn agent_interfaces(inner: &Inner, vmid: u32) -> Option<serde_json::Value> {
    use serde_json::json;
    let addresses: Vec<String> = inner
        .guests
        .running
        .lock()
        .expect("guests")
        .get(&vmid)?
        .addresses
        .clone();
    let mac = inner
        .state
        .lock()
        .expect("state")
        .vms
        .get(&vmid)
        .and_then(|vm| vm.config.get("net0").and_then(crate::config::net_mac))
        .unwrap_or_default()
        .to_ascii_lowercase();
    let ipv4 = |cidr: &str| {
        let (ip, prefix) = cidr.split_once('/').unwrap_or((cidr, "32"));
        json!({"ip-address": ip, "ip-address-type": "ipv4", "prefix": prefix.parse::<u8>().unwrap_or(32)})
    };
    let mut nic = vec![ipv4(&format!("{}/8", inner.guests.lease(vmid)))];
    nic.extend(addresses.iter().map(|a| ipv4(a)));
    Some(json!({ "result": [
        crate::handlers::loopback_interface(),
        {"name": "ens18", "hardware-address": mac, "ip-addresses": nic},
    ]}))
}

/// `get-osinfo` of a guest: what qemu-ga reads from `/etc/os-release`
/// and `uname` (qemu's qga/commands-posix.c `qmp_guest_get_osinfo`:
/// ID, NAME, PRETTY_NAME, VERSION, VERSION_ID — no BUILD_ID, so the point
/// release and revision are not in it), as NixOS writes that file
/// (nixpkgs nixos/modules/misc/version.nix `osReleaseContents`:
/// VERSION_ID is the release, VERSION and PRETTY_NAME add the code name).
fn agent_osinfo(inner: &Inner, vmid: u32) -> Result<serde_json::Value, ApiError> {
    let state = inner.state.lock().expect("state");
    let installed = state
        .vms
        .get(&vmid)
        .and_then(|vm| vm.installed.as_ref())
        .ok_or_else(|| {
            ApiError::fail(format!(
                "sim: VM {vmid} has no guest model, so its OS is unknown"
            ))
        })?;
    let release = installed.release();
    let facts = crate::nixos::facts::release(release);
    let code_name = facts.code_name;
    Ok(serde_json::json!({ "result": {
        "id": "nixos",
        "name": "NixOS",
        "pretty-name": format!("NixOS {release} ({code_name})"),
        "version": format!("{release} ({code_name})"),
        "version-id": release,
        "kernel-release": facts.kernel,
        "kernel-version": "#1-NixOS SMP PREEMPT_DYNAMIC Tue Jan  1 00:00:00 UTC 1980",
        "machine": "x86_64",
    }}))
}

/// Runs one `agent/exec` command: `sh -c LINE` through the simulated
/// shell, anything else as an SSH command would run. (code, stdout, stderr)
async fn agent_exec(
    inner: &Arc<Inner>,
    vmid: u32,
    argv: &[&str],
    input: &str,
) -> (u32, String, String) {
    if !inner
        .guests
        .running
        .lock()
        .expect("guests")
        .contains_key(&vmid)
    {
        return (
            127,
            String::new(),
            format!("sim: VM {vmid} has no guest model\n"),
        );
    }
    match argv {
        [sh, "-c", line] if sh.ends_with("/sh") || *sh == "sh" => {
            match shell(inner, vmid, line, true).await {
                Ok(()) => (0, String::new(), String::new()),
                Err(e) => (1, String::new(), format!("{e}\n")),
            }
        }
        _ => {
            let (code, out, after) = execute(inner, vmid, &argv.join(" "), input);
            match after {
                After::Nothing => {}
                After::Reboot => reboot(inner, vmid),
                After::PowerOff => power_off(inner, vmid),
            }
            (code, out, String::new())
        }
    }
}

/// The install script's steps, in the order they must run.
const INSTALL_STEPS: &[(&str, &str)] = &[
    ("partition", "mklabel"),
    ("format", "mkfs."),
    ("mount", "mount "),
    (
        "generate the hardware configuration",
        "nixos-generate-config",
    ),
    ("install", "nixos-install"),
];

/// Runs one SSH command: (exit code, output, what happens after).
fn execute(inner: &Arc<Inner>, vmid: u32, command: &str, stdin: &str) -> (u32, String, After) {
    let mut output = String::new();
    let mut after = After::Nothing;
    for part in command
        .split("&&")
        .flat_map(|p| p.split(';'))
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let code = execute_one(inner, vmid, part, stdin, &mut output, &mut after);
        if code != 0 {
            return (code, output, After::Nothing);
        }
    }
    (0, output, after)
}

/// What running the install script would hit first: a program the
/// installer ISO does not have on `PATH` (bash's message, exit 127), or the
/// install steps out of order. Prints the steps it passes.
fn check_install_script(path: &str, script: &str, out: &mut String) -> Result<(), u32> {
    let missing = crate::nixos::script_programs(script)
        .into_iter()
        .find(|p| !crate::nixos::facts::INSTALLER_PROGRAMS.contains(&p.as_str()));
    if let Some(program) = missing {
        let line = script
            .lines()
            .position(|l| l.split_whitespace().any(|w| w == program))
            .map_or(1, |n| n + 1);
        out.push_str(&format!(
            "{path}: line {line}: {program}: command not found\n"
        ));
        return Err(127);
    }
    // Each step must appear after the previous one.
    let mut last = 0;
    for (step, marker) in INSTALL_STEPS {
        let Some(at) = script[last..].find(marker) else {
            out.push_str(&format!(
                "install script: step `{step}` ({marker}) is missing or out of order\n"
            ));
            return Err(1);
        };
        last += at + marker.len();
        out.push_str(&format!("[nixgold] {step}\n"));
    }
    Ok(())
}

fn execute_one(
    inner: &Arc<Inner>,
    vmid: u32,
    cmd: &str,
    stdin: &str,
    out: &mut String,
    after: &mut After,
) -> u32 {
    inner.guests.record(vmid, format!("ssh$ {cmd}"));
    let mut guests = inner.guests.running.lock().expect("guests");
    let Some(g) = guests.get_mut(&vmid) else {
        return 255;
    };
    let mode = g.mode;
    if let Some(path) = cmd.strip_prefix("cat > ") {
        g.files.insert(path.trim().to_owned(), stdin.to_owned());
        return 0;
    }
    if cmd.starts_with("mkdir -p ") || cmd.starts_with("chmod ") {
        return 0;
    }
    match (mode, cmd) {
        (Mode::Installer, c) if c.starts_with("bash ") => {
            let args: Vec<&str> = c.split_whitespace().collect();
            let (Some(path), Some(config)) = (args.get(1), args.get(2)) else {
                out.push_str("usage: bash SCRIPT CONFIGURATION_NIX\n");
                return 2;
            };
            let (Some(script), Some(config)) =
                (g.files.get(*path).cloned(), g.files.get(*config).cloned())
            else {
                out.push_str("bash: no such file\n");
                return 127;
            };
            if let Err(code) = check_install_script(path, &script, out) {
                return code;
            }
            let system = match crate::nixos::evaluate(&config) {
                Ok(system) => system,
                Err(e) => {
                    out.push_str(&e.text);
                    out.push('\n');
                    return 1;
                }
            };
            let version = version_from_iso(&g.iso);
            let digest: String = Sha256::digest(config.as_bytes())
                .iter()
                .take(16)
                .map(|b| format!("{b:02x}"))
                .collect();
            let keys: Vec<String> = if script.contains("/mnt/root/.ssh") {
                g.files
                    .get("/root/.ssh/authorized_keys")
                    .map(|f| f.lines().map(str::to_owned).collect())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            drop(guests);
            let installed = Installed {
                nixos_version: version.clone(),
                system_path: format!("/nix/store/{digest}-nixos-system-nixos-{version}"),
                root_keys: keys,
                machine_id_empty: false,
                host_keys: true,
                cloud_init_clean: false,
                system,
            };
            let mut state = inner.state.lock().expect("state");
            state.guests_stale = true;
            if let Some(vm) = state.vms.get_mut(&vmid) {
                vm.installed = Some(installed);
            }
            out.push_str("installation finished!\n");
            0
        }
        (_, "reboot") => {
            *after = After::Reboot;
            0
        }
        (_, "poweroff") => {
            *after = After::PowerOff;
            0
        }
        (Mode::Installed, c) => {
            drop(guests);
            let mut state = inner.state.lock().expect("state");
            match state.vms.get_mut(&vmid) {
                Some(vm) => installed_command(vm, c, &inner.opts, out),
                None => 255,
            }
        }
        (Mode::Installer, other) => {
            out.push_str(&format!("{other}: command not found\n"));
            127
        }
    }
}

/// The program a command line runs: its first word, without the system
/// profile's directory.
fn program_of(cmd: &str) -> &str {
    let first = cmd.split_whitespace().next().unwrap_or_default();
    first
        .strip_prefix("/run/current-system/sw/bin/")
        .unwrap_or(first)
}

/// One SSH command on the installed system: programs NixOS did not put on
/// `PATH` are not found, as in bash (exit 127).
fn installed_command(
    vm: &mut crate::state::Vm,
    cmd: &str,
    opts: &crate::SimOptions,
    out: &mut String,
) -> u32 {
    let Some(installed) = vm.installed.as_ref() else {
        return 255;
    };
    let program = program_of(cmd);
    if !installed.system.has_program(program) {
        out.push_str(&format!("bash: line 1: {program}: command not found\n"));
        return 127;
    }
    if let Some(units) = cmd.strip_prefix("systemctl is-active ") {
        let states: Vec<&str> = units
            .split_whitespace()
            .map(|u| installed.unit_state(u, vm, opts.units_settle))
            .collect();
        for state in &states {
            out.push_str(state);
            out.push('\n');
        }
        // systemctl(1): 0 when at least one of the units is active.
        return if states.contains(&"active") { 0 } else { 3 };
    }
    let Some(installed) = vm.installed.as_mut() else {
        return 255;
    };
    match cmd {
        "nixos-version" => out.push_str(&format!("{} (Simulated)\n", installed.nixos_version)),
        "readlink -f /run/current-system" => out.push_str(&format!("{}\n", installed.system_path)),
        "truncate -s 0 /etc/machine-id" => installed.machine_id_empty = true,
        "rm -f /etc/ssh/ssh_host_*" => installed.host_keys = false,
        // What `cloud-init clean --logs` removes (canonical/cloud-init:
        // cloudinit/cmd/clean.py `remove_artifacts`:
        // the logs and the cloud_dir), by path, or cloud-init itself when
        // the configuration put it on PATH.
        "rm -rf /var/lib/cloud /var/log/cloud-init.log /var/log/cloud-init-output.log"
        | "cloud-init clean --logs" => installed.cloud_init_clean = true,
        "rm -f /root/.ssh/authorized_keys" => installed.root_keys.clear(),
        "nixos-rebuild switch" => installed.rebuild(false, &opts.channel_releases, out),
        "nixos-rebuild switch --upgrade" => installed.rebuild(true, &opts.channel_releases, out),
        other => {
            out.push_str(&format!("{other}: not supported by the simulated guest\n"));
            return 127;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_decode_like_a_us_keyboard() {
        let typed: String = [
            "shift-n",
            "i",
            "x",
            "shift-semicolon",
            "spc",
            "shift-4",
            "shift-9",
            "slash",
            "shift-slash",
            "shift-apostrophe",
        ]
        .iter()
        .filter_map(|k| match decode_key(k) {
            Some(Typed::Char(c)) => Some(c),
            _ => None,
        })
        .collect();
        assert_eq!(typed, "Nix: $(/?\"");
        assert_eq!(decode_key("ret"), Some(Typed::Enter));
        assert_eq!(decode_key("f5"), None);
    }

    #[test]
    fn the_call_home_line_is_recognised() {
        let line = "curl -fsS -d \"ip=$(hostname -I) port=${NIXGOLD_SSH_PORT:-22}\" http://127.0.0.1:4242/t0k | sh";
        let (data, url) = parse_call_home(line).unwrap();
        assert_eq!(url, "http://127.0.0.1:4242/t0k");
        assert!(data.starts_with("ip=$(hostname -I)"));
        assert_eq!(
            parse_append("echo 'ssh-ed25519 AAAA k' >> /root/.ssh/authorized_keys"),
            Some((
                "ssh-ed25519 AAAA k".into(),
                "/root/.ssh/authorized_keys".into()
            ))
        );
        assert_eq!(
            version_from_iso("local:iso/nixos-minimal-24.05.1234.abcd-x86_64-linux.iso"),
            "24.05.1234.abcd"
        );
    }
}
