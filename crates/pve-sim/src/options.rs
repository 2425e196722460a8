//! How the simulator behaves beyond the API contract: its performance model
//! (latency, workers, service time, task durations), lock timeouts, the
//! "internet" that `download-url` can reach, and fault injection.
//!
//! Faults are rules `METHOD PATH => ACTION[*COUNT][@RATE]`, e.g.
//! `POST /nodes/*/qemu/*/clone => 596*2` or `GET * => slow:1500@0.1`.
//! They are added from tests ([`Faults::add`]), from the command line
//! (`nixgold sim serve --fault`), or over HTTP (`POST /_sim/faults`).
//! Guests take rules too: `SSH <program> => drop` cuts an SSH session when
//! that program is run, `SSH <program> => task-fail:MSG` makes it fail.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A file that `download-url` can fetch: the simulated internet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteFile {
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug)]
pub struct SimOptions {
    /// One-way network latency, added before and after each request. It
    /// is time on the wire: it holds no worker.
    pub latency: Duration,
    /// Requests served at once; more wait (pveproxy/pvedaemon workers).
    pub workers: usize,
    /// Time a worker spends on each request (held for it, and for the
    /// handler's own waits, such as a synchronous call's config lock).
    pub service_time: Duration,
    /// Task durations by task type (`qmclone`, `qmstart`, …).
    pub task_durations: BTreeMap<String, Duration>,
    pub default_task_duration: Duration,
    /// Config lock wait of synchronous calls (10 s on Proxmox).
    pub vm_lock_timeout: Duration,
    /// Lock wait of clone source and target (1 s on Proxmox).
    pub clone_lock_timeout: Duration,
    /// Delay of every 401 (about 3 s on Proxmox).
    pub auth_failure_delay: Duration,
    /// How long a new VM shows `status: unknown` in /cluster/resources.
    pub resources_lag: Duration,
    /// How long after start the guest agent answers.
    pub agent_delay: Duration,
    /// How long the installed system's oneshot units (cloud-init's) run
    /// after boot: until then `systemctl is-active` says `activating`, as
    /// systemd does for a `Type=oneshot` unit whose process has not exited.
    pub units_settle: Duration,
    /// How long an installer ISO takes to boot to its console; keys typed
    /// earlier are lost.
    pub guest_boot: Duration,
    /// The port a guest's SSH server listens on at an address given to it
    /// with `ip addr` (a static build address): 22, as on a real guest;
    /// tests use a free high port.
    pub guest_ssh_port: u16,
    /// What `download-url` can reach.
    pub remote_files: BTreeMap<String, RemoteFile>,
    /// The newest version each NixOS release channel serves (`24.05` →
    /// `24.05.5678.f00dfeed`): what `nixos-rebuild switch --upgrade` in a
    /// guest moves to. A release not listed has nothing newer.
    pub channel_releases: BTreeMap<String, String>,
    pub faults: Faults,
}

impl Default for SimOptions {
    /// Proxmox's own timeouts and modest task durations: what a newcomer
    /// sees with `nixgold sim serve`.
    fn default() -> Self {
        let ms = Duration::from_millis;
        SimOptions {
            latency: Duration::ZERO,
            workers: 8,
            service_time: Duration::ZERO,
            task_durations: [
                ("qmcreate", 400),
                ("qmclone", 1500),
                ("qmtemplate", 500),
                ("qmstart", 800),
                ("qmstop", 300),
                ("qmshutdown", 1000),
                ("qmdestroy", 400),
                ("qmconfig", 100),
                ("resize", 300),
                ("download", 2500),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), ms(v)))
            .collect(),
            default_task_duration: ms(200),
            vm_lock_timeout: Duration::from_secs(10),
            clone_lock_timeout: Duration::from_secs(1),
            auth_failure_delay: Duration::from_secs(3),
            resources_lag: Duration::from_secs(2),
            agent_delay: Duration::from_secs(3),
            units_settle: Duration::from_secs(5),
            guest_boot: Duration::from_secs(8),
            guest_ssh_port: 22,
            remote_files: BTreeMap::new(),
            channel_releases: BTreeMap::new(),
            faults: Faults::default(),
        }
    }
}

impl SimOptions {
    /// Fast and steerable: every task takes `task` time, lock waits are
    /// short, no 401 delay or lag. What the test suites use.
    pub fn fast(task: Duration) -> Self {
        SimOptions {
            task_durations: BTreeMap::new(),
            default_task_duration: task,
            vm_lock_timeout: Duration::from_millis(300),
            clone_lock_timeout: Duration::from_millis(100),
            auth_failure_delay: Duration::ZERO,
            resources_lag: Duration::ZERO,
            agent_delay: Duration::ZERO,
            units_settle: Duration::ZERO,
            guest_boot: Duration::ZERO,
            ..SimOptions::default()
        }
    }

    pub fn task_duration(&self, kind: &str) -> Duration {
        self.task_durations
            .get(kind)
            .copied()
            .unwrap_or(self.default_task_duration)
    }

    pub fn remote_file(&self, url: &str) -> Option<&RemoteFile> {
        self.remote_files.get(url)
    }
}

