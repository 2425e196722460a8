//! The plan as a DAG: the edges the planner has not set while planning
//! (a build waits for the download of its ISO), the check of every edge,
//! and the one order render, `graph --plan` and apply share.
//!
//! An edge points at a change of the same plan; what already exists (a
//! template that is built, an ISO in its storage) is no change and needs
//! no edge — the planner checked it. The order is topological, and among
//! the changes that are ready at once, by phase and then by address, so it
//! is the same for the same plan.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use super::{Change, PlanError, Work};
use crate::address::Address;
use crate::ids::NodeName;

/// A build waits for the download of its ISO in the same plan (on its
/// node, or the one download of a shared storage): it never boots a file
/// that was not downloaded and verified.
pub(super) fn link_downloads(changes: &mut [Change]) {
    let downloads: Vec<(Address, NodeName, String)> = changes
        .iter()
        .filter_map(|c| match &c.work {
            Work::DownloadIso {
                node,
                storage,
                filename,
                ..
            } => Some((
                c.address.clone(),
                node.clone(),
                format!("{storage}:iso/{filename}"),
            )),
            _ => None,
        })
        .collect();
    for change in changes.iter_mut() {
        let Work::BuildTemplate { build, .. } = &change.work else {
            continue;
        };
        let same_file = || downloads.iter().filter(|(_, _, v)| *v == build.iso_volid);
        let here: Vec<Address> = same_file()
            .filter(|(_, node, _)| *node == build.node)
            .map(|(a, _, _)| a.clone())
            .collect();
        if here.is_empty() {
            change
                .depends_on
                .extend(same_file().map(|(a, _, _)| a.clone()));
        } else {
            change.depends_on.extend(here);
        }
    }
}

/// Checks the edges and returns the changes in the plan's order: every
/// change after the changes it depends on.
pub(super) fn order(changes: Vec<Change>) -> Result<Vec<Change>, PlanError> {
    let index: BTreeMap<&Address, usize> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (&c.address, i))
        .collect();
    let mut waiting = vec![0usize; changes.len()];
    let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); changes.len()];
    for (i, change) in changes.iter().enumerate() {
        for dep in &change.depends_on {
            let Some(&d) = index.get(dep) else {
                return Err(PlanError::Edge {
                    address: change.address.to_string(),
                    depends_on: dep.to_string(),
                });
            };
            waiting[i] += 1;
            dependants[d].push(i);
        }
    }
    let key = |i: usize| Reverse((changes[i].phase(), changes[i].address.clone(), i));
    let mut ready: BinaryHeap<_> = (0..changes.len())
        .filter(|i| waiting[*i] == 0)
        .map(key)
        .collect();
    let mut sorted = Vec::with_capacity(changes.len());
    while let Some(Reverse((_, _, i))) = ready.pop() {
        sorted.push(i);
        for &j in &dependants[i] {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                ready.push(key(j));
            }
        }
    }
    if let Some(stuck) = (0..changes.len()).find(|i| waiting[*i] > 0) {
        return Err(PlanError::Cycle {
            address: changes[stuck].address.to_string(),
        });
    }
    let mut slots: Vec<Option<Change>> = changes.into_iter().map(Some).collect();
    Ok(sorted.into_iter().filter_map(|i| slots[i].take()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Action, Impact};

    fn change(address: &str, depends_on: &[&str]) -> Change {
        Change {
            address: address.parse().unwrap(),
            action: Action::Destroy,
            depends_on: depends_on.iter().map(|a| a.parse().unwrap()).collect(),
            fields: Vec::new(),
            reason: String::new(),
            impact: Impact::None,
            work: Work::DestroyVm {
                vmid: crate::ids::Vmid::new(100).unwrap(),
                node: "pve".parse().unwrap(),
            },
            unchanged: BTreeMap::new(),
        }
    }

    fn addresses(changes: &[Change]) -> Vec<String> {
        changes.iter().map(|c| c.address.to_string()).collect()
    }

    #[test]
    fn dependants_come_after_what_they_depend_on() {
        let sorted = order(vec![
            change("vm.a", &["vm.c"]),
            change("vm.b", &[]),
            change("vm.c", &[]),
        ])
        .unwrap();
        assert_eq!(addresses(&sorted), ["vm.b", "vm.c", "vm.a"]);
    }

    #[test]
    fn a_cycle_and_an_edge_out_of_the_plan_are_errors() {
        let cycle = order(vec![change("vm.a", &["vm.b"]), change("vm.b", &["vm.a"])]);
        assert!(matches!(cycle, Err(PlanError::Cycle { .. })), "{cycle:?}");
        let dangling = order(vec![change("vm.a", &["vm.gone"])]);
        assert!(
            matches!(&dangling, Err(PlanError::Edge { depends_on, .. }) if depends_on == "vm.gone"),
            "{dangling:?}"
        );
    }
}
