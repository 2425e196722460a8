//! `nixgold import`: taking an existing VM or template under management
//! without recreating it.
//!
//! Import writes nothing to Proxmox. It checks the VM against the fleet
//! (owner, node, kind, disk layout) and records the adoption in the
//! lockfile: a VM as `[adopt]` (and its VMID), a template as a generation
//! of its image marked `imported`, whose inputs are unknown — its
//! `input_hash` is the fleet's inputs at import time, so the next change to
//! them builds a normal generation. The plan then shows what adopting
//! changes (stamp, tags, description, settings that differ) and apply
//! writes only that, guarded by the digest the plan read.

use std::collections::BTreeMap;

use pve_api::property::normalise_tags;

use crate::desired::{
    DesiredGraph, DesiredNode, DesiredTemplate, GenerationRef, IsoPinState, input_hash, iso_pin,
};
use crate::fleet::{Fleet, validate::image_nodes};
use crate::ids::{NodeName, Sha256, Vmid};
use crate::live::{LiveState, LiveVm, fleet_tag};
use crate::lock::{Generation, ImageLock, Lockfile, TemplateReplica};
use crate::plan::{Action, Change, FieldDiff, Impact, PlanError, Work};
use crate::stamp::Stamp;

/// What `import` takes over: `vm.NAME` or `image.NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Vm(String),
    Image(String),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Vm(n) => write!(f, "vm.{n}"),
            Address::Image(n) => write!(f, "image.{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error(
        "import {address}: the fleet has no such resource\n  hint: name a VM as vm.NAME or an image as image.NAME of the fleet file{}",
        if near.is_empty() { String::new() } else { format!(" (did you mean {}?)", near.join(", ")) }
    )]
    Unknown { address: String, near: Vec<String> },
    #[error("import {address}: there is no VM {vmid} in the cluster")]
    NoVm { address: String, vmid: u32 },
    #[error(
        "import {address}: VMID {vmid} is stamped as {resource} of fleet `{fleet}`\n  hint: nixgold never takes a VM from another fleet; remove it from that fleet first"
    )]
    OtherFleet {
        address: String,
        vmid: u32,
        resource: String,
        fleet: String,
    },
    #[error(
        "import {address}: VMID {vmid} is already managed as {resource} of this fleet\n  hint: nothing to import; `nixgold plan` shows its state"
    )]
    AlreadyManaged {
        address: String,
        vmid: u32,
        resource: String,
    },
    #[error(
        "import {address}: VMID {vmid} is on node {node}, the fleet declares it on {declared}\n  hint: set the node in the fleet to {node}, or migrate the VM first; import never moves a VM"
    )]
    WrongNode {
        address: String,
        vmid: u32,
        node: String,
        declared: String,
    },
    #[error(
        "import {address}: VMID {vmid} is a template, not a VM\n  hint: import a template as image.NAME"
    )]
    TemplateAsVm { address: String, vmid: u32 },
    #[error(
        "import {address}: VMID {vmid} is a VM, not a template\n  hint: import a VM as vm.NAME; an image's generation must be a template"
    )]
    VmAsImage { address: String, vmid: u32 },
    #[error(
        "import {address}: nixgold cannot clone from template {vmid}: {reason}\n  hint: nixgold's clones boot from `scsi0` and take their network and users from a cloud-init drive; let nixgold build the image instead (remove the import, plan builds a generation)"
    )]
    Layout {
        address: String,
        vmid: u32,
        reason: String,
    },
    #[error(
        "import {address}: the fleet fixes its VMID to {fleet_vmid}, not {vmid}\n  hint: set `vmid: {vmid}` in the fleet, or import VMID {fleet_vmid}"
    )]
    VmidMismatch {
        address: String,
        vmid: u32,
        fleet_vmid: u32,
    },
    #[error("import {address}: VMID {vmid} already belongs to {other} in the lockfile or fleet")]
    VmidTaken {
        address: String,
        vmid: u32,
        other: String,
    },
    #[error(
        "import {address}: VM {vmid} is locked ({lock})\n  hint: wait for the operation holding it, then import again"
    )]
    Locked {
        address: String,
        vmid: u32,
        lock: String,
    },
}