/// What a matching fault does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// Answer with this HTTP status (500, 595, 596, 599, …) instead.
    Status(u16),
    /// Close the connection without an answer.
    Drop,
    /// Serve the request after this extra delay.
    Slow(Duration),
    /// The VM or storage lock cannot be had: "can't lock file … got timeout".
    LockTimeout,
    /// The task this request starts fails with this message.
    TaskFail(String),
    /// The task this request starts never ends.
    TaskHang,
    /// The guest agent does not answer.
    AgentNotRunning,
    /// `sendkey`: the console receives another key than the one sent (a
    /// key mistyped on the way, as a wrong layout or a busy host does).
    WrongKey,
    /// `SSH reboot`: the guest's next boot gets another DHCP address.
    NewLease,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    pub method: Option<String>,
    /// `*` matches one path segment; a lone `*` matches any path.
    pub path: String,
    pub action: FaultAction,
    pub remaining: Option<u32>,
    pub rate: Option<f64>,
}

impl std::str::FromStr for FaultRule {
    type Err = String;

    /// `METHOD PATH => ACTION[*COUNT][@RATE]`; METHOD may be `*`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (lhs, rhs) = s
            .split_once("=>")
            .ok_or_else(|| format!("fault {s:?}: expected `METHOD PATH => ACTION`"))?;
        let mut lhs = lhs.split_whitespace();
        let (method, path) = match (lhs.next(), lhs.next(), lhs.next()) {
            (Some(m), Some(p), None) => (m, p),
            _ => return Err(format!("fault {s:?}: expected `METHOD PATH` before =>")),
        };
        let mut action = rhs.trim();
        let mut rate = None;
        if let Some((a, r)) = action.rsplit_once('@') {
            rate = Some(
                r.parse::<f64>()
                    .map_err(|_| format!("fault {s:?}: bad rate {r:?}"))?,
            );
            action = a;
        }
        let mut remaining = None;
        if let Some((a, n)) = action.rsplit_once('*') {
            remaining = Some(
                n.parse::<u32>()
                    .map_err(|_| format!("fault {s:?}: bad count {n:?}"))?,
            );
            action = a;
        }
        let action = match action.split_once(':') {
            Some(("slow", ms)) => FaultAction::Slow(Duration::from_millis(
                ms.parse()
                    .map_err(|_| format!("fault {s:?}: bad delay {ms:?}"))?,
            )),
            Some(("task-fail", msg)) => FaultAction::TaskFail(msg.to_owned()),
            None if action == "drop" => FaultAction::Drop,
            None if action == "lock-timeout" => FaultAction::LockTimeout,
            None if action == "task-hang" => FaultAction::TaskHang,
            None if action == "task-fail" => FaultAction::TaskFail("injected failure".to_owned()),
            None if action == "agent-not-running" => FaultAction::AgentNotRunning,
            None if action == "wrong-key" => FaultAction::WrongKey,
            None if action == "new-lease" => FaultAction::NewLease,
            None => FaultAction::Status(
                action
                    .parse()
                    .ok()
                    .filter(|c| (400..=599).contains(c))
                    .ok_or_else(|| format!("fault {s:?}: unknown action {action:?}"))?,
            ),
            Some(_) => return Err(format!("fault {s:?}: unknown action {action:?}")),
        };
        Ok(FaultRule {
            method: (method != "*").then(|| method.to_ascii_uppercase()),
            path: path.to_owned(),
            action,
            remaining,
            rate,
        })
    }
}

impl FaultRule {
    fn matches(&self, method: &str, path: &str) -> bool {
        if self.method.as_deref().is_some_and(|m| m != method) {
            return false;
        }
        if self.path == "*" {
            return true;
        }
        let want: Vec<&str> = self.path.trim_matches('/').split('/').collect();
        let got: Vec<&str> = path.trim_matches('/').split('/').collect();
        want.len() == got.len() && want.iter().zip(&got).all(|(w, g)| *w == "*" || w == g)
    }
}

/// The active fault rules; shared by every request.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<FaultRule>>,
}

impl Faults {
    pub fn add(&self, rule: FaultRule) {
        self.rules.lock().expect("fault rules").push(rule);
    }

    pub fn clear(&self) {
        self.rules.lock().expect("fault rules").clear();
    }

    pub fn list(&self) -> Vec<FaultRule> {
        self.rules.lock().expect("fault rules").clone()
    }

    /// The first rule that fires for this request, using one of its counts.
    pub fn take(&self, method: &str, path: &str) -> Option<FaultAction> {
        let mut rules = self.rules.lock().expect("fault rules");
        let idx = rules.iter().position(|r| {
            r.matches(method, path)
                && r.remaining != Some(0)
                && r.rate.is_none_or(|p| rand::random::<f64>() < p)
        })?;
        let rule = &mut rules[idx];
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
        }
        let action = rule.action.clone();
        if rule.remaining == Some(0) {
            rules.remove(idx);
        }
        Some(action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match_by_segment() {
        let rule: FaultRule = "POST /nodes/*/qemu/*/clone => 596*2".parse().unwrap();
        assert_eq!(rule.action, FaultAction::Status(596));
        assert_eq!(rule.remaining, Some(2));
        assert!(rule.matches("POST", "/nodes/pve/qemu/9000/clone"));
        assert!(!rule.matches("POST", "/nodes/pve/qemu/9000/config"));
        let faults = Faults::default();
        faults.add(rule);
        assert!(faults.take("POST", "/nodes/pve/qemu/1/clone").is_some());
        assert!(faults.take("POST", "/nodes/pve/qemu/1/clone").is_some());
        assert!(faults.take("POST", "/nodes/pve/qemu/1/clone").is_none());
        let slow: FaultRule = "* * => slow:250@0.5".parse().unwrap();
        assert_eq!(slow.action, FaultAction::Slow(Duration::from_millis(250)));
        assert_eq!(slow.rate, Some(0.5));
        assert!("GET /x => teapot".parse::<FaultRule>().is_err());
    }
}
