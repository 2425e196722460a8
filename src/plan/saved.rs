//! Saved plans (`plan --out`) and their check before apply: a saved plan
//! runs only on the cluster and fleet it was made for, with the lockfile
//! and live state it was made against, and only if re-deriving it from its
//! own fleet file, lockfile and the cluster gives the same changes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::target::PlanTarget;
use super::{Action, Plan, PlanOptions};
use crate::address::Address;
use crate::lock::Lockfile;

/// The `format` of a saved plan file: the prefix says it is one, the number
/// which shape it has (2: changes carry `depends_on`, the plan's DAG).
const FORMAT_PREFIX: &str = "nixgold-plan/";
const FORMAT: &str = "nixgold-plan/2";

/// A plan saved by `plan --out`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedPlan {
    pub format: String,
    pub fleet_path: PathBuf,
    pub lock_path: PathBuf,
    /// The lockfile text the plan goes with.
    pub lock_text: String,
    /// The options the plan was made with; apply re-derives the plan with
    /// them and refuses any change they do not give.
    #[serde(default)]
    pub options: PlanOptions,
    pub plan: Plan,
    /// The cluster and fleet the plan was made for (absent in plans saved
    /// before nixgold recorded it: those are refused).
    #[serde(default)]
    pub target: Option<PlanTarget>,
}

/// Why a saved plan is not applied.
#[derive(Debug, thiserror::Error)]
pub enum SavedPlanError {
    #[error("{}: not a usable saved plan: {reason}", path.display())]
    Unusable { path: PathBuf, reason: String },
    #[error(
        "{flags} cannot change a saved plan ({} is applied exactly as planned)\n  hint: pass {flags} to `nixgold plan --out` and apply the new file",
        path.display()
    )]
    Flags { flags: String, path: PathBuf },
    #[error(
        "{} is a saved plan of another nixgold version ({found}; this one reads {FORMAT})\n  hint: run `nixgold plan --out` again with this nixgold",
        path.display()
    )]
    OtherFormat { path: PathBuf, found: String },
    #[error(
        "{} does not say which cluster it was planned for (saved by an older nixgold)\n  hint: run `nixgold plan --out` again",
        path.display()
    )]
    NoTarget { path: PathBuf },
    #[error(
        "refusing to apply {}: {why}\n  hint: `{command}` applies it where it was planned; to change {now} instead, run `nixgold plan` there",
        path.display()
    )]
    OtherTarget {
        path: PathBuf,
        why: String,
        command: String,
        now: String,
    },
    #[error(
        "{} changed since the plan was saved\n  hint: run `nixgold plan` again",
        path.display()
    )]
    LockChanged { path: PathBuf },
    #[error(
        "the cluster changed since the plan was saved\n  hint: run `nixgold plan` again and review the new plan"
    )]
    ClusterChanged,
    #[error(
        "refusing the saved plan: change `{address}` ({}) {why}\n  hint: the plan file was edited after `nixgold plan --out` (or by another nixgold version); plan again and review it. Nothing was changed.",
        format!("{action:?}").to_lowercase()
    )]
    Edited {
        address: String,
        action: Action,
        why: &'static str,
    },
    #[error(
        "refusing the saved plan: its changes are in another order, or its adopted templates differ, from what the fleet, the lockfile and the cluster give\n  hint: plan again and review it. Nothing was changed."
    )]
    Reordered,
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
}

impl SavedPlan {
    /// `plan` saved with what it was made from.
    pub fn new(
        fleet_path: &Path,
        lock_path: &Path,
        lock_text: String,
        options: &PlanOptions,
        plan: &Plan,
        target: PlanTarget,
    ) -> Self {
        SavedPlan {
            format: FORMAT.into(),
            fleet_path: fleet_path.to_owned(),
            lock_path: lock_path.to_owned(),
            lock_text,
            options: options.clone(),
            plan: plan.clone(),
            target: Some(target),
        }
    }

