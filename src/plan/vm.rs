//! VM planning: the config nixgold owns on a VM, and the change (create,
//! update in place, replace) that brings a VM to it.

use std::collections::{BTreeMap, BTreeSet};

use pve_api::property::{Drive, IpConfig, Net, decode_sshkeys, encode_sshkeys, normalise_tags};

use super::address::targeted;
use super::canonical::differs;
use super::{Action, Change, FieldDiff, Impact, PlanError, Planner, VmWork, Work};
use crate::desired::DesiredVm;
use crate::fleet::{CloneMode, Fleet, OnNewGeneration, VmNetwork};
use crate::live::{LiveState, LiveVm, fleet_tag};
use crate::stamp::Stamp;

impl Planner<'_> {
    /// Step 3: each planned VM whose template is there or being built.
    pub(super) fn vms(&mut self) {
        let tag = fleet_tag(&self.fleet.fleet);
        for vm in self.vms.clone() {
            if !self.template_ok.contains(&vm.template_vmid.get()) {
                continue;
            }
            let image = &self.fleet.images[&vm.image];
            let force = self.options.replace.contains(&format!("vm.{}", vm.name));
            if !force && let Some(note) = placement_note(vm, self.live) {
                self.notes.push(note);
            }
            self.notes
                .extend(held_by_prevent_destroy(self.fleet, vm, self.live));
            match plan_vm(self.fleet, vm, image, self.live, &tag, force) {
                Ok(Some(mut change)) => {
                    if let Some(build) = self.building.get(&vm.template_vmid.get()) {
                        match &mut change.work {
                            Work::CreateVm(w)
                            | Work::UpdateVm(w)
                            | Work::ReplaceVm { new: w, .. } => w.after.push(build.clone()),
                            _ => {}
                        }
                    }
                    self.changes.push(change)
                }
                Ok(None) => {}
                Err(e) => self.errors.push(e),
            }
        }
    }

    /// Step 4: stamped VMs the fleet no longer has (or that moved to
    /// another VMID): destroyed with `--allow-destroy`, kept otherwise.
    pub(super) fn orphans(&mut self) {
        let tag = fleet_tag(&self.fleet.fleet);
        let desired_ids: BTreeSet<u32> = self.vms.iter().map(|v| v.vmid.get()).collect();
        let fleet_addresses: BTreeMap<String, u32> = self
            .vms
            .iter()
            .map(|v| (format!("vm.{}", v.name), v.vmid.get()))
            .collect();
        let live = self.live;
        for vm in live
            .vms
            .values()
            .filter(|v| v.tags.contains(&tag) && !v.template)
        {
            let Some(stamp) = vm.stamp() else { continue };
            if stamp.fleet != self.fleet.fleet {
                continue;
            }
            let address = stamp.resource;
            let still_wanted =
                fleet_addresses.get(&address) == Some(&vm.vmid) || desired_ids.contains(&vm.vmid);
            let in_fleet = self
                .fleet
                .vms
                .contains_key(address.trim_start_matches("vm."));
            let other_target = in_fleet
                && !self.options.targets.is_empty()
                && !fleet_addresses.contains_key(&address);
            if still_wanted || !targeted(self.options, &address) || other_target {
                continue;
            }
            if !self.options.allow_destroy {
                self.kept.push((address, vm.vmid));
                continue;
            }
            self.changes.push(destroy_change(address, vm, in_fleet));
        }
    }
}

/// The destroy of a stamped VM the fleet no longer has at this VMID.
fn destroy_change(address: String, vm: &LiveVm, in_fleet: bool) -> Change {
    Change {
        address,
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
    }
}

/// An existing VM cloned otherwise than the fleet now says — linked
/// instead of full or the reverse, or a full clone on another storage:
/// nixgold does not move disks, `--replace` re-creates the VM.
/// The note for a VM that would follow its image's new generation but is
/// marked `prevent_destroy`: it is never replaced, and stays where it is.
fn held_by_prevent_destroy(fleet: &Fleet, vm: &DesiredVm, live: &LiveState) -> Option<String> {
    let spec = &fleet.vms[&vm.name];
    if spec.on_new_generation != OnNewGeneration::Replace || !spec.prevent_destroy {
        return None;
    }
    let stamp = live.vms.get(&vm.vmid.get())?.stamp()?;
    let running = stamp.generation?;
    (stamp.image.as_ref() == Some(&vm.image) && running != vm.generation.number()).then(|| {
        format!(
            "vm.{} stays on image.{} generation {running}: it follows new generations, but prevent_destroy keeps it from being replaced (generation {} is current)",
            vm.name,
            vm.image,
            vm.generation.number()
        )
    })
}

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
    let stamp = Stamp::vm(
        &fleet.fleet,
        &format!("vm.{}", vm.name),
        &vm.image,
        generation,
    );
    let description = if vm.description.trim().is_empty() {
        stamp.to_string()
    } else {
        format!("{}\n\n{stamp}", vm.description.trim_end())
    };
    c.insert("description".into(), description);
    c
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
        Some(s) if !s.is(&fleet.fleet, &address) => {
            return Err(PlanError::OtherOwner {
                address,
                vmid: vm.vmid.get(),
                stamp: format!("{} of fleet `{}`", s.resource, s.fleet),
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
    let live_generation = stamp.generation;

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
    if stamp.image.as_ref() != Some(&vm.image) {
        replace.push(format!(
            "its image changed from {} to {}",
            stamp.image.as_deref().unwrap_or("?"),
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
