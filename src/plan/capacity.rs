//! What the plan's new volumes take from each storage, against what it
//! has free.

use std::collections::BTreeMap;

use pve_api::property::Drive;

use super::{Change, Work};
use crate::desired::DesiredVm;
use crate::fleet::Fleet;
use crate::live::LiveState;

/// What the plan's new volumes take from each storage, against what it has
/// free: a warning when thick storage (LVM, ZFS) cannot hold them, since
/// it reserves every volume's whole size and apply would fail; a note when
/// thin storage is over-committed, since its volumes take space only as
/// guests write. Template builds and full clones allocate their disk, a
/// grown disk its growth; linked clones share their template's blocks.
pub fn capacity_notes(
    fleet: &Fleet,
    vms: &[&DesiredVm],
    changes: &[Change],
    live: &LiveState,
) -> Vec<String> {
    let alloc = planned_allocations(fleet, vms, changes, live);
    // Shared storage is one pool, whichever node allocates.
    let mut pools: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ((node, storage), bytes) in alloc {
        let shared = live
            .storages
            .get(&(node.clone(), storage.clone()))
            .is_some_and(|s| s.shared);
        let place = if shared { "*".to_owned() } else { node };
        *pools.entry((place, storage)).or_default() += bytes;
    }
    let gib = |b: u64| format!("{:.1}G", b as f64 / (1u64 << 30) as f64).replace(".0G", "G");
    let mut notes = Vec::new();
    for ((place, storage), bytes) in pools {
        let found = live
            .storages
            .iter()
            .find(|((n, s), _)| *s == storage && (place == "*" || *n == place));
        let Some(((node, _), st)) = found else {
            continue;
        };
        let free = st.free();
        if bytes <= free || bytes == 0 {
            continue;
        }
        let on = if st.shared {
            String::new()
        } else {
            format!(" on {node}")
        };
        notes.push(if st.is_thin() {
            format!(
                "storage `{storage}`{on} is thin ({}): the plan's new volumes ({}) over-commit its {} free; they take space only as guests write, and fill it when they do",
                st.plugin,
                gib(bytes),
                gib(free)
            )
        } else {
            format!(
                "warning: storage `{storage}`{on} ({}) cannot hold what the plan allocates: {} needed, {} free; thick storage reserves every volume's size, so apply will fail there",
                st.plugin,
                gib(bytes),
                gib(free)
            )
        });
    }
    notes
}

/// Bytes the plan's new volumes take, by (node, storage).
fn planned_allocations(
    fleet: &Fleet,
    vms: &[&DesiredVm],
    changes: &[Change],
    live: &LiveState,
) -> BTreeMap<(String, String), u64> {
    let mut alloc: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut add = |node: &str, storage: &str, bytes: u64| {
        *alloc
            .entry((node.to_owned(), storage.to_owned()))
            .or_default() += bytes;
    };
    let disk = |vmid: u32| {
        vms.iter()
            .find(|v| v.vmid.get() == vmid)
            .map(|v| (v.storage.as_str(), v.disk.mib() << 20))
    };
    for change in changes {
        match &change.work {
            Work::BuildTemplate { build, .. } => {
                let image = &fleet.images[&build.image];
                add(&build.node, &build.storage, image.hardware.disk.mib() << 20);
            }
            Work::CreateVm(w) | Work::ReplaceVm { new: w, .. } if w.full_clone => {
                if let Some((storage, bytes)) = disk(w.vmid) {
                    add(&w.node, w.storage.as_deref().unwrap_or(storage), bytes);
                }
            }
            Work::UpdateVm(w) if w.resize.is_some() => {
                let live_vm = live.vms.get(&w.vmid);
                let have = live_vm
                    .and_then(|v| v.config.as_ref()?.values.get("scsi0"))
                    .and_then(|d| Drive::parse(d).size())
                    .unwrap_or(0);
                let storage = live_vm.and_then(|v| v.disk_volid()?.split(':').next());
                if let (Some((_, want)), Some(storage)) = (disk(w.vmid), storage) {
                    add(&w.node, storage, want.saturating_sub(have));
                }
            }
            _ => {}
        }
    }
    alloc
}
