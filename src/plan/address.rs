//! `--target` and `--replace`: which addresses a run names, and which
//! names it cannot mean (an error listing the near matches).

use std::collections::BTreeSet;

use super::{PlanError, PlanOptions};
use crate::fleet::Fleet;
use crate::live::{LiveState, LiveVm};

/// The hint of an unknown address: the near matches, or `otherwise`.
pub(super) fn near_hint(near: &[String], otherwise: &str) -> String {
    if near.is_empty() {
        otherwise.to_owned()
    } else {
        format!("did you mean {}?", near.join(", "))
    }
}

/// Addresses among `known` that look like `address` (a typo away), closest first.
fn near_matches<'a>(address: &str, known: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> = known
        .map(|k| (strsim::levenshtein(address, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(3)
        .map(|(_, k)| k.to_owned())
        .collect()
}

/// `--target` and `--replace` addresses the run cannot mean: a target must
/// name a resource of the fleet, or a VM of this fleet still in the cluster
/// (to destroy it); `--replace` names a VM of the fleet.
pub(super) fn unknown_addresses(
    fleet: &Fleet,
    live: &LiveState,
    options: &PlanOptions,
) -> Vec<PlanError> {
    let vms: Vec<String> = fleet.vms.keys().map(|n| format!("vm.{n}")).collect();
    let stamped = live
        .vms
        .values()
        .filter_map(LiveVm::stamp)
        .filter(|s| s.fleet == fleet.fleet)
        .map(|s| s.resource);
    let mut targets: BTreeSet<String> = vms.iter().cloned().chain(stamped).collect();
    targets.extend(fleet.images.keys().map(|n| format!("image.{n}")));
    targets.extend(fleet.isos.keys().map(|n| format!("iso.{n}")));
    let unknown_replace = options
        .replace
        .iter()
        .filter(|a| !vms.contains(a))
        .map(|a| PlanError::UnknownReplace {
            near: near_matches(a, vms.iter().map(String::as_str)),
            address: a.clone(),
        });
    let unknown_target = options
        .targets
        .iter()
        .filter(|a| !targets.contains(*a))
        .map(|a| PlanError::UnknownTarget {
            near: near_matches(a, targets.iter().map(String::as_str)),
            address: a.clone(),
        });
    unknown_replace.chain(unknown_target).collect()
}

pub(super) fn targeted(options: &PlanOptions, address: &str) -> bool {
    options.targets.is_empty() || options.targets.iter().any(|t| t == address)
}
