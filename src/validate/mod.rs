//! Semantic checks the contract cannot express: references between
//! resources, VMID uniqueness across the whole fleet and its lockfile,
//! address arithmetic, and safety opt-ins.
//!
//! Unlike the contract (which stops at the first broken value), this
//! collects every problem in one run. It reads the filesystem only to check
//! that a referenced CA file exists.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;

use crate::fleet::{
    BuildAddress, CloneMode, Fleet, ImageNetwork, Iso, LoadedFleet, VmNetwork, image_nodes,
};
use crate::ids::{NodeName, Vmid, VmidRange};
use crate::lock::Lockfile;
use crate::problem::Problem;

mod nixos_rules;

/// All semantic problems of `loaded`, given the lockfile that goes with it.
pub fn validate(loaded: &LoadedFleet, lock: &Lockfile) -> Vec<Problem> {
    let mut out = Problems {
        file: loaded.path.as_path(),
        list: Vec::new(),
    };
    let fleet = &loaded.fleet;
    check_tls(
        fleet,
        loaded.path.parent().unwrap_or(Path::new(".")),
        &mut out,
    );
    check_references(fleet, &mut out);
    check_vmids(fleet, lock, &mut out);
    check_networks(fleet, &mut out);
    check_sizes(fleet, &mut out);
    check_extra_config(fleet, &mut out);
    check_build_access(fleet, &mut out);
    nixos_rules::check(fleet, &mut out);
    // Report in field order, so problems read top to bottom like the file.
    out.list.sort_by(|a, b| a.field.cmp(&b.field));
    out.list
}

/// The build verifies and seals the installed system over SSH as root,
/// with its per-build key (removed when sealing): the image must let it in.
fn check_build_access(fleet: &Fleet, out: &mut Problems) {
    for (name, image) in &fleet.images {
        let ssh = &image.nixos.openssh;
        let (field, reason) = if !ssh.enable {
            ("enable", "the image disables sshd")
        } else if ssh.permit_root_login == "no" {
            ("permit_root_login", "the image refuses root logins")
        } else {
            continue;
        };
        out.push(
            format!("images.{name}.nixos.openssh.{field}"),
            format!(
                "{reason}, but the build verifies and seals the installed system over SSH as root with a per-build key (removed before the template is made)"
            ),
            "keep sshd with permit_root_login = \"prohibit-password\" (keys only, the default); to lock root out of clones, do it through cloud-init or after deployment",
        );
    }
}

/// The user's raw Nix must parse: it is spliced into configuration.nix as
/// the body of an attribute set, so it is checked the same way.
fn check_extra_config(fleet: &Fleet, out: &mut Problems) {
    for (name, image) in &fleet.images {
        let extra = &image.nixos.extra_config;
        if extra.trim().is_empty() {
            continue;
        }
        if let Some(err) = crate::nixos::check_nix(&format!("{{\n{extra}\n}}")).first() {
            out.push(
                format!("images.{name}.nixos.extra_config"),
                format!(
                    "not valid Nix at line {} of the snippet: {}",
                    err.line.saturating_sub(1).max(1),
                    err.message
                ),
                "write attribute definitions ending in `;`, e.g. `services.nginx.enable = true;`",
            );
        }
    }
}

pub(super) struct Problems<'a> {
    file: &'a Path,
    list: Vec<Problem>,
}

impl Problems<'_> {
    pub(super) fn push(
        &mut self,
        field: impl Into<String>,
        reason: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.list.push(Problem {
            file: self.file.to_owned(),
            position: None,
            field: field.into(),
            reason: reason.into(),
            hints: vec![hint.into()],
        });
    }
}

fn check_tls(fleet: &Fleet, base: &Path, out: &mut Problems) {
    let tls = &fleet.proxmox.tls;
    if tls.insecure && !tls.allow_insecure {
        out.push(
            "proxmox.tls.insecure",
            "certificate verification is turned off without the explicit opt-in",
            "pin the certificate with `fingerprint` instead; if you really mean it, also set `allow_insecure = true`",
        );
    }
    if tls.insecure && (tls.fingerprint.is_some() || tls.ca_file.is_some()) {
        out.push(
            "proxmox.tls.insecure",
            "`insecure` contradicts `fingerprint`/`ca_file`",
            "remove `insecure`: a pinned fingerprint or a CA file already handles self-signed certificates",
        );
    }
    if let Some(ca) = &tls.ca_file {
        let resolved = base.join(ca);
        if !resolved.is_file() {
            out.push(
                "proxmox.tls.ca_file",
                format!("{} does not exist", resolved.display()),
                "give the path of a PEM file, relative to the fleet file's directory",
            );
        }
    }
    if fleet.proxmox.password.is_some() && fleet.proxmox.username.is_none() {
        out.push(
            "proxmox.password",
            "a password without a `username`",
            "add `username = \"root@pam\"` (or the user the password belongs to)",
        );
    }
}

