//! The rollout a plan carries: VMs that follow new generations
//! (`on_new_generation = replace`) replaced in batches, each behind the
//! fleet's health gates (checked at apply time).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{Action, Change};
use crate::fleet::{Fleet, Gates, OnNewGeneration, VmNetwork};
use crate::ids::HumanDuration;

/// A plan's rollout: the replacements in batches, and what each must pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Addresses (`vm.NAME`), batch by batch.
    pub batches: Vec<Vec<String>>,
    pub pause: Option<HumanDuration>,
    pub gates: Gates,
    /// The static address of the VMs that have one (for the TCP and HTTP
    /// gates); the others are asked through their guest agent.
    pub addresses: BTreeMap<String, IpAddr>,
}

/// The rollout of `changes` under the fleet's `rollout`, if it has one and
/// the plan replaces VMs that follow new generations.
pub fn plan(fleet: &Fleet, changes: &[Change]) -> Option<Rollout> {
    let spec = fleet.rollout.as_ref()?;
    let mut rolling: Vec<String> = changes
        .iter()
        .filter(|c| c.action == Action::Replace)
        .map(|c| c.address.to_string())
        .filter(|a| {
            fleet
                .vms
                .get(a.trim_start_matches("vm."))
                .is_some_and(|vm| vm.on_new_generation == OnNewGeneration::Replace)
        })
        .collect();
    if rolling.is_empty() {
        return None;
    }
    rolling.sort_unstable();
    let size = spec.batch.of(rolling.len());
    let addresses = rolling
        .iter()
        .filter_map(|a| match &fleet.vms[a.trim_start_matches("vm.")].network {
            VmNetwork::Static { ip, .. } => Some((a.clone(), IpAddr::V4(ip.addr()))),
            VmNetwork::Dhcp { .. } => None,
        })
        .collect();
    Some(Rollout {
        batches: rolling.chunks(size).map(<[String]>::to_vec).collect(),
        pause: spec.pause,
        gates: spec.gates.clone(),
        addresses,
    })
}

impl Rollout {
    /// Whether `address` is replaced by this rollout.
    pub fn contains(&self, address: &str) -> bool {
        self.batches.iter().flatten().any(|a| a == address)
    }

    /// The gates, for people: `agent (5m), tcp 22 (2m)`, or `none`.
    pub fn gates_text(&self) -> String {
        let g = &self.gates;
        let gates: Vec<String> = [
            g.agent
                .as_ref()
                .map(|a| format!("guest agent ({})", a.timeout)),
            g.tcp
                .as_ref()
                .map(|t| format!("TCP port {} ({})", t.port, t.timeout)),
            g.http
                .as_ref()
                .map(|h| format!("HTTP GET :{}{} ({})", h.port, h.path, h.timeout)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if gates.is_empty() {
            "none".to_owned()
        } else {
            gates.join(", ")
        }
    }
}
