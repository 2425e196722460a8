//! `schedule --systemd`: the systemd units that run Day 2 unattended — a
//! drift timer and the quarterly cycle ([`crate::cycle`]) — for machines
//! without the NixOS module (`nix/module.nix` writes the same units).
//!
//! Secrets never go into a unit: every environment variable the fleet reads
//! a secret from (`{ env = "NAME" }`, plus `PROXMOX_VE_API_TOKEN`) becomes a
//! systemd credential (`LoadCredential=NAME:DIR/NAME`, systemd.exec(5)),
//! and the unit points `NAME_FILE` at it (`%d/NAME`, the credentials
//! directory); nixgold reads `NAME_FILE` when `NAME` is not set.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::fleet::{Fleet, SecretRef};

/// What the units run, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The nixgold binary (absolute).
    pub binary: PathBuf,
    /// The fleet file (absolute); its directory is the working directory.
    pub fleet: PathBuf,
    /// `OnCalendar=` of the drift check (`hourly`).
    pub drift_calendar: String,
    /// `OnCalendar=` of the cycle (`quarterly`).
    pub cycle_calendar: String,
    /// node_exporter's textfile directory: `nixgold-drift.prom` and
    /// `nixgold-cycle.prom` go there.
    pub textfile_dir: Option<PathBuf>,
    /// Where the cycle keeps its plan.
    pub plan_out: PathBuf,
    /// Whether the cycle applies its plan (otherwise it reports only).
    pub apply: bool,
    /// Where the credential files live (`NAME` each).
    pub credentials_dir: PathBuf,
    /// The environment variables that carry secrets.
    pub credentials: Vec<String>,
}

/// The environment variables `fleet` reads secrets from, and the API
/// token's, sorted and once each.
pub fn secret_variables(fleet: &Fleet) -> Vec<String> {
    let mut names: Vec<String> = [&fleet.proxmox.token, &fleet.proxmox.password]
        .into_iter()
        .chain(fleet.vms.values().map(|vm| &vm.password))
        .flatten()
        .filter_map(|r| match r {
            SecretRef::Env { env } => Some(env.clone()),
            SecretRef::File { .. } => None,
        })
        .chain(std::iter::once("PROXMOX_VE_API_TOKEN".to_owned()))
        .collect();
    names.sort();
    names.dedup();
    names
}

impl Schedule {
    /// The four units, as (file name, contents).
    pub fn units(&self) -> Vec<(String, String)> {
        let textfile = |name: &str| {
            self.textfile_dir
                .as_ref()
                .map(|d| format!(" --prometheus {}", d.join(name).display()))
                .unwrap_or_default()
        };
        let fleet = self.fleet.display();
        let drift = format!(
            "{} drift {fleet} --locked{}",
            self.binary.display(),
            textfile("nixgold-drift.prom")
        );
        let cycle = format!(
            "{} cycle {fleet} --plan-out {}{}{}",
            self.binary.display(),
            self.plan_out.display(),
            if self.apply { " --apply" } else { "" },
            textfile("nixgold-cycle.prom")
        );
        vec![
            (
                "nixgold-drift.service".into(),
                self.service("Compare the cluster with the fleet (nixgold drift)", &drift),
            ),
            (
                "nixgold-drift.timer".into(),
                timer("Check for drift", &self.drift_calendar),
            ),
            (
                "nixgold-cycle.service".into(),
                self.service(
                    "The quarterly cycle: update, plan, apply if opted in (nixgold cycle)",
                    &cycle,
                ),
            ),
            (
                "nixgold-cycle.timer".into(),
                timer("Run the quarterly cycle", &self.cycle_calendar),
            ),
        ]
    }

    /// A oneshot service running `command`: exit 2 (drift, changes waiting)
    /// is a result, not a failure; 1 fails the unit (and `OnFailure=` or
    /// the textfile's success metric pages someone).
    fn service(&self, description: &str, command: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "[Unit]\nDescription={description}\nWants=network-online.target\nAfter=network-online.target\n"
        );
        let _ = writeln!(out, "[Service]\nType=oneshot");
        if let Some(dir) = self.fleet.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = writeln!(out, "WorkingDirectory={}", dir.display());
        }
        for name in &self.credentials {
            let _ = writeln!(
                out,
                "LoadCredential={name}:{}\nEnvironment={name}_FILE=%d/{name}",
                self.credentials_dir.join(name).display()
            );
        }
        let _ = writeln!(
            out,
            "ExecStart={command}\nSuccessExitStatus=2\nStateDirectory=nixgold\nNoNewPrivileges=yes\nPrivateTmp=yes"
        );
        out
    }
}

fn timer(description: &str, calendar: &str) -> String {
    format!(
        "[Unit]\nDescription={description}\n\n[Timer]\nOnCalendar={calendar}\nPersistent=true\nRandomizedDelaySec=5m\n\n[Install]\nWantedBy=timers.target\n"
    )
}