fn check_node(fleet: &Fleet, field: String, node: &Option<NodeName>, out: &mut Problems) {
    if let Some(node) = node
        && !fleet.proxmox.nodes.contains(node)
    {
        out.push(
            field,
            format!("node `{node}` is not in `proxmox.nodes`"),
            format!("use one of: {}", join(&fleet.proxmox.nodes)),
        );
    }
}

fn check_references(fleet: &Fleet, out: &mut Problems) {
    for (name, image) in &fleet.images {
        if !fleet.isos.contains_key(&image.iso) {
            out.push(
                format!("images.{name}.iso"),
                format!("unknown ISO `{}`", image.iso),
                known("isos", fleet.isos.keys()),
            );
        }
        check_node(
            fleet,
            format!("images.{name}.build_node"),
            &image.build_node,
            out,
        );
    }
    for (name, vm) in &fleet.vms {
        if !fleet.images.contains_key(&vm.image) {
            out.push(
                format!("vms.{name}.image"),
                format!("unknown image `{}`", vm.image),
                known("images", fleet.images.keys()),
            );
        }
        check_node(fleet, format!("vms.{name}.node"), &vm.node, out);
        if vm.clone == CloneMode::Linked && vm.storage.is_some() {
            out.push(
                format!("vms.{name}.storage"),
                "a linked clone cannot choose its storage (Proxmox: \"parameter 'storage' not allowed for linked clones\")",
                "remove `storage`, or use `clone = \"full\"`",
            );
        }
        if vm.password.is_some() && vm.user.is_none() {
            out.push(
                format!("vms.{name}.password"),
                "a password without a cloud-init `user`",
                "add `user = \"…\"` next to it",
            );
        }
    }
}

/// Every VMID the fleet fixes or the lockfile allocated, and every range it
/// reserves, must be disjoint: Proxmox VMIDs are unique across the cluster.
fn check_vmids(fleet: &Fleet, lock: &Lockfile, out: &mut Problems) {
    check_ranges(fleet, out);
    check_claims(fleet, lock, out);
    check_range_sizes(fleet, out);
}

/// Each VMID range is ordered, and no two overlap.
fn check_ranges(fleet: &Fleet, out: &mut Problems) {
    let mut ranges: Vec<(String, VmidRange)> = fleet
        .images
        .iter()
        .map(|(name, image)| (format!("images.{name}.vmid_range"), image.vmid_range))
        .collect();
    if let Some(range) = fleet.vm_vmid_range {
        ranges.push(("vm_vmid_range".to_owned(), range));
    }
    for (field, range) in &ranges {
        if range.first > range.last {
            out.push(
                field.clone(),
                format!(
                    "`first` ({}) is greater than `last` ({})",
                    range.first, range.last
                ),
                "swap the two bounds",
            );
        }
    }
    for (i, (a_field, a)) in ranges.iter().enumerate() {
        for (b_field, b) in &ranges[i + 1..] {
            if a.overlaps(b) {
                out.push(
                    b_field.clone(),
                    format!("VMID range {b} overlaps {a_field} ({a})"),
                    "give every image and the VMs their own, disjoint range",
                );
            }
        }
    }
}

/// Fixed and allocated ids, by the field that claims them: each claimed
/// once, and no VM's inside an image's range.
fn check_claims(fleet: &Fleet, lock: &Lockfile, out: &mut Problems) {
    let mut claims: BTreeMap<Vmid, Vec<String>> = BTreeMap::new();
    let mut vm_ids = Vec::new();
    for (name, vm) in &fleet.vms {
        let claim = match (vm.vmid, lock.vmids.get(&format!("vm.{name}"))) {
            (Some(id), _) => Some((id, format!("vms.{name}.vmid"))),
            (None, Some(id)) => Some((*id, format!("vms.{name} (allocated in the lockfile)"))),
            (None, None) => None,
        };
        match claim {
            Some((id, field)) => {
                claims.entry(id).or_default().push(field.clone());
                vm_ids.push((id, field));
            }
            None if fleet.vm_vmid_range.is_none() => out.push(
                format!("vms.{name}.vmid"),
                "no `vmid`, and no `vm_vmid_range` to allocate one from",
                "fix `vmid = …` on the VM, or add `vm_vmid_range = { first = …, last = … }` to the fleet",
            ),
            None => {}
        }
    }
    for (image_name, image) in &lock.images {
        for generation in &image.generations {
            for template in &generation.templates {
                claims.entry(template.vmid).or_default().push(format!(
                    "images.{image_name} generation {} on {} (in the lockfile)",
                    generation.number, template.node
                ));
            }
        }
    }
    for (id, claimants) in &claims {
        if claimants.len() > 1 {
            out.push(
                claimants[1].clone(),
                format!("VMID {id} is also used by {}", claimants[0]),
                "every VMID must be unique in the cluster; pick another one",
            );
        }
    }
    for (id, field) in &vm_ids {
        for (name, image) in &fleet.images {
            if image.vmid_range.contains(*id) {
                out.push(
                    field.clone(),
                    format!(
                        "VMID {id} lies inside images.{name}.vmid_range ({})",
                        image.vmid_range
                    ),
                    "that range is reserved for the image's generations; pick a VMID outside it",
                );
            }
        }
    }
}

