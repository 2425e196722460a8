//! `drift`: a refresh-only plan for timers and CI (DESIGN §9). It reads the
//! cluster like `plan` and says what changed outside nixgold, what is
//! missing, what apply would destroy, which stamped VMs left the fleet,
//! which VMs run an older generation than their image's current one, and
//! which VMs in the cluster this fleet does not manage. It writes nothing
//! but, on request, a Prometheus textfile (for node_exporter's textfile
//! collector); the lockfile is never touched.
//!
//! Drift — exit code 2 — is anything apply would do, plus stamped VMs that
//! left the fleet. Older generations (`on_new_generation = keep` is a
//! choice) and unmanaged VMs are reported, not counted as drift.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::Serialize;

use crate::ids::{NodeName, Vmid};
use crate::live::{LiveState, fleet_tag};
use crate::lock::Lockfile;
use crate::plan::{Action, Change, FieldDiff, Plan};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// In the cluster, but not as the fleet says (apply updates or replaces it).
    Changed,
    /// In the fleet, not in the cluster (apply creates or builds it).
    Missing,
    /// Apply would destroy it (an old generation beyond `rebuild.keep`).
    Destroy,
    /// Stamped by this fleet, no longer in it (kept until `--allow-destroy`).
    Removed,
    /// Runs an older generation than its image's current one.
    OldGeneration,
    /// Has configuration changes Proxmox holds until the VM's next cold
    /// start (cores, memory, … of a running VM).
    Pending,
    /// In the cluster, not managed by this fleet.
    Unmanaged,
    /// Its NixOS moved on by itself (a `nixos-rebuild` inside): it runs
    /// another system than its generation installed.
    GuestMoved,
    /// Its guest could not be looked into (no agent, stopped, no privilege).
    NotInspectable,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Changed,
        Kind::Missing,
        Kind::Destroy,
        Kind::Removed,
        Kind::OldGeneration,
        Kind::Pending,
        Kind::Unmanaged,
        Kind::GuestMoved,
        Kind::NotInspectable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Changed => "changed",
            Kind::Missing => "missing",
            Kind::Destroy => "destroy",
            Kind::Removed => "removed",
            Kind::OldGeneration => "old_generation",
            Kind::Pending => "pending",
            Kind::Unmanaged => "unmanaged",
            Kind::GuestMoved => "guest_moved",
            Kind::NotInspectable => "not_inspectable",
        }
    }

    /// Whether this kind is drift (exit code 2) or only information.
    pub fn is_drift(self) -> bool {
        !matches!(
            self,
            Kind::OldGeneration | Kind::Pending | Kind::Unmanaged | Kind::NotInspectable
        )
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: Kind,
    /// `vm.NAME`, `image.NAME[node]`, `iso.NAME[node]`, or `vmid.N` for a VM
    /// this fleet does not manage.
    pub address: String,
    pub detail: String,
    /// The fields that differ (secrets as `sensitive`, never their value).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldDiff>,
    /// What the guest runs against what was installed (`guest_moved`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<crate::inspect::Moved>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub fleet: String,
    pub findings: Vec<Finding>,
    /// The plan's notes: differences it does not act on.
    pub notes: Vec<String>,
    pub api_calls: u64,
    /// VMs whose guest runs what their generation installed; of them, those
    /// compared by release only (the token cannot run commands in them).
    pub guests_in_sync: usize,
    pub guests_by_release_only: usize,
    /// The plan behind the drifted findings, for the text rendering.
    #[serde(skip)]
    changes: Vec<Change>,
}

impl Drift {
    /// The findings of `plan` (computed without `--allow-destroy` or
    /// targets) and of the live state it was computed from.
    pub fn new(plan: &Plan, live: &LiveState, lock: &Lockfile) -> Self {
        let mut findings: Vec<Finding> = plan
            .changes
            .iter()
            .map(|c| Finding {
                kind: match c.action {
                    Action::Create => Kind::Missing,
                    Action::Update | Action::Replace => Kind::Changed,
                    Action::Destroy => Kind::Destroy,
                },
                address: c.address.to_string(),
                detail: c.reason.clone(),
                fields: c.fields.clone(),
                guest: None,
            })
            .collect();
        findings.extend(plan.kept.iter().map(|(address, vmid)| Finding {
            kind: Kind::Removed,
            address: address.clone(),
            detail: format!("VMID {vmid} is stamped by this fleet but no longer in it"),
            fields: Vec::new(),
            guest: None,
        }));
        let managed_by_plan: BTreeSet<&str> = findings.iter().map(|f| f.address.as_str()).collect();
        let extra = Self::live_findings(plan, live, lock, &managed_by_plan);
        findings.extend(extra);
        Drift {
            fleet: plan.fleet.clone(),
            findings,
            notes: plan.notes.clone(),
            api_calls: plan.api_calls,
            guests_in_sync: 0,
            guests_by_release_only: 0,
            changes: plan.changes.clone(),
        }
    }

