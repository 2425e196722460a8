//! The plan: desired graph against live state, as ordered changes.
//!
//! The planner decides everything — VMIDs, nodes, the exact config each
//! write carries, the digest it must match — so apply only executes (STYLE:
//! the planner decides, the executor obeys). Diffs compare canonical forms
//! (MACs, key order, tag order and case, sizes), so a freshly applied fleet
//! plans empty. Identity is checked before anything is touched: a VMID held
//! by a VM without this fleet's stamp is an error, never adopted.

use std::collections::{BTreeMap, BTreeSet};

use pve_api::property::{
    Drive, IpConfig, Net, agent_enabled, decode_sshkeys, encode_sshkeys, normalise_tags,
};
use serde::{Deserialize, Serialize};

use crate::desired::{
    DesiredGraph, DesiredNode, DesiredTemplate, DesiredVm, GenerationRef, IsoPinState, iso_filename,
};
use crate::fleet::{CloneMode, Fleet, OnNewGeneration, SecretRef, VmNetwork};
use crate::live::{LiveState, LiveVm, fleet_tag};
use crate::lock::Lockfile;

/// The kind of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    Replace,
    Destroy,
}

impl Action {
    pub fn symbol(self) -> &'static str {
        match self {
            Action::Create => "+",
            Action::Update => "~",
            Action::Replace => "-/+",
            Action::Destroy => "-",
        }
    }

    pub fn is_destructive(self) -> bool {
        matches!(self, Action::Replace | Action::Destroy)
    }
}

/// What a change does to a running system, worst first when combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Impact {
    None,
    Hotplug,
    NeedsReboot,
    /// Shut down and started by apply (`restart_on_change`).
    Restart,
    Replace,
    DataLoss,
}

