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
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Changed,
        Kind::Missing,
        Kind::Destroy,
        Kind::Removed,
        Kind::OldGeneration,
        Kind::Pending,
        Kind::Unmanaged,
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
        }
    }

    /// Whether this kind is drift (exit code 2) or only information.
    pub fn is_drift(self) -> bool {
        !matches!(self, Kind::OldGeneration | Kind::Pending | Kind::Unmanaged)
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub fleet: String,
    pub findings: Vec<Finding>,
    /// The plan's notes: differences it does not act on.
    pub notes: Vec<String>,
    pub api_calls: u64,
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
                address: c.address.clone(),
                detail: c.reason.clone(),
                fields: c.fields.clone(),
            })
            .collect();
        findings.extend(plan.kept.iter().map(|(address, vmid)| Finding {
            kind: Kind::Removed,
            address: address.clone(),
            detail: format!("VMID {vmid} is stamped by this fleet but no longer in it"),
            fields: Vec::new(),
        }));
        let tag = fleet_tag(&plan.fleet);
        let templates: BTreeSet<u32> = lock
            .images
            .values()
            .flat_map(|i| &i.generations)
            .flat_map(|g| &g.templates)
            .map(|t| t.vmid.get())
            .collect();
        let managed_by_plan: BTreeSet<&str> = findings.iter().map(|f| f.address.as_str()).collect();
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
                });
            }
        }
        findings.extend(extra);
        Drift {
            fleet: plan.fleet.clone(),
            findings,
            notes: plan.notes.clone(),
            api_calls: plan.api_calls,
            changes: plan.changes.clone(),
        }
    }

    /// The running VMs of this fleet whose stored configuration is not in
    /// effect yet: (address, node, VMID) to read `/pending` of.
    pub fn running_vms(plan: &Plan, live: &LiveState) -> Vec<(String, String, u32)> {
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
            });
        }
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.findings.iter().filter(|f| f.kind == kind).count()
    }

    pub fn has_drift(&self) -> bool {
        self.findings.iter().any(|f| f.kind.is_drift())
    }

    /// The report for people: the drifted resources in the plan's grammar,
    /// then the notes, then a summary line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if self.has_drift() {
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
        } else {
            let _ = writeln!(out, "No drift: the cluster matches fleet `{}`.", self.fleet);
        }
        for (kind, title) in [
            (Kind::OldGeneration, "VMs on an older generation"),
            (
                Kind::Pending,
                "VMs whose configuration waits for a shutdown and start",
            ),
            (Kind::Unmanaged, "VMs this fleet does not manage"),
        ] {
            let found: Vec<&Finding> = self.findings.iter().filter(|f| f.kind == kind).collect();
            if found.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n{title}:");
            for Finding {
                kind: _,
                address,
                detail,
                fields: _,
            } in found
            {
                let _ = writeln!(out, "  {address}: {detail}");
            }
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

fn gauge(out: &mut String, name: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// A label value escaped as the exposition format wants it.
fn label(value: &str) -> String {
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