    /// What the cluster shows beyond the plan: this fleet's VMs on an
    /// older generation than the current one, and VMs nixgold does not
    /// manage.
    fn live_findings(
        plan: &Plan,
        live: &LiveState,
        lock: &Lockfile,
        managed_by_plan: &BTreeSet<&str>,
    ) -> Vec<Finding> {
        let tag = fleet_tag(&plan.fleet);
        let templates: BTreeSet<Vmid> = lock
            .images
            .values()
            .flat_map(|i| &i.generations)
            .flat_map(|g| &g.templates)
            .map(|t| t.vmid)
            .collect();
        let mut extra = Vec::new();
        for vm in live.vms.values() {
            let stamp = vm.stamp().filter(|s| s.fleet == plan.fleet);
            if let Some(stamp) = &stamp
                && let (Some(address), Some(image), Some(generation)) =
                    (stamp.vm_address(), &stamp.image, stamp.generation)
                && let Some(current) = lock.images.get(image).map(|i| i.current)
                && generation < current
                && !managed_by_plan.contains(address)
            {
                extra.push(Finding {
                    kind: Kind::OldGeneration,
                    address: address.to_owned(),
                    detail: format!(
                        "runs image.{image} generation {generation}; the current generation is {current}"
                    ),
                    fields: Vec::new(),
                    guest: None,
                });
            }
            let ours = stamp.is_some() || vm.tags.contains(&tag) || templates.contains(&vm.vmid);
            if !ours {
                let owner = vm
                    .tags
                    .iter()
                    .find(|t| t.starts_with("nixgold."))
                    .map(|t| format!(", tagged {t}"))
                    .unwrap_or_default();
                extra.push(Finding {
                    kind: Kind::Unmanaged,
                    address: format!("vmid.{}", vm.vmid),
                    detail: format!(
                        "{} on {}{}{owner}",
                        vm.name.as_deref().unwrap_or("(no name)"),
                        vm.node,
                        if vm.template { ", a template" } else { "" }
                    ),
                    fields: Vec::new(),
                    guest: None,
                });
            }
        }
        extra
    }

    /// The running VMs of this fleet whose stored configuration is not in
    /// effect yet: (address, node, VMID) to read `/pending` of.
    pub fn running_vms(plan: &Plan, live: &LiveState) -> Vec<(String, NodeName, Vmid)> {
        live.vms
            .values()
            .filter(|vm| vm.running == Some(true))
            .filter_map(|vm| {
                let stamp = vm.stamp()?;
                let address = stamp.vm_address().filter(|_| stamp.fleet == plan.fleet)?;
                Some((address.to_owned(), vm.node.clone(), vm.vmid))
            })
            .collect()
    }

    /// Records what `/pending` of `address` holds back (one API call).
    pub fn add_pending(&mut self, address: &str, entries: &[pve_api::types::PendingEntry]) {
        self.api_calls += 1;
        let waiting: Vec<String> = entries
            .iter()
            .filter(|e| e.key != "cipassword")
            .filter_map(|e| match (&e.pending, e.delete) {
                (Some(p), _) => Some(format!(
                    "{} {} -> {p}",
                    e.key,
                    e.value.as_deref().unwrap_or("(unset)")
                )),
                (None, Some(_)) => Some(format!("{} (removed)", e.key)),
                _ => None,
            })
            .collect();
        if !waiting.is_empty() {
            self.findings.push(Finding {
                kind: Kind::Pending,
                address: address.to_owned(),
                detail: format!("waits for a cold start: {}", waiting.join(", ")),
                fields: Vec::new(),
                guest: None,
            });
        }
    }

    /// Records what looking into `address`'s guest found.
    pub fn add_guest(&mut self, address: &str, outcome: crate::inspect::Outcome) {
        use crate::inspect::Outcome;
        let (kind, detail, guest) = match outcome {
            Outcome::InSync { by_release_only } => {
                self.guests_in_sync += 1;
                self.guests_by_release_only += usize::from(by_release_only);
                return;
            }
            Outcome::Moved(moved) => (Kind::GuestMoved, moved.detail(), Some(moved)),
            Outcome::NotInspectable(detail) => (Kind::NotInspectable, detail, None),
        };
        self.findings.push(Finding {
            kind,
            address: address.to_owned(),
            detail,
            fields: Vec::new(),
            guest,
        });
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.findings.iter().filter(|f| f.kind == kind).count()
    }

    pub fn has_drift(&self) -> bool {
        self.findings.iter().any(|f| f.kind.is_drift())
    }

