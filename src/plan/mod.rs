//! The plan: desired graph against live state, as ordered changes.
//!
//! The planner decides everything — VMIDs, nodes, the exact config each
//! write carries, the digest it must match — so apply only executes (STYLE:
//! the planner decides, the executor obeys). Diffs compare canonical forms
//! (MACs, key order, tag order and case, sizes), so a freshly applied fleet
//! plans empty. Identity is checked before anything is touched: a VMID held
//! by a VM without this fleet's stamp is an error, never adopted — unless
//! `nixgold import` recorded the adoption in the lockfile (`adopt`).

//!
//! The parts: `change` (the change types), `address` (`--target`,
//! `--replace`), `iso` (downloads), `template` (builds and retired
//! generations), `vm` (VM changes), `canonical` (value comparison),
//! `capacity` (storage notes), [`saved`] and [`target`] (saved plans and
//! their check before apply).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::address::Address;
use crate::desired::{DesiredGraph, DesiredNode, DesiredVm};
use crate::fleet::Fleet;
use crate::live::{LiveState, LiveVm, fleet_tag};
use crate::lock::Lockfile;
use crate::stamp::Stamp;

mod address;
pub mod adopt;
mod canonical;
mod capacity;
mod change;
mod dag;
mod iso;
mod rollout;
pub mod saved;
pub mod target;
mod template;
mod vm;

use address::{near_hint, targeted, unknown_addresses};

pub use capacity::capacity_notes;
pub use change::{Action, Change, FieldDiff, Impact, Phase, VmWork, Work};
pub use rollout::Rollout;
pub use vm::desired_config;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub fleet: String,
    pub changes: Vec<Change>,
    /// Stamped VMs no longer in the fleet, kept because `--allow-destroy`
    /// was not given (address, VMID).
    pub kept: Vec<(String, u32)>,
    /// Fingerprint of the live state the plan was computed from.
    pub live_fingerprint: String,
    /// sha256 of the lockfile text the plan was computed from.
    pub lock_fingerprint: String,
    /// Templates found built and stamped but missing from the lockfile (an
    /// apply interrupted after the build): recorded by the next apply.
    pub adopted: Vec<crate::build::BuildResult>,
    /// Generations beyond `rebuild.keep` that stay because VMs use them
    /// (address of the generation, VMs).
    pub retained: Vec<(String, Vec<String>)>,
    /// Differences the plan does not act on, for people to decide.
    #[serde(default)]
    pub notes: Vec<String>,
    /// The lockfile after this plan (new allocations and pins).
    #[serde(skip)]
    pub lock: Lockfile,
    /// API calls the live state took.
    pub api_calls: u64,
    /// The replacements of VMs that follow new generations, in batches
    /// behind health gates (the fleet's `rollout`).
    #[serde(default)]
    pub rollout: Option<Rollout>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn count(&self, action: Action) -> usize {
        self.changes.iter().filter(|c| c.action == action).count()
    }

    /// Points every build at the embedded simulator's guests (`--sim`);
    /// see [`crate::build::Access::localise`].
    pub fn localise_builds(&mut self, guest_port: u16) {
        for change in &mut self.changes {
            if let Work::BuildTemplate { build, .. } = &mut change.work {
                build.access.localise(guest_port);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "{address}: VMID {vmid} is taken by a VM nixgold does not own (`{name}` on {node})\n  hint: give {address} another VMID, or remove that VM; nixgold never adopts a VM silently"
    )]
    Foreign {
        address: String,
        vmid: u32,
        name: String,
        node: String,
    },
    #[error(
        "{address}: VMID {vmid} on {node} is a clone in progress (lock: clone) — wait or re-run\n  hint: a clone keeps running in Proxmox when the apply that started it was interrupted; once it finishes (the lock goes), plan or apply again and nixgold finishes the VM. Do not remove it"
    )]
    CloneInProgress {
        address: String,
        vmid: u32,
        node: String,
    },
    #[error(
        "{address}: VMID {vmid} is stamped as {stamp}, not as {address} of fleet `{fleet}`\n  hint: the VMID belongs to another resource or fleet; choose another VMID"
    )]
    OtherOwner {
        address: String,
        vmid: u32,
        stamp: String,
        fleet: String,
    },
    #[error(
        "image `{image}` generation {generation}: its template (VMID {vmid} on {node}) is missing from the cluster\n  hint: `nixgold rollback` to a kept generation whose template exists, or remove [image.{image}] from the lockfile to build a new generation"
    )]
    MissingTemplate {
        image: String,
        generation: u32,
        vmid: u32,
        node: String,
    },
    #[error(
        "storage `{storage}` does not exist on node `{node}` (needed by {address})\n  hint: fix the fleet's storage names, or add the storage in Proxmox"
    )]
    NoStorage {
        storage: String,
        node: String,
        address: String,
    },
    #[error(
        "{address}: VM {vmid} is locked ({lock})\n  hint: wait for the operation holding it to finish, then plan again"
    )]
    Locked {
        address: String,
        vmid: u32,
        lock: String,
    },
    #[error(
        "--replace {address}: the fleet has no such VM\n  hint: {}",
        near_hint(near, "name a VM of the fleet as vm.NAME")
    )]
    UnknownReplace { address: String, near: Vec<String> },
    #[error(
        "--target {address}: neither the fleet nor the cluster has this resource\n  hint: {}",
        near_hint(near, "name a resource as vm.NAME, image.NAME or iso.NAME")
    )]
    UnknownTarget { address: String, near: Vec<String> },
    #[error(
        "internal error: the plan's change {address} depends on {depends_on}, which is not a change of the plan\n  hint: this is a bug in nixgold; please report it with the fleet file"
    )]
    Edge { address: String, depends_on: String },
    #[error(
        "internal error: the plan's changes depend on each other in a cycle (through {address})\n  hint: this is a bug in nixgold; please report it with the fleet file"
    )]
    Cycle { address: String },
    #[error(
        "{address} must be replaced ({reason}), but the fleet marks it prevent_destroy\n  hint: remove prevent_destroy to allow it, or undo the change"
    )]
    PreventDestroy { address: String, reason: String },
    #[error(
        "{address}: adopting VMID {vmid} would replace it ({reason})\n  hint: an import never recreates a VM; change the fleet to match it (`nixgold init --from-cluster --vmid {vmid}` shows what it is)"
    )]
    AdoptWouldReplace {
        address: String,
        vmid: u32,
        reason: String,
    },
    #[error(
        "{address}: the ISO `{iso}` is not pinned or not on {node}\n  hint: plan without --locked to pin it"
    )]
    IsoMissing {
        address: String,
        iso: String,
        node: String,
    },
}