/// Each image's range holds its kept generations and one being built, on
/// every node that needs a replica.
fn check_range_sizes(fleet: &Fleet, out: &mut Problems) {
    for (name, image) in &fleet.images {
        let replicas = image_nodes(fleet, name).len() as u64;
        let needed = replicas * u64::from(image.rebuild.keep + 1);
        let size = u64::from(image.vmid_range.last.get())
            .saturating_sub(u64::from(image.vmid_range.first.get()))
            + 1;
        if image.vmid_range.first <= image.vmid_range.last && size < needed {
            out.push(
                format!("images.{name}.vmid_range"),
                format!(
                    "{size} VMID(s) cannot hold {} kept generation(s) plus one being built on {replicas} node(s)",
                    image.rebuild.keep
                ),
                format!("widen the range to at least {needed} ids, or lower `rebuild.keep`"),
            );
        }
    }
}

fn check_networks(fleet: &Fleet, out: &mut Problems) {
    let mut addresses: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for (name, vm) in &fleet.vms {
        let VmNetwork::Static { ip, gateway, .. } = &vm.network else {
            continue;
        };
        check_address(&format!("vms.{name}.network"), ip, gateway.as_ref(), out);
        if let Some(other) = addresses.insert(ip.addr(), name.clone()) {
            out.push(
                format!("vms.{name}.network.ip"),
                format!("address {} is also given to vms.{other}", ip.addr()),
                "give every VM its own address",
            );
        }
    }
    for (name, image) in &fleet.images {
        if let ImageNetwork::Static {
            address, gateway, ..
        } = &image.nixos.network
        {
            check_address(
                &format!("images.{name}.nixos.network"),
                address,
                Some(gateway),
                out,
            );
        }
        if let BuildAddress::Static { r#static } = &image.build.address {
            let field = format!("images.{name}.build.address.static");
            check_address(&field, &r#static.address, r#static.gateway.as_ref(), out);
            if !image.nixos.guest_agent {
                out.push(
                    field,
                    "after the reboot the installed system gets the build address through the QEMU guest agent, which this image disables".to_owned(),
                    format!("set images.{name}.nixos.guest_agent = true, or use build.address.call_home"),
                );
            }
        }
    }
}

fn check_address(field: &str, net: &Ipv4Net, gateway: Option<&Ipv4Addr>, out: &mut Problems) {
    let subnet = net.trunc();
    if net.prefix_len() < 31 && (net.addr() == subnet.network() || net.addr() == subnet.broadcast())
    {
        out.push(
            format!("{field}.ip"),
            format!(
                "{} is the network or broadcast address of {subnet}",
                net.addr()
            ),
            "use a host address inside the subnet",
        );
    }
    if let Some(gw) = gateway {
        if !subnet.contains(gw) {
            out.push(
                format!("{field}.gateway"),
                format!("gateway {gw} is outside the subnet {subnet}"),
                format!("use a gateway inside {subnet}, or fix the prefix length of the address"),
            );
        } else if gw == &net.addr() {
            out.push(
                format!("{field}.gateway"),
                format!("gateway {gw} is the address itself"),
                "the gateway is the router's address, not the VM's",
            );
        }
    }
}

fn check_sizes(fleet: &Fleet, out: &mut Problems) {
    for (name, vm) in &fleet.vms {
        let Some(image) = fleet.images.get(&vm.image) else {
            continue;
        };
        if let Some(disk) = vm.disk
            && disk < image.hardware.disk
        {
            out.push(
                format!("vms.{name}.disk"),
                format!(
                    "{disk} is smaller than the template's disk ({}); Proxmox disks only grow",
                    image.hardware.disk
                ),
                format!(
                    "use at least {}, or shrink the image's `hardware.disk`",
                    image.hardware.disk
                ),
            );
        }
    }
    for (name, iso) in &fleet.isos {
        let used = fleet.images.values().any(|i| &i.iso == name);
        if !used {
            out.push(
                format!("isos.{name}"),
                "no image uses this ISO",
                "remove it, or point an image's `iso` at it",
            );
        }
        if let Iso::Channel { channel, .. } = iso
            && channel.ends_with("-small")
        {
            out.push(
                format!("isos.{name}.channel"),
                "small channels publish no installer ISO",
                format!("use `{}`", channel.trim_end_matches("-small")),
            );
        }
    }
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn known<'a>(what: &str, names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&String> = names.collect();
    if names.is_empty() {
        format!("`{what}` is empty: declare it there first")
    } else {
        format!(
            "declared {what}: {}",
            names
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}