    /// The report for people: the drifted resources in the plan's grammar,
    /// the guests that moved on by themselves, the informational findings,
    /// the notes, then a summary line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let apply_drift = self
            .findings
            .iter()
            .any(|f| f.kind.is_drift() && f.kind != Kind::GuestMoved);
        if apply_drift {
            let _ = writeln!(
                out,
                "Drift in fleet `{}`: apply would change these resources:",
                self.fleet
            );
            for change in &self.changes {
                crate::render::write_change(change, &mut out);
            }
            for f in self.findings.iter().filter(|f| f.kind == Kind::Removed) {
                let _ = writeln!(
                    out,
                    "\n  # {} is no longer in the fleet ({}); plan --allow-destroy removes it",
                    f.address, f.detail
                );
            }
        } else if !self.has_drift() {
            let _ = writeln!(out, "No drift: the cluster matches fleet `{}`.", self.fleet);
        }
        for (kind, title) in [
            (
                Kind::GuestMoved,
                "Drift inside the guests: NixOS moved on by itself (a `nixos-rebuild` inside; apply does not undo it)",
            ),
            (Kind::OldGeneration, "VMs on an older generation"),
            (
                Kind::Pending,
                "VMs whose configuration waits for a shutdown and start",
            ),
            (Kind::Unmanaged, "VMs this fleet does not manage"),
            (
                Kind::NotInspectable,
                "VMs nixgold cannot look inside (not inspectable, so not known to be in sync)",
            ),
        ] {
            self.write_section(kind, title, &mut out);
        }
        if self.guests_in_sync > 0 {
            let _ = write!(
                out,
                "\nInside the guests: {} VM(s) run what their generation installed",
                self.guests_in_sync
            );
            let _ = writeln!(
                out,
                "{}.",
                match self.guests_by_release_only {
                    0 => String::new(),
                    n => format!(
                        " ({n} compared by release only: the token lacks VM.GuestAgent.Unrestricted to read the system path)"
                    ),
                }
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "\nNote: {note}");
        }
        let counts: Vec<String> = Kind::ALL
            .iter()
            .map(|k| format!("{} {}", self.count(*k), k.name().replace('_', " ")))
            .collect();
        let _ = writeln!(out, "\nDrift: {}.", counts.join(", "));
        out
    }

    /// `title:` and one line per finding of `kind`, if there are any.
    fn write_section(&self, kind: Kind, title: &str, out: &mut String) {
        let found: Vec<&Finding> = self.findings.iter().filter(|f| f.kind == kind).collect();
        if found.is_empty() {
            return;
        }
        let _ = writeln!(out, "\n{title}:");
        for f in found {
            let _ = writeln!(out, "  {}: {}", f.address, f.detail);
        }
    }

    /// A Prometheus textfile (exposition format) of this report.
    pub fn prometheus(&self, now_secs: u64) -> String {
        let fleet = label(&self.fleet);
        let mut out = run_metrics(&self.fleet, true, now_secs);
        gauge(
            &mut out,
            "nixgold_drift_detected",
            "Whether the cluster differs from the fleet (1) or not (0).",
            &[(format!("fleet=\"{fleet}\""), u64::from(self.has_drift()))],
        );
        gauge(
            &mut out,
            "nixgold_drift_resources",
            "Resources by kind of finding.",
            &Kind::ALL
                .iter()
                .map(|k| {
                    (
                        format!("fleet=\"{fleet}\",kind=\"{}\"", k.name()),
                        self.count(*k) as u64,
                    )
                })
                .collect::<Vec<_>>(),
        );
        gauge(
            &mut out,
            "nixgold_drift_resource",
            "One series per finding.",
            &self
                .findings
                .iter()
                .map(|f| {
                    (
                        format!(
                            "fleet=\"{fleet}\",kind=\"{}\",address=\"{}\"",
                            f.kind.name(),
                            label(&f.address)
                        ),
                        1,
                    )
                })
                .collect::<Vec<_>>(),
        );
        gauge(
            &mut out,
            "nixgold_drift_guest_moved",
            "One series per VM whose NixOS moved on by itself: what it runs and what its generation installed.",
            &self
                .findings
                .iter()
                .filter_map(|f| Some((f, f.guest.as_ref()?)))
                .map(|(f, g)| {
                    (
                        format!(
                            "fleet=\"{fleet}\",address=\"{}\",running=\"{}\",installed=\"{}\"",
                            label(&f.address),
                            label(&g.running_version),
                            label(&g.installed_version)
                        ),
                        1,
                    )
                })
                .collect::<Vec<_>>(),
        );
        gauge(
            &mut out,
            "nixgold_drift_guests_in_sync",
            "VMs whose guest runs what their generation installed.",
            &[(format!("fleet=\"{fleet}\""), self.guests_in_sync as u64)],
        );
        gauge(
            &mut out,
            "nixgold_drift_api_calls",
            "Proxmox API calls the check took.",
            &[(format!("fleet=\"{fleet}\""), self.api_calls)],
        );
        out
    }
}

/// The textfile of a check that could not run: success 0, and when.
pub fn prometheus_failure(fleet: &str, now_secs: u64) -> String {
    run_metrics(fleet, false, now_secs)
}

/// Whether the check ran, and when: the first series of every textfile.
fn run_metrics(fleet: &str, success: bool, now_secs: u64) -> String {
    let fleet = format!("fleet=\"{}\"", label(fleet));
    let mut out = String::new();
    gauge(
        &mut out,
        "nixgold_drift_success",
        "Whether the last drift check could read the cluster (1) or failed (0).",
        &[(fleet.clone(), u64::from(success))],
    );
    gauge(
        &mut out,
        "nixgold_drift_last_run_timestamp_seconds",
        "When the last drift check ran (Unix time).",
        &[(fleet, now_secs)],
    );
    out
}

pub(crate) fn gauge(out: &mut String, name: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// A label value escaped as the exposition format wants it.
pub(crate) fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
