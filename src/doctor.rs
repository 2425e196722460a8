//! `nixgold doctor`: a read-only preflight of a fleet against its cluster.
//! It owns the list of privileges nixgold needs to manage a fleet, path by
//! path, and compares it with what the API token holds (`GET
//! /access/permissions`, no trial writes). `apply` runs the same privilege
//! check before it changes anything.
//!
//! Why each privilege (the README's least-privilege role follows this):
//! - on each VM (`/vms/VMID`): `VM.Audit` to read it, `VM.Allocate` to
//!   create and destroy it, `VM.Config.CPU`/`Memory`/`Network`/`Options`/
//!   `Cloudinit` for the keys nixgold writes, `VM.Config.Disk` to grow its
//!   disk, `VM.PowerMgmt` to start and restart it;
//! - on each template (`/vms/VMID`) additionally `VM.Clone` (VMs are cloned
//!   from it), `VM.Config.CDROM` (the installer ISO), `VM.Config.HWType`
//!   (machine, SCSI controller), `VM.Console` (typing the access sequence
//!   with `sendkey`), `VM.GuestAgent.Audit` (the installed system's address)
//!   and, for static build addresses, `VM.GuestAgent.Unrestricted` (setting
//!   the address through the agent);
//! - on each storage that holds disks: `Datastore.AllocateSpace` and
//!   `Datastore.Audit` (disk listings); on an ISO storage
//!   `Datastore.AllocateTemplate` (downloading the ISO) and `Datastore.Audit`;
//! - on each node that downloads an ISO: `Sys.AccessNetwork` (Proxmox
//!   asks for it because a download probes the node's network);
//! - on the fleet's apply lock (`/pool/nixgold-lock-<fleet>`):
//!   `Pool.Allocate` to take and release it, `Pool.Audit` to read it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use pve_api::{ApiError, Client};

use crate::desired::{DesiredGraph, DesiredNode};
use crate::fleet::{BuildAddress, Fleet};
use crate::live::LiveState;

const VM: &[&str] = &[
    "VM.Allocate",
    "VM.Audit",
    "VM.Config.CPU",
    "VM.Config.Cloudinit",
    "VM.Config.Disk",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.PowerMgmt",
];
const TEMPLATE: &[&str] = &[
    "VM.Clone",
    "VM.Config.CDROM",
    "VM.Config.HWType",
    "VM.Console",
    "VM.GuestAgent.Audit",
];
const DISK_STORAGE: &[&str] = &["Datastore.AllocateSpace", "Datastore.Audit"];
const ISO_STORAGE: &[&str] = &["Datastore.AllocateTemplate", "Datastore.Audit"];

/// Privileges by ACL path.
pub type Needs = BTreeMap<String, BTreeSet<&'static str>>;

/// What nixgold needs to manage every resource of the fleet.
pub fn privileges(fleet: &Fleet, desired: &DesiredGraph) -> Needs {
    let mut needs = Needs::new();
    let mut add = |path: String, privs: &[&'static str]| {
        needs.entry(path).or_default().extend(privs.iter().copied());
    };
    let lock = crate::apply_lock::pool_id(&fleet.fleet);
    add(format!("/pool/{lock}"), &["Pool.Allocate", "Pool.Audit"]);
    for node in desired.graph.node_weights() {
        match node {
            DesiredNode::Iso(iso) => {
                add(format!("/storage/{}", iso.storage), ISO_STORAGE);
                add(format!("/nodes/{}", iso.node), &["Sys.AccessNetwork"]);
            }
            DesiredNode::Template(t) => {
                let path = format!("/vms/{}", t.vmid);
                add(path.clone(), VM);
                add(path.clone(), TEMPLATE);
                let image = &fleet.images[&t.image];
                if matches!(image.build.address, BuildAddress::Static { .. }) {
                    add(path, &["VM.GuestAgent.Unrestricted"]);
                }
                add(format!("/storage/{}", t.storage), DISK_STORAGE);
            }
            DesiredNode::Vm(vm) => {
                add(format!("/vms/{}", vm.vmid), VM);
                add(format!("/storage/{}", vm.storage), DISK_STORAGE);
            }
        }
    }
    needs
}

/// Privileges the token lacks, by path, as `/access/permissions` says.
pub async fn missing(client: &Client, needs: &Needs) -> Result<Needs, ApiError> {
    let mut out = Needs::new();
    for (path, privs) in needs {
        let have = client.permissions(path).await?;
        let lacking: BTreeSet<&'static str> = privs
            .iter()
            .copied()
            .filter(|p| !have.contains(*p))
            .collect();
        if !lacking.is_empty() {
            out.insert(path.clone(), lacking);
        }
    }
    Ok(out)
}

