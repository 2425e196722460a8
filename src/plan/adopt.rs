//! Adoption as the planner sees it: what `nixgold import` recorded in the
//! lockfile turns into changes that stamp an imported template or adopt an
//! unstamped VM (`crate::import` records; this plans; apply writes).

use std::collections::BTreeMap;

use pve_api::property::normalise_tags;

use super::{Action, Change, FieldDiff, Impact, PlanError, Work};
use crate::address::Address;
use crate::desired::{DesiredGraph, DesiredNode, DesiredTemplate, GenerationRef};
use crate::ids::Vmid;
use crate::live::{LiveState, fleet_tag};
use crate::lock::{ImageLock, Lockfile};
use crate::stamp::Stamp;

/// The stamp of an imported template: no build results, `imported=true`.
pub fn template_stamp(fleet: &str, image: &str, generation: u32) -> Stamp {
    Stamp {
        fleet: fleet.to_owned(),
        resource: format!("image.{image}"),
        generation: Some(generation),
        imported: true,
        ..Stamp::default()
    }
}

/// Whether the plan adopts the unstamped VM at `vmid` as `address`.
pub fn adopting(lock: &Lockfile, address: &str, vmid: Vmid) -> bool {
    lock.adopt.get(address) == Some(&vmid)
}

/// Whether `image` runs on an imported generation and builds nothing: its
/// template was not installed from the fleet's ISO, so the ISO waits for
/// the first build instead of being downloaded by the adoption.
pub fn iso_unneeded(desired: &DesiredGraph, image: &str) -> bool {
    let imported = desired
        .lock
        .images
        .get(image)
        .and_then(ImageLock::current_generation)
        .is_some_and(|g| g.imported);
    imported
        && !desired.graph.node_weights().any(|n| {
            matches!(n, DesiredNode::Template(t)
                if t.image == image && matches!(t.generation, GenerationRef::ToBuild(_)))
        })
}

/// Drops adoptions that are done (the VM carries a stamp) or moot (the VM
/// is gone): a record must never adopt a VM created later at that VMID.
pub fn drop_settled(lock: &mut Lockfile, live: &LiveState) {
    lock.adopt.retain(|_, vmid| {
        live.vms
            .get(vmid)
            .is_some_and(|vm| vm.config.is_some() && vm.stamp().is_none())
    });
}

/// Drops the adoptions apply has just written (their change is done).
pub fn settle(lock: &mut Lockfile, done: &[&str]) {
    lock.adopt
        .retain(|address, _| !done.contains(&address.as_str()));
}

/// The change that stamps an imported template, if it is not stamped yet.
pub fn template_change(
    fleet: &str,
    lock: &Lockfile,
    t: &DesiredTemplate,
    generation: u32,
    live: &LiveState,
) -> Result<Option<Change>, PlanError> {
    let imported = lock
        .images
        .get(&t.image)
        .and_then(|l| l.generations.iter().find(|g| g.number == generation))
        .is_some_and(|g| g.imported);
    let Some(vm) = live.vms.get(&t.vmid) else {
        return Ok(None);
    };
    let Some(config) = vm.config.as_ref().filter(|_| imported) else {
        return Ok(None);
    };
    let resource = format!("image.{}", t.image);
    match vm.stamp() {
        Some(s) if s.is(fleet, &resource) => return Ok(None),
        Some(s) => {
            return Err(PlanError::OtherOwner {
                address: resource,
                vmid: vm.vmid.get(),
                stamp: format!("{} of fleet `{}`", s.resource, s.fleet),
                fleet: fleet.to_owned(),
            });
        }
        None => {}
    }
    let (set, fields) = stamp_fields(
        &config.values,
        &template_stamp(fleet, &t.image, generation).to_string(),
        fleet,
    );
    Ok(Some(Change {
        address: Address::image(&t.image, t.node.as_str()),
        action: Action::Update,
        depends_on: Vec::new(),
        fields,
        reason: format!(
            "adopting imported generation {generation} (nixgold import): stamp and tags"
        ),
        impact: Impact::None,
        work: Work::AdoptTemplate {
            image: t.image.clone(),
            vmid: vm.vmid,
            node: vm.node.clone(),
            set,
            digest: config.digest.clone(),
        },
        unchanged: BTreeMap::new(),
    }))
}

/// Description with `stamp` as its last line, and the fleet's tags added.
fn stamp_fields(
    values: &BTreeMap<String, String>,
    stamp: &str,
    fleet: &str,
) -> (BTreeMap<String, String>, Vec<FieldDiff>) {
    let description = values
        .get("description")
        .map(|d| d.trim_end())
        .unwrap_or_default();
    let new_description = if description.is_empty() {
        stamp.to_owned()
    } else {
        format!("{description}\n\n{stamp}")
    };
    let tags = values.get("tags").map(String::as_str).unwrap_or_default();
    let own = fleet_tag(fleet);
    let new_tags = normalise_tags([tags, "nixgold", own.as_str()]);
    let diff = |field: &str, before: &str, after: &str| FieldDiff {
        field: field.to_owned(),
        before: (!before.is_empty()).then(|| before.to_owned()),
        after: Some(after.to_owned()),
        sensitive: false,
    };
    let fields = vec![
        diff("description", description, &new_description),
        diff("tags", tags, &new_tags),
    ];
    let set = BTreeMap::from([
        ("description".to_owned(), new_description),
        ("tags".to_owned(), new_tags),
    ]);
    (set, fields)
}
