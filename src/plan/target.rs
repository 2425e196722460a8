//! The target a saved plan was made for: which cluster (the fleet's
//! Proxmox endpoint, or the embedded simulator and its state directory) and
//! which fleet. `apply PLANFILE` refuses to run a plan anywhere else — a
//! plan saved with `--sim` must not reach the real endpoint because `--sim`
//! was forgotten — and says why.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::saved::SavedPlanError;

/// The cluster a plan talks to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Cluster {
    /// The fleet's `proxmox.endpoint` (or `PROXMOX_VE_ENDPOINT`).
    Endpoint { url: String },
    /// `--sim`: the embedded simulator keeping its state in `state_dir`.
    Simulator { state_dir: PathBuf },
}

/// Where a saved plan may be applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanTarget {
    pub cluster: Cluster,
    /// The fleet's name: the stamp on every VM it owns.
    pub fleet: String,
}

impl PlanTarget {
    /// The target of a run with (`sim`) or without the simulator.
    pub fn current(sim: bool, fleet: &crate::fleet::Fleet) -> Self {
        let cluster = if sim {
            Cluster::Simulator {
                state_dir: absolute(&crate::connect::sim_dir()),
            }
        } else {
            Cluster::Endpoint {
                url: crate::connect::endpoint(fleet),
            }
        };
        PlanTarget {
            cluster,
            fleet: fleet.fleet.clone(),
        }
    }

    /// The command that applies the plan saved at `path` to this target.
    pub fn apply_command(&self, path: &Path) -> String {
        match self.cluster {
            Cluster::Simulator { .. } => format!("nixgold --sim apply {}", path.display()),
            Cluster::Endpoint { .. } => format!("nixgold apply {}", path.display()),
        }
    }

    /// Refuses `now` unless it is the target the plan was saved for.
    pub fn check(&self, now: &PlanTarget, path: &Path) -> Result<(), SavedPlanError> {
        if self == now {
            return Ok(());
        }
        let why = if self.fleet != now.fleet {
            format!(
                "it was made for fleet `{}`, the fleet file now names `{}`",
                self.fleet, now.fleet
            )
        } else {
            format!(
                "it was made for {}, this run targets {}",
                self.cluster, now.cluster
            )
        };
        Err(SavedPlanError::OtherTarget {
            path: path.to_owned(),
            why,
            command: self.apply_command(path),
            now: now.cluster.to_string(),
        })
    }
}

impl fmt::Display for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cluster::Endpoint { url } => write!(f, "the Proxmox endpoint {url}"),
            Cluster::Simulator { state_dir } => write!(
                f,
                "the embedded simulator (--sim, state in {})",
                state_dir.display()
            ),
        }
    }
}

impl fmt::Display for PlanTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (fleet `{}`)", self.cluster, self.fleet)
    }
}

/// `path` made absolute against the working directory, so that the same
/// simulator compares equal from wherever the plan is applied.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}