/// The report of missing privileges, with the `pveum` commands that grant
/// them: one role with every privilege nixgold needs, and an ACL entry per
/// path (for a privilege-separated token, its user needs them too).
pub fn missing_text(authid: &str, needs: &Needs, missing: &Needs) -> String {
    let mut out = String::from("the API token lacks privileges this fleet needs:\n");
    for (path, privs) in missing {
        let list: Vec<&str> = privs.iter().copied().collect();
        let _ = writeln!(out, "  {path}: {}", list.join(", "));
    }
    let all: BTreeSet<&str> = needs.values().flatten().copied().collect();
    let all: Vec<&str> = all.into_iter().collect();
    let _ = writeln!(
        out,
        "  hint: grant them (as root on a node):\n    pveum role add NixgoldDeploy --privs \"{}\"",
        all.join(",")
    );
    let (user, token) = match authid.split_once('!') {
        Some((user, _)) => (user, Some(authid)),
        None => (authid, None),
    };
    for path in missing.keys() {
        let _ = writeln!(
            out,
            "    pveum acl modify {path} --users {user} --roles NixgoldDeploy"
        );
        if let Some(token) = token {
            let _ = writeln!(
                out,
                "    pveum acl modify {path} --tokens '{token}' --roles NixgoldDeploy"
            );
        }
    }
    out.trim_end().to_owned()
}

/// One line of the doctor's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub ok: bool,
    pub what: String,
}

/// Checks what the fleet names exists where it should: its nodes (online),
/// and its storages on their nodes with the content types it needs.
pub fn placement_checks(fleet: &Fleet, desired: &DesiredGraph, live: &LiveState) -> Vec<Check> {
    let mut checks = Vec::new();
    for node in &fleet.proxmox.nodes {
        let known = live.storages.keys().any(|(n, _)| n == node.as_str());
        checks.push(Check {
            ok: known,
            what: format!("node `{node}` is in the cluster"),
        });
    }
    let mut wanted: BTreeSet<(String, String, &str)> = BTreeSet::new();
    for n in desired.graph.node_weights() {
        match n {
            DesiredNode::Iso(i) => wanted.insert((i.node.to_string(), i.storage.clone(), "iso")),
            DesiredNode::Template(t) => {
                wanted.insert((t.node.to_string(), t.storage.clone(), "images"))
            }
            DesiredNode::Vm(v) => wanted.insert((v.node.to_string(), v.storage.clone(), "images")),
        };
    }
    for (node, storage, content) in wanted {
        let found = live.storages.get(&(node.clone(), storage.clone()));
        checks.push(Check {
            ok: found.is_some_and(|s| s.content.contains(content)),
            what: format!("storage `{storage}` on {node} holds {content}"),
        });
        // An ISO's size is known only once downloaded: room for a NixOS
        // installer (about 1–2 GiB) is what can be checked before.
        if let (Some(s), "iso") = (found, content) {
            let free = s.free();
            checks.push(Check {
                ok: free >= ISO_ROOM,
                what: format!(
                    "storage `{storage}` on {node} has {} GiB free for installer ISOs (needs {} GiB)",
                    free >> 30,
                    ISO_ROOM >> 30
                ),
            });
        }
    }
    checks
}

/// Free space an ISO storage should have for a NixOS installer.
const ISO_ROOM: u64 = 2 << 30;

/// Checks every bridge the fleet's VMs and build VMs attach to exists on
/// their node (one network listing per node).
pub async fn bridge_checks(
    client: &Client,
    fleet: &Fleet,
    desired: &DesiredGraph,
) -> Result<Vec<Check>, ApiError> {
    let mut wanted: BTreeSet<(String, String)> = BTreeSet::new();
    for n in desired.graph.node_weights() {
        match n {
            DesiredNode::Template(t) => {
                let bridge = fleet.images[&t.image].hardware.bridge.clone();
                wanted.insert((t.node.to_string(), bridge));
            }
            DesiredNode::Vm(v) => {
                wanted.insert((v.node.to_string(), v.bridge.clone()));
            }
            DesiredNode::Iso(_) => {}
        }
    }
    let mut checks = Vec::new();
    let mut listed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (node, bridge) in wanted {
        if !listed.contains_key(&node) {
            listed.insert(node.clone(), client.bridges(&node).await?);
        }
        checks.push(Check {
            ok: listed[&node].contains(&bridge),
            what: format!("bridge `{bridge}` exists on {node}"),
        });
    }
    Ok(checks)
}
