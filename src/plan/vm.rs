//! VM planning: the config nixgold owns on a VM, and the change (create,
//! update in place, replace) that brings a VM to it.

use std::collections::{BTreeMap, BTreeSet};

use pve_api::property::{Drive, IpConfig, Net, decode_sshkeys, encode_sshkeys, normalise_tags};

use super::address::targeted;
use super::adopt;
use super::canonical::differs;
use super::{Action, Change, FieldDiff, Impact, PlanError, Planner, VmWork, Work};
use crate::address::Address;
use crate::desired::DesiredVm;
use crate::fleet::{CloneMode, Fleet, OnNewGeneration, VmNetwork};
use crate::ids::Vmid;
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
            let address = format!("vm.{}", vm.name);
            let adopting = adopt::adopting(&self.desired.lock, &address, vm.vmid);
            match plan_vm(self.fleet, vm, image, self.live, &tag, force, adopting) {
                Ok(Some(mut change)) => {
                    // A VM waits for the build of the template it is cloned
                    // from (an update too: it writes the new stamp).
                    if let Some(build) = self.building.get(&vm.template_vmid.get()) {
                        change.depends_on.push(build.clone());
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
        let desired_ids: BTreeSet<Vmid> = self.vms.iter().map(|v| v.vmid).collect();
        let fleet_addresses: BTreeMap<String, Vmid> = self
            .vms
            .iter()
            .map(|v| (format!("vm.{}", v.name), v.vmid))
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
            let Some(address) = stamp.vm_address().map(str::to_owned) else {
                continue;
            };
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
                self.kept.push((address, vm.vmid.get()));
                continue;
            }
            self.changes.push(destroy_change(&address, vm, in_fleet));
        }
    }
}

