//! The step machine: one build VM from create to template, each step
//! with its own deadline.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    Access, BuildError, BuildResult, BuildWork, CallHome, SEAL, Ssh, Step, VERIFY_SERVICES,
    VERIFY_SYSTEM, VERIFY_VERSION, advertise_address, building_stamp, call_home_line,
    static_address_line, step_err, template_stamp, type_text,
};
use pve_api::{Client, ConfigUpdate};

use super::ssh::connect_retry;

/// What a build reports while it runs.
#[derive(Debug, Clone, Copy)]
pub enum BuildEvent<'a> {
    Started(Step),
    Finished(Step, Duration),
    /// A note of the running step, or a line of the install's output.
    Line(&'a str),
}

pub type Observer<'a> = &'a (dyn Fn(BuildEvent<'_>) + Sync);

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
/// What answers the access step once the typed sequence worked.
enum Answer {
    CallHome(CallHome),
    Ssh(String, u16),
}

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
                self.wait(client.create_vm(&w.node, w.vmid.get(), &config).await?)
                    .await
            }
            Step::Start => self.wait(client.start(&w.node, w.vmid.get()).await?).await,
            Step::Access => self.access().await,
            Step::Install => self.install().await,
            Step::Reboot => self.reboot().await,
            Step::Verify => self.verify().await,
            Step::Seal => self.run_checked("seal", SEAL, "").await.map(drop),
            Step::PowerOff => {
                if let Some(ssh) = self.ssh.take() {
                    let _ = ssh.run("poweroff", "", |_| {}).await;
                }
                while client.vm_status(&w.node, w.vmid.get()).await?.is_running() {
                    if Instant::now() >= self.step_deadline {
                        return Err(step_err("power-off", "the build VM did not power off"));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(())
            }
            Step::Template => self.template().await,
        }
    }

    /// Uploads the configuration and the install script and runs it,
    /// streaming its output.
    async fn install(&mut self) -> Result<(), BuildError> {
        let w = self.w;
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

    /// Reboots into the installed system and connects to it again (a
    /// static address put back through the guest agent; a DHCP one asked of
    /// it, when it runs).
    async fn reboot(&mut self) -> Result<(), BuildError> {
        let w = self.w;
        if let Some(ssh) = self.ssh.take() {
            let _ = ssh.run("reboot", "", |_| {}).await;
        }
        self.pin = Arc::new(Mutex::new(None));
        match &w.access {
            Access::Static {
                address, gateway, ..
            } => {
                self.address_through_agent(&static_address_line(address, gateway.as_deref()))
                    .await?
            }
            // DHCP may give the installed system another address than the
            // installer had: its agent says which.
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

    /// The cloud-init drive in place of the ISO, the final stamp, and the
    /// conversion to a template.
    async fn template(&self) -> Result<(), BuildError> {
        let (client, w) = (self.client, self.w);
        let detach = ConfigUpdate {
            set: BTreeMap::new(),
            delete: vec!["ide2".into()],
            digest: None,
        };
        self.contended("detach the ISO", || {
            client.update_config_sync(&w.node, w.vmid.get(), &detach)
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
            client.update_config_sync(&w.node, w.vmid.get(), &attach)
        })
        .await?;
        self.contended("convert to a template", || async {
            self.wait_task(client.template(&w.node, w.vmid.get()).await?)
                .await
        })
        .await
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
        let (lines, mut answer) = self.access_sequence().await?;
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
                    w.vmid.get(),
                    line,
                    Duration::from_millis(w.key_interval_ms),
                )
                .await?;
            }
            let quiet = window.min(self.left());
            let Err(e) = self.await_answer(&mut answer, quiet).await else {
                return Ok(());
            };
            if Instant::now() >= self.step_deadline {
                return Err(self.access_error(&answer, &e, typed));
            }
        }
    }

    /// The lines to type (root shell, then the way back to nixgold) and
    /// what answers once they worked.
    async fn access_sequence(&self) -> Result<(Vec<String>, Answer), BuildError> {
        let mut lines = vec!["sudo -i\n".to_owned()];
        let answer = match &self.w.access {
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
        Ok((lines, answer))
    }

    /// Waits up to `quiet` for the answer, then for SSH to take the key.
    async fn await_answer(
        &mut self,
        answer: &mut Answer,
        quiet: Duration,
    ) -> Result<(), BuildError> {
        match answer {
            Answer::CallHome(call_home) => {
                let (host, port) = call_home.wait(quiet).await?;
                self.note(&format!("the VM called home from {host}"));
                self.target = Some((host, port));
                // sshd already runs on the installer: if it does not take
                // the key now, the sequence went wrong.
                self.connect(quiet.min(self.left())).await
            }
            Answer::Ssh(host, port) => {
                self.target = Some((host.clone(), *port));
                self.connect(quiet).await
            }
        }
    }

    /// Why the access step gave up, with what to check.
    fn access_error(&self, answer: &Answer, e: &BuildError, typed: u32) -> BuildError {
        let what = match (answer, &self.target) {
            (Answer::CallHome(_), Some((host, _))) => format!(
                "the build VM called home from {host}, but SSH did not take the build key (the typed sequence went wrong?); last error: {e}"
            ),
            (Answer::CallHome(_), None) => "the build VM did not call home: check that it can reach nixgold's listener (build.address.call_home), or raise build.boot_wait".to_owned(),
            (Answer::Ssh(host, _), _) => format!(
                "no SSH on the static build address {host}: check that the address is free and reachable from nixgold, or raise build.boot_wait; last error: {e}"
            ),
        };
        step_err(
            "access",
            format!("{what} (typed the access sequence {typed} times)"),
        )
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
            .agent_run(&w.node, w.vmid.get(), &command, self.left())
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
            let interfaces = client.agent_interfaces(&w.node, w.vmid.get()).await?;
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
            match client.agent_ping(&w.node, w.vmid.get()).await {
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
            input_hash: w.input_hash,
            iso_sha256: w.iso_sha256,
            nixos_version: self.version.clone(),
            system_path: self.system.clone(),
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