impl std::str::FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('.') {
            Some(("vm", n)) if !n.is_empty() => Ok(Address::Vm(n.to_owned())),
            Some(("image", n)) if !n.is_empty() => Ok(Address::Image(n.to_owned())),
            _ => Err(format!("`{s}` is not vm.NAME or image.NAME")),
        }
    }
}

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
            .get(&vmid.get())
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
    let Some(vm) = live.vms.get(&t.vmid.get()) else {
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
                vmid: vm.vmid,
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
        address: format!("image.{}[{}]", t.image, t.node),
        action: Action::Update,
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

/// Checks `vm` (read with its config) against the fleet and records its
/// adoption in `lock`. Returns notes for the user.
pub fn record(
    fleet: &Fleet,
    lock: &mut Lockfile,
    address: &Address,
    vm: &LiveVm,
    now: &str,
) -> Result<Vec<String>, ImportError> {
    let shown = address.to_string();
    check_owner(&fleet.fleet, &shown, vm)?;
    if let Some(held) = &vm.lock {
        return Err(ImportError::Locked {
            address: shown,
            vmid: vm.vmid,
            lock: held.clone(),
        });
    }
    match address {
        Address::Vm(name) => record_vm(fleet, lock, name, vm),
        Address::Image(name) => record_image(fleet, lock, name, vm, now),
    }
}

fn unknown(fleet: &Fleet, address: &str) -> ImportError {
    let known = fleet
        .vms
        .keys()
        .map(|n| format!("vm.{n}"))
        .chain(fleet.images.keys().map(|n| format!("image.{n}")));
    let near = known
        .filter(|k| strsim::levenshtein(address, k) <= 2.max(k.len() / 3))
        .take(3)
        .collect();
    ImportError::Unknown {
        address: address.to_owned(),
        near,
    }
}

fn check_owner(fleet: &str, address: &str, vm: &LiveVm) -> Result<(), ImportError> {
    let Some(stamp) = vm.stamp() else {
        return Ok(());
    };
    if stamp.fleet != fleet {
        return Err(ImportError::OtherFleet {
            address: address.to_owned(),
            vmid: vm.vmid,
            resource: stamp.resource,
            fleet: stamp.fleet,
        });
    }
    Err(ImportError::AlreadyManaged {
        address: address.to_owned(),
        vmid: vm.vmid,
        resource: stamp.resource,
    })
}

fn record_vm(
    fleet: &Fleet,
    lock: &mut Lockfile,
    name: &str,
    vm: &LiveVm,
) -> Result<Vec<String>, ImportError> {
    let address = format!("vm.{name}");
    let spec = fleet
        .vms
        .get(name)
        .ok_or_else(|| unknown(fleet, &address))?;
    if vm.template {
        return Err(ImportError::TemplateAsVm {
            address,
            vmid: vm.vmid,
        });
    }
    let declared = spec
        .node
        .clone()
        .unwrap_or_else(|| fleet.proxmox.default_node().clone());
    if declared.as_str() != vm.node {
        return Err(ImportError::WrongNode {
            address,
            vmid: vm.vmid,
            node: vm.node.clone(),
            declared: declared.to_string(),
        });
    }
    let vmid = Vmid::new(u64::from(vm.vmid)).expect("a cluster's VMID is valid");
    if let Some(fixed) = spec.vmid.filter(|f| *f != vmid) {
        return Err(ImportError::VmidMismatch {
            address,
            vmid: vm.vmid,
            fleet_vmid: fixed.get(),
        });
    }
    if let Some(other) = vmid_owner(fleet, lock, vmid).filter(|o| *o != address) {
        return Err(ImportError::VmidTaken {
            address,
            vmid: vm.vmid,
            other,
        });
    }
    if spec.vmid.is_none() {
        lock.vmids.insert(address.clone(), vmid);
    }
    lock.adopt.insert(address, vmid);
    let mut notes = Vec::new();
    if !lock.images.contains_key(&spec.image) {
        notes.push(format!(
            "image.{0} has no generation yet: import its template first (`nixgold import FLEET image.{0} VMID`), or the plan builds one",
            spec.image
        ));
    }
    Ok(notes)
}

/// Which resource already has `vmid`: a fleet VM, an allocation or a template.
fn vmid_owner(fleet: &Fleet, lock: &Lockfile, vmid: Vmid) -> Option<String> {
    let fixed = fleet
        .vms
        .iter()
        .find(|(_, v)| v.vmid == Some(vmid))
        .map(|(n, _)| format!("vm.{n}"));
    let allocated = || {
        lock.vmids
            .iter()
            .find(|(_, v)| **v == vmid)
            .map(|(a, _)| a.clone())
    };
    let template = || {
        lock.images.iter().find_map(|(name, image)| {
            image
                .generations
                .iter()
                .find(|g| g.templates.iter().any(|t| t.vmid == vmid))
                .map(|g| format!("image.{name} generation {}", g.number))
        })
    };
    fixed.or_else(allocated).or_else(template)
}

/// The replica `vm` would be: a template on one of the image's nodes,
/// clonable, at a VMID no other resource has.
fn check_template(
    fleet: &Fleet,
    lock: &Lockfile,
    name: &str,
    vm: &LiveVm,
) -> Result<TemplateReplica, ImportError> {
    let address = format!("image.{name}");
    if !fleet.images.contains_key(name) {
        return Err(unknown(fleet, &address));
    }
    if !vm.template {
        return Err(ImportError::VmAsImage {
            address,
            vmid: vm.vmid,
        });
    }
    let nodes = image_nodes(fleet, name);
    let node: NodeName = match nodes.iter().find(|n| n.as_str() == vm.node) {
        Some(n) => n.clone(),
        None => {
            return Err(ImportError::WrongNode {
                address,
                vmid: vm.vmid,
                node: vm.node.clone(),
                declared: nodes
                    .iter()
                    .map(NodeName::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    };
    let values = vm.config.as_ref().map(|c| &c.values);
    if let Err(reason) = clone_layout(values.unwrap_or(&BTreeMap::new())) {
        return Err(ImportError::Layout {
            address,
            vmid: vm.vmid,
            reason,
        });
    }
    let vmid = Vmid::new(u64::from(vm.vmid)).expect("a cluster's VMID is valid");
    if let Some(other) = vmid_owner(fleet, lock, vmid) {
        return Err(ImportError::VmidTaken {
            address,
            vmid: vm.vmid,
            other,
        });
    }
    Ok(TemplateReplica { node, vmid })
}

fn record_image(
    fleet: &Fleet,
    lock: &mut Lockfile,
    name: &str,
    vm: &LiveVm,
    now: &str,
) -> Result<Vec<String>, ImportError> {
    let replica = check_template(fleet, lock, name, vm)?;
    let image = &fleet.images[name];
    let iso = fleet
        .isos
        .get(&image.iso)
        .map(|iso| iso_pin(&image.iso, iso, lock));
    let iso_sha: Option<Sha256> = match iso {
        Some(IsoPinState::Pinned { sha256, .. }) => Some(sha256),
        _ => None,
    };
    let hash: Sha256 = input_hash(name, image, iso_sha.as_ref())
        .parse()
        .expect("input_hash is 64 hex digits");
    let entry = lock.images.entry(name.to_owned()).or_insert(ImageLock {
        current: 0,
        generations: Vec::new(),
    });
    // A second replica of an imported current generation joins it.
    if let Some(g) = entry
        .generations
        .iter_mut()
        .find(|g| g.number == entry.current && g.imported)
        .filter(|g| g.templates.iter().all(|t| t.node != replica.node))
    {
        g.templates.push(replica);
        g.templates.sort_by(|a, b| a.node.cmp(&b.node));
        return Ok(Vec::new());
    }
    let number = entry
        .generations
        .iter()
        .map(|g| g.number)
        .max()
        .unwrap_or(0)
        + 1;
    entry.generations.push(Generation {
        number,
        input_hash: hash,
        iso_sha256: iso_sha,
        built_at: now.to_owned(),
        nixos_version: "unknown".to_owned(),
        system_path: "unknown".to_owned(),
        templates: vec![replica],
        imported: true,
    });
    entry.current = number;
    Ok(vec![format!(
        "image.{name} generation {number} is the imported template; the next change to the image's inputs builds generation {}",
        number + 1
    )])
}

/// Whether nixgold can clone VMs from a template with this config: the
/// root disk on `scsi0` (nixgold grows and reads `scsi0`, as its own
/// builds lay it out in `build::build_vm_config`) and a cloud-init drive
/// (the clones' address, user and keys go through it).
pub fn clone_layout(values: &BTreeMap<String, String>) -> Result<(), String> {
    let disk_keys = ["virtio", "sata", "ide", "scsi", "efidisk", "tpmstate"];
    let is_disk = |k: &str| {
        disk_keys
            .iter()
            .any(|p| k.strip_prefix(p).is_some_and(|n| n.parse::<u8>().is_ok()))
    };
    let media = |v: &str| v.contains("media=cdrom") || v.starts_with("none");
    let cloudinit = values
        .iter()
        .any(|(k, v)| is_disk(k) && v.contains("cloudinit"));
    let root = values
        .get("scsi0")
        .filter(|v| !media(v) && !v.contains("cloudinit"));
    if root.is_none() {
        let other: Vec<&str> = values
            .iter()
            .filter(|(k, v)| is_disk(k) && !media(v) && !v.contains("cloudinit"))
            .map(|(k, _)| k.as_str())
            .collect();
        return Err(if other.is_empty() {
            "it has no disk".to_owned()
        } else {
            format!("its root disk is {}, not scsi0", other.join(", "))
        });
    }
    if !cloudinit {
        return Err("it has no cloud-init drive".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_clonable_template_boots_from_scsi0_and_has_a_cloud_init_drive() {
        let ok = config(&[
            ("scsi0", "tank:base-9000-disk-0,size=30G"),
            ("ide2", "tank:vm-9000-cloudinit,media=cdrom"),
        ]);
        assert_eq!(clone_layout(&ok), Ok(()));
        let virtio = config(&[
            ("virtio0", "tank:base-9000-disk-0,size=30G"),
            ("ide2", "tank:vm-9000-cloudinit,media=cdrom"),
            ("ide0", "local:iso/nixos.iso,media=cdrom"),
        ]);
        assert_eq!(
            clone_layout(&virtio),
            Err("its root disk is virtio0, not scsi0".to_owned())
        );
        let no_ci = config(&[("scsi0", "tank:base-9000-disk-0,size=30G")]);
        assert_eq!(
            clone_layout(&no_ci),
            Err("it has no cloud-init drive".to_owned())
        );
        assert_eq!(clone_layout(&config(&[])), Err("it has no disk".to_owned()));
    }

    #[test]
    fn addresses_are_vm_or_image() {
        assert_eq!("vm.web".parse(), Ok(Address::Vm("web".into())));
        assert_eq!("image.golden".parse(), Ok(Address::Image("golden".into())));
        assert!("iso.nixos".parse::<Address>().is_err());
        assert!("vm.".parse::<Address>().is_err());
    }
}