impl Impact {
    pub fn describe(self) -> &'static str {
        match self {
            Impact::None => "no impact",
            Impact::Hotplug => "applied live",
            Impact::NeedsReboot => "needs a reboot to take effect",
            Impact::Restart => "the VM is shut down and started to apply it",
            Impact::Replace => "replaces the VM",
            Impact::DataLoss => "destroys data",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldDiff {
    pub field: String,
    pub before: Option<String>,
    pub after: Option<String>,
    /// Rendered as `(sensitive)`; the value is never in the plan.
    pub sensitive: bool,
}

/// What apply must do, completely decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Work {
    DownloadIso {
        node: String,
        storage: String,
        url: String,
        filename: String,
        sha256: String,
    },
    CreateVm(VmWork),
    UpdateVm(VmWork),
    ReplaceVm {
        old_node: String,
        new: VmWork,
    },
    DestroyVm {
        vmid: u32,
        node: String,
    },
    /// Remove a template of a generation beyond `rebuild.keep`.
    DestroyTemplate {
        image: String,
        generation: u32,
        vmid: u32,
        node: String,
        /// The build of this image in the same plan, which must succeed first.
        after: Option<String>,
    },
    /// Build one generation of an image on one node.
    BuildTemplate {
        build: Box<crate::build::BuildWork>,
        /// A leftover build VM of an interrupted or failed build holds the
        /// VMID: destroy it first.
        cleanup_first: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmWork {
    pub vmid: u32,
    pub node: String,
    pub name: String,
    pub template_vmid: u32,
    pub template_node: String,
    pub full_clone: bool,
    /// Target storage of a full clone.
    pub storage: Option<String>,
    /// Config keys to write (all on create; the changed ones on update).
    pub set: BTreeMap<String, String>,
    /// The password reference to resolve at apply time, when it must be set.
    pub password: Option<SecretRef>,
    /// Grow `scsi0` to this size (`40G`).
    pub resize: Option<String>,
    pub start: bool,
    /// Shut down and start a running VM so its pending changes apply.
    #[serde(default)]
    pub restart: bool,
    /// The digest the update was planned against.
    pub digest: Option<String>,
    /// Addresses of changes this one waits for (ISO, template).
    pub after: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub address: String,
    pub action: Action,
    pub fields: Vec<FieldDiff>,
    pub reason: String,
    pub impact: Impact,
    pub work: Work,
    /// Attributes an update leaves as they are, so that `plan --json` shows
    /// the whole resource before and after (terraform's `before`/`after`);
    /// the text plan shows only `fields`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unchanged: BTreeMap<String, String>,
}

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
    pub rollout: Option<crate::rollout::Rollout>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn count(&self, action: Action) -> usize {
        self.changes.iter().filter(|c| c.action == action).count()
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
        "{address} must be replaced ({reason}), but the fleet marks it prevent_destroy\n  hint: remove prevent_destroy to allow it, or undo the change"
    )]
    PreventDestroy { address: String, reason: String },
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

/// The ownership stamp written into every VM's description.
pub fn stamp(fleet: &str, address: &str, image: &str, generation: u32) -> String {
    format!("nixgold: fleet={fleet} resource={address} image={image} generation={generation}")
}

/// Parses a stamp line from a description: (fleet, resource, image, generation).
pub fn read_stamp(description: &str) -> Option<BTreeMap<String, String>> {
    let line = description
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("nixgold: "))?;
    Some(
        line.trim_start()
            .trim_start_matches("nixgold: ")
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// The hint of an unknown address: the near matches, or `otherwise`.
fn near_hint(near: &[String], otherwise: &str) -> String {
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
fn unknown_addresses(fleet: &Fleet, live: &LiveState, options: &PlanOptions) -> Vec<PlanError> {
    let vms: Vec<String> = fleet.vms.keys().map(|n| format!("vm.{n}")).collect();
    let stamped = live
        .vms
        .values()
        .filter_map(LiveVm::stamp)
        .filter(|s| s.get("fleet") == Some(&fleet.fleet))
        .filter_map(|s| s.get("resource").cloned());
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

fn targeted(options: &PlanOptions, address: &str) -> bool {
    options.targets.is_empty() || options.targets.iter().any(|t| t == address)
}

/// Computes the plan. `lock` is the lockfile the desired graph came from.
pub fn plan(
    fleet: &Fleet,
    desired: &DesiredGraph,
    live: &LiveState,
    lock_text: &str,
    options: &PlanOptions,
) -> Result<Plan, Vec<PlanError>> {
    let mut errors = unknown_addresses(fleet, live, options);
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    let tag = fleet_tag(&fleet.fleet);

    // Which ISOs and templates targeted VMs need.
    let targeted_vms: Vec<&DesiredVm> = desired
        .graph
        .node_weights()
        .filter_map(|n| match n {
            DesiredNode::Vm(vm) if targeted(options, &format!("vm.{}", vm.name)) => {
                Some(vm.as_ref())
            }
            _ => None,
        })
        .collect();
    let needed_images: BTreeSet<&str> = targeted_vms.iter().map(|v| v.image.as_str()).collect();

    for node in desired.graph.node_weights() {
        let DesiredNode::Iso(iso) = node else {
            continue;
        };
        let users: Vec<&str> = fleet
            .images
            .iter()
            .filter(|(_, i)| i.iso == iso.name)
            .map(|(n, _)| n.as_str())
            .collect();
        let address = format!("iso.{}", iso.name);
        let wanted = targeted(options, &address) || users.iter().any(|u| needed_images.contains(u));
        if !wanted {
            continue;
        }
        let node_name = iso.node.to_string();
        let place = (node_name.clone(), iso.storage.clone());
        if !live.storages.contains_key(&place) {
            errors.push(PlanError::NoStorage {
                storage: iso.storage.clone(),
                node: node_name,
                address: address.clone(),
            });
            continue;
        }
        let IsoPinState::Pinned { url, sha256 } = &iso.pin else {
            // Pins are resolved before planning; an unresolved one here
            // matters only if a build would need it.
            continue;
        };
        let filename = iso_filename(url, &sha256.to_string());
        let volid = format!("{}:iso/{filename}", iso.storage);
        let present = live
            .isos
            .get(&place)
            .is_some_and(|v| v.iter().any(|vol| vol.volid == volid));
        if !present {
            changes.push(Change {
                address: format!("{address}[{}]", iso.node),
                action: Action::Create,
                fields: vec![
                    FieldDiff {
                        field: "volume".into(),
                        before: None,
                        after: Some(volid),
                        sensitive: false,
                    },
                    FieldDiff {
                        field: "sha256".into(),
                        before: None,
                        after: Some(sha256.to_string()),
                        sensitive: false,
                    },
                ],
                reason: format!("not in storage `{}` on {}", iso.storage, iso.node),
                impact: Impact::None,
                work: Work::DownloadIso {
                    node: iso.node.to_string(),
                    storage: iso.storage.clone(),
                    url: url.clone(),
                    filename,
                    sha256: sha256.to_string(),
                },
                unchanged: BTreeMap::new(),
            });
        }
    }

    // Templates the targeted VMs clone from: built (checked), or to build.
    let mut template_ok: BTreeSet<u32> = BTreeSet::new();
    let mut building: BTreeMap<u32, String> = BTreeMap::new();
    let mut adopted = Vec::new();
    for node in desired.graph.node_weights() {
        let DesiredNode::Template(t) = node else {
            continue;
        };
        let address = format!("image.{}[{}]", t.image, t.node);
        let wanted = needed_images.contains(t.image.as_str())
            || targeted(options, &format!("image.{}", t.image));
        if !wanted {
            continue;
        }
        match t.generation {
            GenerationRef::Pinned(_) => match check_template(t, live) {
                Ok(()) => {
                    template_ok.insert(t.vmid.get());
                }
                Err(e) => errors.push(e),
            },
            GenerationRef::ToBuild(n) => {
                let existing = live.vms.get(&t.vmid.get());
                let stamp = existing.and_then(LiveVm::stamp);
                let ours = stamp.as_ref().is_some_and(|s| {
                    s.get("fleet") == Some(&fleet.fleet)
                        && s.get("resource") == Some(&format!("image.{}", t.image))
                });
                match (existing, ours) {
                    (Some(vm), true)
                        if vm.template
                            && stamp.as_ref().is_some_and(|s| {
                                s.get("generation") == Some(&n.to_string())
                                    && s.get("inputs") == Some(&t.input_hash)
                            }) =>
                    {
                        let description = vm
                            .config
                            .as_ref()
                            .and_then(|c| c.values.get("description"))
                            .cloned()
                            .unwrap_or_default();
                        if let Some(result) =
                            crate::build::result_from_stamp(&description, &vm.node, vm.vmid)
                        {
                            adopted.push(result);
                        }
                        template_ok.insert(t.vmid.get());
                    }
                    (Some(vm), false) => errors.push(PlanError::Foreign {
                        address,
                        vmid: vm.vmid,
                        name: vm.name.clone().unwrap_or_default(),
                        node: vm.node.clone(),
                    }),
                    (existing, _) => match build_change(fleet, desired, t, n, existing.is_some()) {
                        Ok(change) => {
                            building.insert(t.vmid.get(), change.address.clone());
                            template_ok.insert(t.vmid.get());
                            changes.push(change);
                        }
                        Err(e) => errors.push(e),
                    },
                }
            }
        }
    }

    let desired_ids: BTreeSet<u32> = targeted_vms.iter().map(|v| v.vmid.get()).collect();
    for vm in &targeted_vms {
        if !template_ok.contains(&vm.template_vmid.get()) {
            continue;
        }
        let image = &fleet.images[&vm.image];
        let force = options.replace.contains(&format!("vm.{}", vm.name));
        if !force && let Some(note) = placement_note(vm, live) {
            notes.push(note);
        }
        notes.extend(held_by_prevent_destroy(fleet, vm, live));
        match plan_vm(fleet, vm, image, live, &tag, force) {
            Ok(Some(mut change)) => {
                if let Some(build) = building.get(&vm.template_vmid.get()) {
                    match &mut change.work {
                        Work::CreateVm(w) | Work::UpdateVm(w) | Work::ReplaceVm { new: w, .. } => {
                            w.after.push(build.clone())
                        }
                        _ => {}
                    }
                }
                changes.push(change)
            }
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }

    // Stamped VMs the fleet no longer has (or that moved to another VMID).
    let mut kept = Vec::new();
    let fleet_addresses: BTreeMap<String, u32> = targeted_vms
        .iter()
        .map(|v| (format!("vm.{}", v.name), v.vmid.get()))
        .collect();
    for vm in live
        .vms
        .values()
        .filter(|v| v.tags.contains(&tag) && !v.template)
    {
        let Some(stamp) = vm.stamp() else { continue };
        if stamp.get("fleet") != Some(&fleet.fleet) {
            continue;
        }
        let address = stamp.get("resource").cloned().unwrap_or_default();
        let still_wanted =
            fleet_addresses.get(&address) == Some(&vm.vmid) || desired_ids.contains(&vm.vmid);
        let in_fleet = fleet.vms.contains_key(address.trim_start_matches("vm."));
        if still_wanted
            || !targeted(options, &address)
            || (in_fleet && !options.targets.is_empty() && !fleet_addresses.contains_key(&address))
        {
            continue;
        }
        if !options.allow_destroy {
            kept.push((address, vm.vmid));
            continue;
        }
        changes.push(Change {
            address: address.clone(),
            action: Action::Destroy,
            fields: vec![FieldDiff {
                field: "vmid".into(),
                before: Some(vm.vmid.to_string()),
                after: None,
                sensitive: false,
            }],
            reason: if in_fleet {
                "the fleet gives it another VMID".into()
            } else {
                "no longer in the fleet".into()
            },
            impact: Impact::DataLoss,
            work: Work::DestroyVm {
                vmid: vm.vmid,
                node: vm.node.clone(),
            },
            unchanged: BTreeMap::new(),
        });
    }

    let mut lock = desired.lock.clone();
    let retained = retire_generations(fleet, desired, live, &building, &mut lock, &mut changes);
    notes.extend(capacity_notes(fleet, &targeted_vms, &changes, live));
    if !errors.is_empty() {
        return Err(errors);
    }
    changes.sort_by_key(order_key);
    let rollout = crate::rollout::plan(fleet, &changes);
    Ok(Plan {
        fleet: fleet.fleet.clone(),
        changes,
        kept,
        adopted,
        retained,
        notes,
        live_fingerprint: live.fingerprint(),
        lock_fingerprint: lock_fingerprint(lock_text),
        rollout,
        lock,
        api_calls: live.calls,
    })
}

/// The note for a VM that would follow its image's new generation but is
/// marked `prevent_destroy`: it is never replaced, and stays where it is.
fn held_by_prevent_destroy(fleet: &Fleet, vm: &DesiredVm, live: &LiveState) -> Option<String> {
    let spec = &fleet.vms[&vm.name];
    if spec.on_new_generation != OnNewGeneration::Replace || !spec.prevent_destroy {
        return None;
    }
    let stamp = live.vms.get(&vm.vmid.get())?.stamp()?;
    let running: u32 = stamp.get("generation")?.parse().ok()?;
    (stamp.get("image") == Some(&vm.image) && running != vm.generation.number()).then(|| {
        format!(
            "vm.{} stays on image.{} generation {running}: it follows new generations, but prevent_destroy keeps it from being replaced (generation {} is current)",
            vm.name,
            vm.image,
            vm.generation.number()
        )
    })
}

pub fn lock_fingerprint(lock_text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(lock_text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// VM destroys first (they free VMIDs and storage), then ISOs, builds,
/// VMs, and old templates last (after their replacement exists).
fn order_key(c: &Change) -> (u8, String) {
    let rank = match (&c.work, c.action) {
        (Work::DestroyTemplate { .. }, _) => 4,
        (_, Action::Destroy) => 0,
        (Work::DownloadIso { .. }, _) => 1,
        (Work::BuildTemplate { .. }, _) => 2,
        _ => 3,
    };
    (rank, c.address.clone())
}

/// Plans the removal of generations beyond each image's `rebuild.keep`
/// (the current one, and one being built, always stay). A generation with
/// stamped VMs on it stays too — they may be linked clones that pin it —
/// and is listed in the returned notes. Replicas already gone from the
/// cluster are dropped from `lock` directly.
fn retire_generations(
    fleet: &Fleet,
    desired: &DesiredGraph,
    live: &LiveState,
    building: &BTreeMap<u32, String>,
    lock: &mut Lockfile,
    changes: &mut Vec<Change>,
) -> Vec<(String, Vec<String>)> {
    let mut retained = Vec::new();
    // Only linked clones hold their template (Proxmox refuses to delete a
    // base volume a linked clone uses); full clones are independent. Where
    // the storage cannot say (LVM-thin), a VM is taken to hold it.
    let stamps: Vec<BTreeMap<String, String>> = owned(live, &fleet.fleet)
        .filter(|(vm, _)| {
            vm.disk_volid().is_some_and(|volid| {
                live.linked_disks.contains(volid) || live.clone_mode_unknown.contains(volid)
            })
        })
        .map(|(_, s)| s)
        .collect();
    for (name, image) in &fleet.images {
        let Some(entry) = desired.lock.images.get(name) else {
            continue;
        };
        let build = desired.graph.node_weights().find_map(|n| match n {
            DesiredNode::Template(t)
                if t.image == *name && building.contains_key(&t.vmid.get()) =>
            {
                Some((
                    t.generation.number(),
                    format!("image.{}[{}]", t.image, t.node),
                ))
            }
            _ => None,
        });
        let mut keep: BTreeSet<u32> = BTreeSet::from([entry.current]);
        keep.extend(build.as_ref().map(|(n, _)| *n));
        let mut newest: Vec<u32> = entry.generations.iter().map(|g| g.number).collect();
        newest.sort_unstable_by(|a, b| b.cmp(a));
        for n in newest {
            if keep.len() >= image.rebuild.keep as usize {
                break;
            }
            keep.insert(n);
        }
        for g in entry
            .generations
            .iter()
            .filter(|g| !keep.contains(&g.number))
        {
            let address = format!("image.{name} generation {}", g.number);
            let users: Vec<String> = stamps
                .iter()
                .filter(|s| {
                    s.get("image") == Some(name)
                        && s.get("generation") == Some(&g.number.to_string())
                })
                .filter_map(|s| s.get("resource").cloned())
                .collect();
            if !users.is_empty() {
                retained.push((address, users));
                continue;
            }
            for t in &g.templates {
                if live.vms.get(&t.vmid.get()).is_some_and(|v| v.template) {
                    changes.push(Change {
                        address: format!("image.{name}[{}] generation {}", t.node, g.number),
                        action: Action::Destroy,
                        fields: vec![FieldDiff {
                            field: "vmid".into(),
                            before: Some(t.vmid.to_string()),
                            after: None,
                            sensitive: false,
                        }],
                        reason: format!(
                            "it is beyond rebuild.keep = {} and no linked clone uses it",
                            image.rebuild.keep
                        ),
                        impact: Impact::DataLoss,
                        work: Work::DestroyTemplate {
                            image: name.clone(),
                            generation: g.number,
                            vmid: t.vmid.get(),
                            node: t.node.to_string(),
                            after: build.as_ref().map(|(_, a)| a.clone()),
                        },
                        unchanged: BTreeMap::new(),
                    });
                } else {
                    lock.forget_replica(name, g.number, t.node.as_str());
                }
            }
        }
    }
    retained
}

/// An existing VM cloned otherwise than the fleet now says — linked
/// instead of full or the reverse, or a full clone on another storage:
/// nixgold does not move disks, `--replace` re-creates the VM.
fn placement_note(vm: &DesiredVm, live: &LiveState) -> Option<String> {
    let volid = live.vms.get(&vm.vmid.get())?.disk_volid()?;
    let storage = volid.split(':').next()?;
    let linked = live.linked_disks.contains(volid);
    // Where the listing cannot tell, a disk away from its template's
    // storage is still surely a full clone.
    let template_storage = live
        .vms
        .get(&vm.template_vmid.get())
        .and_then(LiveVm::disk_volid)
        .and_then(|v| v.split(':').next());
    let known =
        !live.clone_mode_unknown.contains(volid) || template_storage.is_some_and(|t| t != storage);
    let mode = |linked: bool| if linked { "linked" } else { "full" };
    let found = match vm.clone {
        CloneMode::Full if !linked && storage != vm.storage => format!(
            "vm.{}'s disk is on storage `{storage}`, the fleet says `{}`",
            vm.name, vm.storage
        ),
        CloneMode::Full | CloneMode::Linked
            if known && linked != (vm.clone == CloneMode::Linked) =>
        {
            format!(
                "vm.{} is a {} clone, the fleet says {}",
                vm.name,
                mode(linked),
                mode(!linked)
            )
        }
        _ => return None,
    };
    Some(format!(
        "{found}; nixgold does not move disks: `--replace vm.{}` re-creates the VM that way.",
        vm.name
    ))
}

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

/// The change that builds generation `n` of `t.image` on `t.node`.
fn build_change(
    fleet: &Fleet,
    desired: &DesiredGraph,
    t: &DesiredTemplate,
    n: u32,
    leftover: bool,
) -> Result<Change, PlanError> {
    let address = format!("image.{}[{}]", t.image, t.node);
    let image = &fleet.images[&t.image];
    let access = match &image.build.address {
        crate::fleet::BuildAddress::CallHome { call_home } => crate::build::Access::CallHome {
            listen: call_home.listen.clone(),
            advertise: call_home.advertise.clone(),
        },
        crate::fleet::BuildAddress::Static { r#static } => crate::build::Access::Static {
            address: r#static.address.to_string(),
            gateway: r#static.gateway.map(|g| g.to_string()),
            ssh_port: r#static.ssh_port,
        },
    };
    let shared = fleet
        .proxmox
        .is_shared(fleet.isos.get(&image.iso).map_or("", |i| i.storage()));
    let iso = desired.graph.node_weights().find_map(|node| match node {
        DesiredNode::Iso(iso) if iso.name == image.iso && (shared || iso.node == t.node) => {
            Some(iso)
        }
        _ => None,
    });
    let (Some(iso), Some(volid)) = (iso, iso.and_then(|i| i.volid.clone())) else {
        return Err(PlanError::IsoMissing {
            address,
            iso: image.iso.clone(),
            node: t.node.to_string(),
        });
    };
    let IsoPinState::Pinned { sha256, .. } = &iso.pin else {
        return Err(PlanError::IsoMissing {
            address,
            iso: image.iso.clone(),
            node: t.node.to_string(),
        });
    };
    let nixos = &image.nixos;
    let services = crate::build::verified_services(&t.image, image);
    let build = crate::build::BuildWork {
        image: t.image.clone(),
        generation: n,
        node: t.node.to_string(),
        vmid: t.vmid.get(),
        iso_volid: volid.clone(),
        iso_sha256: sha256.to_string(),
        input_hash: t.input_hash.clone(),
        vm_config: crate::build::build_vm_config(
            &image.hardware,
            &format!("{}-g{n}", t.image),
            &volid,
        ),
        storage: image.hardware.storage.clone(),
        configuration_nix: crate::nixos::configuration_nix(&t.image, image),
        install_script: crate::nixos::install_script(&t.image, image),
        services,
        boot_wait_ms: u64::try_from(image.build.boot_wait.get().as_millis()).unwrap_or(u64::MAX),
        timeout_secs: image.build.timeout.get().as_secs(),
        timeouts: image.build.timeouts.clone(),
        key_interval_ms: u64::from(image.build.key_interval_ms),
        access,
        guest_agent: nixos.guest_agent,
        fleet: fleet.fleet.clone(),
    };
    let field = |f: &str, v: String| FieldDiff {
        field: f.to_owned(),
        before: None,
        after: Some(v),
        sensitive: false,
    };
    let mut fields = vec![
        field("generation", n.to_string()),
        field("vmid", t.vmid.to_string()),
        field("iso", volid),
        field(
            "access",
            match &build.access {
                crate::build::Access::CallHome { .. } => "call-home".to_owned(),
                crate::build::Access::Static { address, .. } => format!("static {address}"),
            },
        ),
        field(
            "inputs",
            t.input_hash[..12.min(t.input_hash.len())].to_owned(),
        ),
        field(
            "system",
            format!(
                "{} cores, {} MiB, {} on {}",
                image.hardware.cores,
                image.hardware.memory,
                image.hardware.disk,
                image.hardware.storage
            ),
        ),
    ];
    if leftover {
        fields.push(field(
            "cleanup",
            format!("destroy the leftover build VM {}", t.vmid),
        ));
    }
    Ok(Change {
        address,
        action: Action::Create,
        fields,
        reason: format!(
            "build generation {n}: {}",
            t.build_reason.clone().unwrap_or_default()
        ),
        impact: Impact::None,
        work: Work::BuildTemplate {
            build: Box::new(build),
            cleanup_first: leftover,
        },
        unchanged: BTreeMap::new(),
    })
}

fn check_template(t: &DesiredTemplate, live: &LiveState) -> Result<(), PlanError> {
    let generation = t.generation.number();
    let missing = || PlanError::MissingTemplate {
        image: t.image.clone(),
        generation,
        vmid: t.vmid.get(),
        node: t.node.to_string(),
    };
    let vm = live.vms.get(&t.vmid.get()).ok_or_else(missing)?;
    if !vm.template || vm.node != t.node.as_str() {
        return Err(missing());
    }
    Ok(())
}

/// The config keys nixgold owns on a VM, in canonical form (secrets and
/// the MAC excluded: the MAC is whatever Proxmox generated at clone time).
pub fn desired_config(
    fleet: &Fleet,
    vm: &DesiredVm,
    guest_agent: bool,
    generation: u32,
) -> BTreeMap<String, String> {
    let mut c = BTreeMap::new();
    c.insert("name".into(), vm.name.clone());
    c.insert("cores".into(), vm.cores.to_string());
    c.insert("sockets".into(), vm.sockets.to_string());
    c.insert("memory".into(), vm.memory.to_string());
    c.insert("onboot".into(), u8::from(vm.onboot).to_string());
    if guest_agent {
        c.insert("agent".into(), "1".into());
    }
    let mut net = format!("virtio,bridge={}", vm.bridge);
    if let Some(tag) = vm.vlan {
        net.push_str(&format!(",tag={tag}"));
    }
    c.insert("net0".into(), net);
    match &vm.network {
        VmNetwork::Dhcp { .. } => {
            c.insert("ipconfig0".into(), "ip=dhcp".into());
        }
        VmNetwork::Static {
            ip,
            gateway,
            dns,
            search_domain,
            ..
        } => {
            let ipc = IpConfig {
                ip: Some(ip.to_string()),
                gw: gateway.map(|g| g.to_string()),
                ..Default::default()
            };
            c.insert("ipconfig0".into(), ipc.to_string());
            if !dns.is_empty() {
                c.insert(
                    "nameserver".into(),
                    dns.iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            }
            if let Some(sd) = search_domain {
                c.insert("searchdomain".into(), sd.clone());
            }
        }
    }
    if let Some(user) = &vm.user {
        c.insert("ciuser".into(), user.clone());
    }
    if !vm.ssh_keys.is_empty() {
        c.insert(
            "sshkeys".into(),
            encode_sshkeys(vm.ssh_keys.iter().map(String::as_str)),
        );
    }
    let own_tag = fleet_tag(&fleet.fleet);
    let tags: Vec<&str> = vm
        .tags
        .iter()
        .map(String::as_str)
        .chain(["nixgold", own_tag.as_str()])
        .collect();
    c.insert("tags".into(), normalise_tags(tags));
    let stamp = stamp(
        &fleet.fleet,
        &format!("vm.{}", vm.name),
        &vm.image,
        generation,
    );
    let description = if vm.description.trim().is_empty() {
        stamp
    } else {
        format!("{}\n\n{stamp}", vm.description.trim_end())
    };
    c.insert("description".into(), description);
    c
}

/// Compares one key canonically; returns the live value when it differs.
fn differs(key: &str, want: &str, have: Option<&str>) -> bool {
    let Some(have) = have else { return true };
    match key {
        "net0" => {
            let (w, h) = (Net::parse(want), Net::parse(have));
            w.model != h.model
                || w.bridge() != h.bridge()
                || w.options.get("tag") != h.options.get("tag")
        }
        "ipconfig0" => IpConfig::parse(want) != IpConfig::parse(have),
        "sshkeys" => decode_sshkeys(want) != decode_sshkeys(have),
        "tags" => normalise_tags([want]) != normalise_tags([have]),
        "nameserver" => {
            let split = |s: &str| {
                s.split([' ', ',', ';'])
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            };
            split(want) != split(have)
        }
        "memory" => {
            let mib = |s: &str| {
                s.split(',')
                    .find_map(|p| {
                        p.strip_prefix("current=")
                            .or((!p.contains('=')).then_some(p))
                    })
                    .and_then(|v| v.parse::<u64>().ok())
            };
            mib(want) != mib(have)
        }
        "agent" => agent_enabled(want) != agent_enabled(have),
        "description" => want.trim_end() != have.trim_end(),
        _ => want != have,
    }
}

fn field_impact(key: &str, running: bool) -> Impact {
    match key {
        "cores" | "sockets" | "memory" | "agent" if running => Impact::NeedsReboot,
        "ipconfig0" | "nameserver" | "searchdomain" | "ciuser" | "sshkeys" if running => {
            Impact::NeedsReboot
        }
        "cores" | "sockets" | "memory" | "agent" | "ipconfig0" | "nameserver" | "searchdomain"
        | "ciuser" | "sshkeys" => Impact::None,
        _ => Impact::Hotplug,
    }
}

fn show(key: &str, value: &str) -> String {
    match key {
        "sshkeys" => decode_sshkeys(value).join("\n"),
        _ => value.to_owned(),
    }
}

fn plan_vm(
    fleet: &Fleet,
    vm: &DesiredVm,
    image: &crate::fleet::Image,
    live: &LiveState,
    tag: &str,
    force_replace: bool,
) -> Result<Option<Change>, PlanError> {
    let address = format!("vm.{}", vm.name);
    let spec = &fleet.vms[&vm.name];
    let want = desired_config(fleet, vm, image.nixos.guest_agent, vm.generation.number());
    let template_node = if fleet.proxmox.is_shared(&image.hardware.storage) {
        image
            .build_node
            .clone()
            .unwrap_or_else(|| fleet.proxmox.default_node().clone())
            .to_string()
    } else {
        vm.node.to_string()
    };
    let work = |set: BTreeMap<String, String>,
                password: bool,
                resize: Option<String>,
                start: bool,
                digest: Option<String>| VmWork {
        vmid: vm.vmid.get(),
        node: vm.node.to_string(),
        name: vm.name.clone(),
        template_vmid: vm.template_vmid.get(),
        template_node: template_node.clone(),
        full_clone: vm.clone == CloneMode::Full,
        storage: (vm.clone == CloneMode::Full).then(|| vm.storage.clone()),
        set,
        password: if password { vm.password.clone() } else { None },
        resize,
        start,
        restart: false,
        digest,
        after: Vec::new(),
    };
    let create_fields = |want: &BTreeMap<String, String>| -> Vec<FieldDiff> {
        let mut fields: Vec<FieldDiff> = want
            .iter()
            .map(|(k, v)| FieldDiff {
                field: k.clone(),
                before: None,
                after: Some(show(k, v)),
                sensitive: false,
            })
            .collect();
        fields.push(FieldDiff {
            field: "vmid".into(),
            before: None,
            after: Some(format!(
                "{}{}",
                vm.vmid,
                if vm.allocated { " (allocated)" } else { "" }
            )),
            sensitive: false,
        });
        fields.push(FieldDiff {
            field: "node".into(),
            before: None,
            after: Some(vm.node.to_string()),
            sensitive: false,
        });
        fields.push(FieldDiff {
            field: "clone".into(),
            before: None,
            after: Some(format!(
                "{} of image.{} {} (VMID {})",
                if vm.clone == CloneMode::Full {
                    "full"
                } else {
                    "linked"
                },
                vm.image,
                vm.generation,
                vm.template_vmid
            )),
            sensitive: false,
        });
        fields.push(FieldDiff {
            field: "disk".into(),
            before: None,
            after: Some(vm.disk.to_string()),
            sensitive: false,
        });
        if vm.password.is_some() {
            fields.push(FieldDiff {
                field: "cipassword".into(),
                before: None,
                after: None,
                sensitive: true,
            });
        }
        fields.sort_by(|a, b| a.field.cmp(&b.field));
        fields
    };
    let resize_for_create =
        (vm.disk.mib() > image.hardware.disk.mib()).then(|| vm.disk.to_string());

    let Some(existing) = live.vms.get(&vm.vmid.get()) else {
        return Ok(Some(Change {
            address,
            action: Action::Create,
            fields: create_fields(&want),
            reason: "not in the cluster".into(),
            impact: Impact::None,
            work: Work::CreateVm(work(want.clone(), true, resize_for_create, vm.start, None)),
            unchanged: BTreeMap::new(),
        }));
    };
    let config = existing.config.as_ref();
    let stamp = existing.stamp();
    match &stamp {
        // During a clone its target exists as `lock: clone` with partial
        // disks and no description yet (shared/pve-api/NOTES.md, clone):
        // unstamped is not foreign yet.
        None if existing.lock.as_deref() == Some("clone") => {
            return Err(PlanError::CloneInProgress {
                address,
                vmid: vm.vmid.get(),
                node: existing.node.clone(),
            });
        }
        None => {
            return Err(PlanError::Foreign {
                address,
                vmid: vm.vmid.get(),
                name: existing.name.clone().unwrap_or_default(),
                node: existing.node.clone(),
            });
        }
        Some(s) if s.get("fleet") != Some(&fleet.fleet) || s.get("resource") != Some(&address) => {
            return Err(PlanError::OtherOwner {
                address,
                vmid: vm.vmid.get(),
                stamp: format!(
                    "{} of fleet `{}`",
                    s.get("resource").map_or("?", String::as_str),
                    s.get("fleet").map_or("?", String::as_str)
                ),
                fleet: fleet.fleet.clone(),
            });
        }
        Some(_) => {}
    }
    if !existing.tags.contains(tag) && !existing.tags.contains("nixgold") {
        tracing::debug!("{address}: stamped but untagged; the update restores the tags");
    }
    if let Some(lock) = &existing.lock {
        return Err(PlanError::Locked {
            address,
            vmid: vm.vmid.get(),
            lock: lock.clone(),
        });
    }
    let stamp = stamp.expect("checked above");
    let live_generation: Option<u32> = stamp.get("generation").and_then(|g| g.parse().ok());

    // Reasons to replace.
    let mut replace = Vec::new();
    if force_replace {
        replace.push("replacement requested with --replace".to_owned());
    }
    if existing.node != vm.node.as_str() {
        replace.push(format!(
            "it is on node {}, the fleet wants {}",
            existing.node, vm.node
        ));
    }
    if existing.template {
        replace.push("it was converted to a template".to_owned());
    }
    if stamp.get("image") != Some(&vm.image) {
        replace.push(format!(
            "its image changed from {} to {}",
            stamp.get("image").map_or("?", String::as_str),
            vm.image
        ));
    } else if spec.on_new_generation == OnNewGeneration::Replace
        && !spec.prevent_destroy
        && live_generation != Some(vm.generation.number())
    {
        replace.push(format!(
            "image.{} has generation {}, it runs generation {}",
            vm.image,
            vm.generation.number(),
            live_generation.map_or("?".to_owned(), |g| g.to_string())
        ));
    }
    let live_disk = config
        .and_then(|c| c.values.get("scsi0"))
        .map(|v| Drive::parse(v))
        .and_then(|d| d.size());
    let want_disk = vm.disk.mib() << 20;
    if let Some(have) = live_disk
        && have > want_disk
    {
        replace.push(format!(
            "its disk is {} and disks cannot shrink to {}",
            pve_api::property::format_size(have),
            vm.disk
        ));
    }
    if !replace.is_empty() {
        let reason = replace.join("; ");
        if spec.prevent_destroy {
            return Err(PlanError::PreventDestroy { address, reason });
        }
        let mut new = work(want.clone(), true, resize_for_create, vm.start, None);
        new.after.push(format!("destroy {address}"));
        // The new VM keeps the old one's MAC (VMID, name and cloud-init
        // come from the fleet), so DHCP reservations and DNS stay valid.
        if let Some(net) = new.set.get_mut("net0") {
            let mut wanted = Net::parse(net);
            if wanted.mac.is_none() {
                wanted.mac = config
                    .and_then(|c| c.values.get("net0"))
                    .and_then(|v| Net::parse(v).mac);
                *net = wanted.to_string();
            }
        }
        return Ok(Some(Change {
            address,
            action: Action::Replace,
            fields: create_fields(&want),
            reason,
            impact: Impact::DataLoss,
            work: Work::ReplaceVm {
                old_node: existing.node.clone(),
                new,
            },
            unchanged: BTreeMap::new(),
        }));
    }

    // In-place updates. A VM that keeps its generation keeps it in its stamp.
    let want = match live_generation {
        Some(g) if spec.on_new_generation == OnNewGeneration::Keep || spec.prevent_destroy => {
            desired_config(fleet, vm, image.nixos.guest_agent, g)
        }
        _ => want,
    };
    let running = existing.running.unwrap_or(false);
    let values = config.map(|c| c.values.clone()).unwrap_or_default();
    let mut set = BTreeMap::new();
    let mut fields = Vec::new();
    let mut impact = Impact::None;
    for (k, v) in &want {
        let have = values.get(k).map(String::as_str);
        if differs(k, v, have) {
            let value = if k == "net0" {
                // Keep the MAC Proxmox generated; change only what we own.
                let mut net = Net::parse(v);
                net.mac = have.map(Net::parse).and_then(|n| n.mac);
                net.to_string()
            } else {
                v.clone()
            };
            set.insert(k.clone(), value);
            fields.push(FieldDiff {
                field: k.clone(),
                before: have.map(|h| show(k, h)),
                after: Some(show(k, v)),
                sensitive: false,
            });
            impact = impact.max(field_impact(k, running));
        }
    }
    let resize = match live_disk {
        Some(have) if have < want_disk => {
            fields.push(FieldDiff {
                field: "disk".into(),
                before: Some(pve_api::property::format_size(have)),
                after: Some(vm.disk.to_string()),
                sensitive: false,
            });
            impact = impact.max(Impact::Hotplug);
            Some(vm.disk.to_string())
        }
        _ => None,
    };
    let start = vm.start && !running;
    if start {
        fields.push(FieldDiff {
            field: "state".into(),
            before: Some("stopped".into()),
            after: Some("running".into()),
            sensitive: false,
        });
    }
    if fields.is_empty() {
        return Ok(None);
    }
    fields.sort_by(|a, b| a.field.cmp(&b.field));
    let reason = if !values.contains_key("ciuser") && want.contains_key("ciuser") && !running {
        "finishing a create that was interrupted".to_owned()
    } else {
        "its configuration differs from the fleet".to_owned()
    };
    if impact == Impact::NeedsReboot && spec.restart_on_change {
        impact = Impact::Restart;
    }
    let mut unchanged: BTreeMap<String, String> = want
        .iter()
        .filter(|(k, _)| !set.contains_key(*k))
        .map(|(k, v)| (k.clone(), show(k, values.get(k).unwrap_or(v))))
        .collect();
    unchanged.insert("vmid".into(), vm.vmid.to_string());
    unchanged.insert("node".into(), vm.node.to_string());
    if resize.is_none() {
        unchanged.insert("disk".into(), vm.disk.to_string());
    }
    if !start {
        let state = if running { "running" } else { "stopped" };
        unchanged.insert("state".into(), state.into());
    }
    let password = !values.contains_key("cipassword") && vm.password.is_some();
    if password {
        fields.push(FieldDiff {
            field: "cipassword".into(),
            before: None,
            after: None,
            sensitive: true,
        });
    }
    Ok(Some(Change {
        address,
        action: Action::Update,
        fields,
        reason,
        impact,
        work: Work::UpdateVm(VmWork {
            restart: impact == Impact::Restart,
            ..work(
                set,
                password,
                resize,
                start,
                config.map(|c| c.digest.clone()),
            )
        }),
        unchanged,
    }))
}

/// Stamped VMs as the fleet knows them, for `nixgold output`.
pub fn owned<'a>(
    live: &'a LiveState,
    fleet: &str,
) -> impl Iterator<Item = (&'a LiveVm, BTreeMap<String, String>)> + 'a {
    let tag = fleet_tag(fleet);
    let fleet = fleet.to_owned();
    live.vms
        .values()
        .filter(move |v| v.tags.contains(&tag))
        .filter_map(move |v| {
            let stamp = v.stamp()?;
            (stamp.get("fleet") == Some(&fleet)).then_some((v, stamp))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_through_a_description() {
        let s = stamp("homelab", "vm.web", "golden", 3);
        let desc = format!("my notes\n\n{s}");
        let parsed = read_stamp(&desc).unwrap();
        assert_eq!(parsed["fleet"], "homelab");
        assert_eq!(parsed["resource"], "vm.web");
        assert_eq!(parsed["generation"], "3");
        assert!(read_stamp("just notes").is_none());
    }

    #[test]
    fn canonical_comparison_ignores_spelling() {
        assert!(!differs(
            "net0",
            "virtio,bridge=vmbr0",
            Some("virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=0")
        ));
        assert!(differs(
            "net0",
            "virtio,bridge=vmbr1",
            Some("virtio=BC:24:11:00:00:01,bridge=vmbr0")
        ));
        assert!(!differs("memory", "2048", Some("current=2048")));
        assert!(!differs("tags", "nixgold;prod", Some("prod;nixgold")));
        assert!(!differs(
            "ipconfig0",
            "ip=10.0.0.5/24,gw=10.0.0.1",
            Some("gw=10.0.0.1,ip=10.0.0.5/24")
        ));
        assert!(!differs("agent", "1", Some("enabled=1")));
        assert!(!differs("description", "x", Some("x\n")));
    }
}