/// The destroy of a stamped VM the fleet no longer has at this VMID.
fn destroy_change(address: &str, vm: &LiveVm, in_fleet: bool) -> Change {
    Change {
        address: Address::vm(address.trim_start_matches("vm.")),
        action: Action::Destroy,
        depends_on: Vec::new(),
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

/// The note for a VM that would follow its image's new generation but is
/// marked `prevent_destroy`: it is never replaced, and stays where it is.
fn held_by_prevent_destroy(fleet: &Fleet, vm: &DesiredVm, live: &LiveState) -> Option<String> {
    let spec = &fleet.vms[&vm.name];
    if spec.on_new_generation != OnNewGeneration::Replace || !spec.prevent_destroy {
        return None;
    }
    let stamp = live.vms.get(&vm.vmid)?.stamp()?;
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

/// An existing VM cloned otherwise than the fleet now says — linked
/// instead of full or the reverse, or a full clone on another storage:
/// nixgold does not move disks, `--replace` re-creates the VM.
fn placement_note(vm: &DesiredVm, live: &LiveState) -> Option<String> {
    let volid = live.vms.get(&vm.vmid)?.disk_volid()?;
    let storage = volid.split(':').next()?;
    let linked = live.linked_disks.contains(volid);
    // Where the listing cannot tell, a disk away from its template's
    // storage is still surely a full clone.
    let template_storage = live
        .vms
        .get(&vm.template_vmid)
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
    network_config(vm, &mut c);
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

/// The cloud-init network keys of `vm`: DHCP, or a static address with
/// its gateway, name servers and search domain.
fn network_config(vm: &DesiredVm, c: &mut BTreeMap<String, String>) {
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
    adopting: bool,
) -> Result<Option<Change>, PlanError> {
    let p = VmPlan::new(fleet, vm, image, adopting);
    let Some(existing) = live.vms.get(&vm.vmid) else {
        return Ok(Some(p.create()));
    };
    let stamp = p.check_owner(existing, tag)?;
    let reasons = p.replace_reasons(existing, &stamp, force_replace);
    if !reasons.is_empty() {
        return p.replace(existing, reasons.join("; ")).map(Some);
    }
    Ok(p.update(existing, stamp.generation))
}

/// What planning one VM needs, decided once.
struct VmPlan<'a> {
    fleet: &'a Fleet,
    vm: &'a DesiredVm,
    image: &'a crate::fleet::Image,
    spec: &'a crate::fleet::Vm,
    address: String,
    /// The config it should have, on the generation the fleet gives it.
    want: BTreeMap<String, String>,
    /// `nixgold import` recorded this VM for adoption: it is planned as if
    /// it carried the stamp it will get, and never replaced.
    adopting: bool,
}

impl<'a> VmPlan<'a> {
    fn new(
        fleet: &'a Fleet,
        vm: &'a DesiredVm,
        image: &'a crate::fleet::Image,
        adopting: bool,
    ) -> Self {
        VmPlan {
            fleet,
            vm,
            image,
            spec: &fleet.vms[&vm.name],
            address: format!("vm.{}", vm.name),
            want: desired_config(fleet, vm, image.nixos.guest_agent, vm.generation.number()),
            adopting,
        }
    }

    fn work(
        &self,
        set: BTreeMap<String, String>,
        password: bool,
        resize: Option<String>,
        start: bool,
        digest: Option<String>,
    ) -> VmWork {
        let vm = self.vm;
        VmWork {
            vmid: vm.vmid,
            node: vm.node.clone(),
            name: vm.name.clone(),
            template_vmid: vm.template_vmid,
            template_node: vm.template_node.clone(),
            full_clone: vm.clone == CloneMode::Full,
            storage: (vm.clone == CloneMode::Full).then(|| vm.storage.clone()),
            set,
            password: if password { vm.password.clone() } else { None },
            resize,
            start,
            restart: false,
            digest,
            adopt: self.adopting,
        }
    }

    /// The work of a new clone: every key, the password, the disk grown
    /// past the template's.
    fn clone_work(&self) -> VmWork {
        let vm = self.vm;
        let resize = (vm.disk.mib() > self.image.hardware.disk.mib()).then(|| vm.disk.to_string());
        self.work(self.want.clone(), true, resize, vm.start, None)
    }

    /// The fields of a create: every key, and where it comes from.
    fn create_fields(&self) -> Vec<FieldDiff> {
        let vm = self.vm;
        let new = |field: &str, after: String| FieldDiff {
            field: field.to_owned(),
            before: None,
            after: Some(after),
            sensitive: false,
        };
        let mut fields: Vec<FieldDiff> =
            self.want.iter().map(|(k, v)| new(k, show(k, v))).collect();
        let allocated = if vm.allocated { " (allocated)" } else { "" };
        let mode = if vm.clone == CloneMode::Full {
            "full"
        } else {
            "linked"
        };
        fields.push(new("vmid", format!("{}{allocated}", vm.vmid)));
        fields.push(new("node", vm.node.to_string()));
        fields.push(new(
            "clone",
            format!(
                "{mode} of image.{} {} (VMID {})",
                vm.image, vm.generation, vm.template_vmid
            ),
        ));
        fields.push(new("disk", vm.disk.to_string()));
        if vm.password.is_some() {
            fields.push(sensitive("cipassword"));
        }
        fields.sort_by(|a, b| a.field.cmp(&b.field));
        fields
    }

    fn create(&self) -> Change {
        Change {
            address: Address::vm(&self.vm.name),
            action: Action::Create,
            depends_on: Vec::new(),
            fields: self.create_fields(),
            reason: "not in the cluster".into(),
            impact: Impact::None,
            work: Work::CreateVm(self.clone_work()),
            unchanged: BTreeMap::new(),
        }
    }

    /// The VM at the fleet's VMID must be this fleet's VM, not locked; its
    /// stamp.
    fn check_owner(&self, existing: &LiveVm, tag: &str) -> Result<Stamp, PlanError> {
        let (address, vmid) = (self.address.clone(), self.vm.vmid.get());
        let stamp = match existing.stamp() {
            // An adopted VM is planned as if it carried the stamp it will get.
            None if self.adopting => Stamp::vm(
                &self.fleet.fleet,
                &address,
                &self.vm.image,
                self.vm.generation.number(),
            ),
            // During a clone its target exists as `lock: clone` with partial
            // disks and no description yet (shared/pve-api/NOTES.md, clone):
            // unstamped is not foreign yet.
            None if existing.lock.as_deref() == Some("clone") => {
                return Err(PlanError::CloneInProgress {
                    address,
                    vmid,
                    node: existing.node.to_string(),
                });
            }
            None => {
                return Err(PlanError::Foreign {
                    address,
                    vmid,
                    name: existing.name.clone().unwrap_or_default(),
                    node: existing.node.to_string(),
                });
            }
            Some(s) if !s.is(&self.fleet.fleet, &address) => {
                return Err(PlanError::OtherOwner {
                    address,
                    vmid,
                    stamp: format!("{} of fleet `{}`", s.resource, s.fleet),
                    fleet: self.fleet.fleet.clone(),
                });
            }
            Some(s) => s,
        };
        if !existing.tags.contains(tag) && !existing.tags.contains("nixgold") {
            tracing::debug!("{address}: stamped but untagged; the update restores the tags");
        }
        match &existing.lock {
            Some(lock) => Err(PlanError::Locked {
                address,
                vmid,
                lock: lock.clone(),
            }),
            None => Ok(stamp),
        }
    }

    /// Why the VM must be destroyed and cloned again, if it must.
    fn replace_reasons(&self, existing: &LiveVm, stamp: &Stamp, force: bool) -> Vec<String> {
        let vm = self.vm;
        let mut replace = Vec::new();
        if force {
            replace.push("replacement requested with --replace".to_owned());
        }
        if existing.node != vm.node {
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
        } else if self.spec.on_new_generation == OnNewGeneration::Replace
            && !self.spec.prevent_destroy
            && stamp.generation != Some(vm.generation.number())
        {
            replace.push(format!(
                "image.{} has generation {}, it runs generation {}",
                vm.image,
                vm.generation.number(),
                stamp.generation.map_or("?".to_owned(), |g| g.to_string())
            ));
        }
        if let Some(have) = live_disk(existing)
            && have > vm.disk.mib() << 20
        {
            replace.push(format!(
                "its disk is {} and disks cannot shrink to {}",
                pve_api::property::format_size(have),
                vm.disk
            ));
        }
        replace
    }

    fn replace(&self, existing: &LiveVm, reason: String) -> Result<Change, PlanError> {
        if self.adopting {
            return Err(PlanError::AdoptWouldReplace {
                address: self.address.clone(),
                vmid: self.vm.vmid.get(),
                reason,
            });
        }
        if self.spec.prevent_destroy {
            return Err(PlanError::PreventDestroy {
                address: self.address.clone(),
                reason,
            });
        }
        Ok(Change {
            address: Address::vm(&self.vm.name),
            action: Action::Replace,
            depends_on: Vec::new(),
            fields: self.create_fields(),
            reason,
            impact: Impact::DataLoss,
            work: Work::ReplaceVm {
                old_node: existing.node.clone(),
                new: self.keeping_mac(self.clone_work(), existing),
            },
            unchanged: BTreeMap::new(),
        })
    }

    /// `work` with the MAC of `existing`: the new VM of a replace keeps the
    /// old one's MAC (VMID, name and cloud-init come from the fleet), so
    /// DHCP reservations and DNS stay valid.
    fn keeping_mac(&self, mut work: VmWork, existing: &LiveVm) -> VmWork {
        if let Some(net) = work.set.get_mut("net0") {
            let mut wanted = Net::parse(net);
            if wanted.mac.is_none() {
                wanted.mac = existing
                    .config
                    .as_ref()
                    .and_then(|c| c.values.get("net0"))
                    .and_then(|v| Net::parse(v).mac);
                *net = wanted.to_string();
            }
        }
        work
    }

    /// The in-place update that brings `existing` to the fleet, if any. A
    /// VM that keeps its generation (`live_generation`) keeps it in its
    /// stamp.
    /// The size to grow the VM's disk to, if the fleet asks for more than
    /// it has, as a field of `diff` (a smaller one is a replace reason).
    fn disk_growth(&self, existing: &LiveVm, diff: &mut ConfigDiff) -> Option<String> {
        let want = &self.vm.disk;
        let have = live_disk(existing).filter(|&have| have < want.mib() << 20)?;
        diff.fields.push(FieldDiff {
            field: "disk".into(),
            before: Some(pve_api::property::format_size(have)),
            after: Some(want.to_string()),
            sensitive: false,
        });
        diff.impact = diff.impact.max(Impact::Hotplug);
        Some(want.to_string())
    }

    fn update(&self, existing: &LiveVm, live_generation: Option<u32>) -> Option<Change> {
        let (vm, spec) = (self.vm, self.spec);
        let want = match live_generation {
            Some(g) if spec.on_new_generation == OnNewGeneration::Keep || spec.prevent_destroy => {
                desired_config(self.fleet, vm, self.image.nixos.guest_agent, g)
            }
            _ => self.want.clone(),
        };
        let running = existing.running.unwrap_or(false);
        let config = existing.config.as_ref();
        let values = config.map(|c| c.values.clone()).unwrap_or_default();
        let mut diff = config_diff(&want, &values, running);
        let resize = self.disk_growth(existing, &mut diff);
        let start = vm.start && !running;
        if start {
            diff.fields.push(FieldDiff {
                field: "state".into(),
                before: Some("stopped".into()),
                after: Some("running".into()),
                sensitive: false,
            });
        }
        if diff.fields.is_empty() {
            return None;
        }
        diff.fields.sort_by(|a, b| a.field.cmp(&b.field));
        let reason = if self.adopting {
            "adopting it (nixgold import): stamp, tags and what differs from the fleet".to_owned()
        } else if !values.contains_key("ciuser") && want.contains_key("ciuser") && !running {
            "finishing a create that was interrupted".to_owned()
        } else {
            "its configuration differs from the fleet".to_owned()
        };
        if diff.impact == Impact::NeedsReboot && spec.restart_on_change {
            diff.impact = Impact::Restart;
        }
        let mut unchanged: BTreeMap<String, String> = want
            .iter()
            .filter(|(k, _)| !diff.set.contains_key(*k))
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
            diff.fields.push(sensitive("cipassword"));
        }
        let digest = config.map(|c| c.digest.clone());
        Some(Change {
            address: Address::vm(&vm.name),
            action: Action::Update,
            depends_on: Vec::new(),
            fields: diff.fields,
            reason,
            impact: diff.impact,
            work: Work::UpdateVm(VmWork {
                restart: diff.impact == Impact::Restart,
                ..self.work(diff.set, password, resize, start, digest)
            }),
            unchanged,
        })
    }
}

/// The keys of `want` whose live `values` differ (compared canonically).
struct ConfigDiff {
    /// What to write.
    set: BTreeMap<String, String>,
    fields: Vec<FieldDiff>,
    impact: Impact,
}

fn config_diff(
    want: &BTreeMap<String, String>,
    values: &BTreeMap<String, String>,
    running: bool,
) -> ConfigDiff {
    let mut diff = ConfigDiff {
        set: BTreeMap::new(),
        fields: Vec::new(),
        impact: Impact::None,
    };
    for (k, v) in want {
        let have = values.get(k).map(String::as_str);
        if !differs(k, v, have) {
            continue;
        }
        let value = if k == "net0" {
            // Keep the MAC Proxmox generated; change only what we own.
            let mut net = Net::parse(v);
            net.mac = have.map(Net::parse).and_then(|n| n.mac);
            net.to_string()
        } else {
            v.clone()
        };
        diff.set.insert(k.clone(), value);
        diff.fields.push(FieldDiff {
            field: k.clone(),
            before: have.map(|h| show(k, h)),
            after: Some(show(k, v)),
            sensitive: false,
        });
        diff.impact = diff.impact.max(field_impact(k, running));
    }
    diff
}

/// The size of a VM's root disk in bytes, as its config says.
fn live_disk(existing: &LiveVm) -> Option<u64> {
    let config = existing.config.as_ref()?;
    Drive::parse(config.values.get("scsi0")?).size()
}

/// A field whose value is never shown.
fn sensitive(field: &str) -> FieldDiff {
    FieldDiff {
        field: field.to_owned(),
        before: None,
        after: None,
        sensitive: true,
    }
}