    /// Reads `path` as a saved plan, if it is one.
    pub fn read(path: &Path) -> Option<Result<SavedPlan, SavedPlanError>> {
        let text = std::fs::read_to_string(path).ok()?;
        let value: serde_json::Value = serde_json::from_str(&text).ok()?;
        let format = value.get("format")?.as_str()?;
        if format != FORMAT {
            return format.starts_with(FORMAT_PREFIX).then(|| {
                Err(SavedPlanError::OtherFormat {
                    path: path.to_owned(),
                    found: format.to_owned(),
                })
            });
        }
        Some(
            serde_json::from_value(value).map_err(|e| SavedPlanError::Unusable {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        )
    }

    /// Refuses to apply this plan (read from `path`) to another cluster or
    /// fleet than it was planned for, with flags that would change it, or
    /// after its lockfile changed.
    pub fn check_target(
        &self,
        path: &Path,
        sim: bool,
        options: &PlanOptions,
    ) -> Result<(), SavedPlanError> {
        let flags: Vec<&str> = [
            (!options.targets.is_empty(), "--target"),
            (!options.replace.is_empty(), "--replace"),
            (options.allow_destroy, "--allow-destroy"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect();
        if !flags.is_empty() {
            return Err(SavedPlanError::Flags {
                flags: flags.join(", "),
                path: path.to_owned(),
            });
        }
        let Some(planned) = &self.target else {
            return Err(SavedPlanError::NoTarget {
                path: path.to_owned(),
            });
        };
        let fleet = crate::fleet::load(&self.fleet_path)?;
        planned.check(&PlanTarget::current(sim, &fleet.fleet), path)?;
        let current = std::fs::read_to_string(&self.lock_path).unwrap_or_default();
        if current != self.lock_text {
            return Err(SavedPlanError::LockChanged {
                path: self.lock_path.clone(),
            });
        }
        Ok(())
    }

    /// Refuses the plan if the cluster is no longer the one it was made
    /// against (`live_fingerprint` of the live state read now).
    pub fn check_fresh(&self, live_fingerprint: &str) -> Result<(), SavedPlanError> {
        if live_fingerprint == self.plan.live_fingerprint {
            Ok(())
        } else {
            Err(SavedPlanError::ClusterChanged)
        }
    }

    /// The plan to apply: the saved one, if `derived` — the plan its own
    /// fleet, lockfile and the cluster give now — has the same changes.
    pub fn into_plan(self, derived: &Plan) -> Result<Plan, SavedPlanError> {
        verify(derived, &self.plan)?;
        let mut plan = self.plan;
        // The lockfile is not part of the serialised plan: the saved text is.
        plan.lock = Lockfile::parse(&self.lock_path, &self.lock_text)?;
        Ok(plan)
    }
}

/// Refuses a saved plan unless every change in it is the one the plan's
/// own fleet, lockfile and the live cluster give now: an edited VMID,
/// setting or action, an added change or a dropped one is named and
/// nothing runs. (The cluster and the lockfile are the ones the plan was
/// made against: their fingerprints were checked before.)
fn verify(derived: &Plan, saved: &Plan) -> Result<(), SavedPlanError> {
    let refuse = |address: &Address, action: Action, why: &'static str| SavedPlanError::Edited {
        address: address.to_string(),
        action,
        why,
    };
    for change in &saved.changes {
        match derived.changes.iter().find(|d| d.address == change.address) {
            None => {
                return Err(refuse(
                    &change.address,
                    change.action,
                    "is not justified by the fleet, the lockfile and the cluster",
                ));
            }
            Some(d) if d != change => {
                return Err(refuse(
                    &change.address,
                    change.action,
                    "differs from what the fleet, the lockfile and the cluster give",
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(missing) = derived
        .changes
        .iter()
        .find(|d| !saved.changes.iter().any(|c| c.address == d.address))
    {
        return Err(refuse(
            &missing.address,
            missing.action,
            "was removed from the plan file",
        ));
    }
    if derived.changes != saved.changes || derived.adopted != saved.adopted {
        return Err(SavedPlanError::Reordered);
    }
    Ok(())
}
