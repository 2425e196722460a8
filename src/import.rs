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

use crate::desired::{IsoPinState, input_hash, iso_pin};
use crate::fleet::{Fleet, image_nodes};
use crate::ids::{NodeName, Sha256, Vmid};
use crate::live::LiveVm;
use crate::lock::{Generation, ImageLock, Lockfile, TemplateReplica};

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
            vmid: vm.vmid.get(),
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
            vmid: vm.vmid.get(),
            resource: stamp.resource,
            fleet: stamp.fleet,
        });
    }
    Err(ImportError::AlreadyManaged {
        address: address.to_owned(),
        vmid: vm.vmid.get(),
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
            vmid: vm.vmid.get(),
        });
    }
    let declared = spec
        .node
        .clone()
        .unwrap_or_else(|| fleet.proxmox.default_node().clone());
    if declared != vm.node {
        return Err(ImportError::WrongNode {
            address,
            vmid: vm.vmid.get(),
            node: vm.node.to_string(),
            declared: declared.to_string(),
        });
    }
    let vmid = vm.vmid;
    if let Some(fixed) = spec.vmid.filter(|f| *f != vmid) {
        return Err(ImportError::VmidMismatch {
            address,
            vmid: vm.vmid.get(),
            fleet_vmid: fixed.get(),
        });
    }
    if let Some(other) = vmid_owner(fleet, lock, vmid).filter(|o| *o != address) {
        return Err(ImportError::VmidTaken {
            address,
            vmid: vm.vmid.get(),
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
            vmid: vm.vmid.get(),
        });
    }
    let nodes = image_nodes(fleet, name);
    let node: NodeName = match nodes.iter().find(|n| **n == vm.node) {
        Some(n) => n.clone(),
        None => {
            return Err(ImportError::WrongNode {
                address,
                vmid: vm.vmid.get(),
                node: vm.node.to_string(),
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
            vmid: vm.vmid.get(),
            reason,
        });
    }
    let vmid = vm.vmid;
    if let Some(other) = vmid_owner(fleet, lock, vmid) {
        return Err(ImportError::VmidTaken {
            address,
            vmid: vm.vmid.get(),
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
    let hash: Sha256 = input_hash(name, image, iso_sha.as_ref());
    let entry = lock.images.entry(name.to_owned()).or_insert(ImageLock {
        current: 0,
        hold: None,
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