/// Options of one planning run (saved with a plan: apply re-derives the
/// plan with them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanOptions {
    pub allow_destroy: bool,
    /// Limit to these addresses (`vm.NAME`, `iso.NAME`); empty: everything.
    pub targets: Vec<String>,
    /// VMs to destroy and re-create although they match the fleet
    /// (`vm.NAME`, terraform's `-replace`).
    pub replace: Vec<String>,
}

/// Computes the plan. `lock_text` is the lockfile the desired graph came
/// from. The steps, in order: ISOs to download, templates to check or
/// build, VMs to create, update or replace, stamped VMs the fleet no longer
/// has, generations to retire, storage notes.
pub fn plan(
    fleet: &Fleet,
    desired: &DesiredGraph,
    live: &LiveState,
    lock_text: &str,
    options: &PlanOptions,
) -> Result<Plan, Vec<PlanError>> {
    let mut p = Planner::new(fleet, desired, live, options);
    let mut lock = desired.lock.clone();
    p.isos();
    p.templates();
    p.vms();
    p.orphans();
    adopt::drop_settled(&mut lock, live);
    p.retire(&mut lock);
    dag::link_downloads(&mut p.changes);
    p.notes
        .extend(capacity_notes(fleet, &p.vms, &p.changes, live));
    if !p.errors.is_empty() {
        return Err(p.errors);
    }
    let changes = dag::order(p.changes).map_err(|e| vec![e])?;
    let rollout = rollout::plan(fleet, &changes);
    Ok(Plan {
        fleet: fleet.fleet.clone(),
        changes,
        kept: p.kept,
        adopted: p.adopted,
        retained: p.retained,
        notes: p.notes,
        live_fingerprint: live.fingerprint(),
        lock_fingerprint: lock_fingerprint(lock_text),
        lock,
        api_calls: live.calls,
        rollout,
    })
}

/// One planning run, as its steps fill it.
struct Planner<'a> {
    fleet: &'a Fleet,
    desired: &'a DesiredGraph,
    live: &'a LiveState,
    options: &'a PlanOptions,
    /// The VMs this run plans: all, or the targeted ones.
    vms: Vec<&'a DesiredVm>,
    /// The images those VMs are cloned from.
    images: BTreeSet<&'a str>,
    errors: Vec<PlanError>,
    changes: Vec<Change>,
    notes: Vec<String>,
    /// Template VMIDs VMs can be cloned from: checked, or built by this plan.
    template_ok: BTreeSet<u32>,
    /// Templates this plan builds: VMID → the build's address.
    building: BTreeMap<u32, Address>,
    /// Built templates missing from the lockfile.
    adopted: Vec<crate::build::BuildResult>,
    /// Stamped VMs left alone without `--allow-destroy`.
    kept: Vec<(String, u32)>,
    /// Generations beyond `rebuild.keep` that linked clones keep.
    retained: Vec<(String, Vec<String>)>,
}

impl<'a> Planner<'a> {
    fn new(
        fleet: &'a Fleet,
        desired: &'a DesiredGraph,
        live: &'a LiveState,
        options: &'a PlanOptions,
    ) -> Self {
        let vms: Vec<&DesiredVm> = desired
            .graph
            .node_weights()
            .filter_map(|n| match n {
                DesiredNode::Vm(vm) if targeted(options, &format!("vm.{}", vm.name)) => {
                    Some(vm.as_ref())
                }
                _ => None,
            })
            .collect();
        Planner {
            images: vms.iter().map(|v| v.image.as_str()).collect(),
            vms,
            errors: unknown_addresses(fleet, live, options),
            fleet,
            desired,
            live,
            options,
            changes: Vec::new(),
            notes: desired.notes.clone(),
            template_ok: BTreeSet::new(),
            building: BTreeMap::new(),
            adopted: Vec::new(),
            kept: Vec::new(),
            retained: Vec::new(),
        }
    }
}

pub fn lock_fingerprint(lock_text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(lock_text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Stamped VMs as the fleet knows them, for `nixgold output`.
pub fn owned<'a>(
    live: &'a LiveState,
    fleet: &str,
) -> impl Iterator<Item = (&'a LiveVm, Stamp)> + 'a {
    let tag = fleet_tag(fleet);
    let fleet = fleet.to_owned();
    live.vms
        .values()
        .filter(move |v| v.tags.contains(&tag))
        .filter_map(move |v| {
            let stamp = v.stamp()?;
            (stamp.fleet == fleet).then_some((v, stamp))
        })
}
