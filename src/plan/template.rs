//! Template planning: the build of a new generation, the check of a
//! pinned one, and the retirement of generations beyond `rebuild.keep`.

use std::collections::{BTreeMap, BTreeSet};

use super::address::targeted;
use super::{Action, Change, FieldDiff, Impact, PlanError, Planner, Work, owned};
use crate::desired::{DesiredGraph, DesiredNode, DesiredTemplate, GenerationRef, IsoPinState};
use crate::fleet::Fleet;
use crate::live::{LiveState, LiveVm};
use crate::lock::Lockfile;
use crate::stamp::Stamp;

impl Planner<'_> {
    /// Step 2: the templates the planned VMs (or `--target image.NAME`)
    /// clone from: a pinned generation is checked, a new one built — or
    /// adopted, when an interrupted apply built it but did not record it.
    pub(super) fn templates(&mut self) {
        for node in self.desired.graph.node_weights() {
            let DesiredNode::Template(t) = node else {
                continue;
            };
            let wanted = self.images.contains(t.image.as_str())
                || targeted(self.options, &format!("image.{}", t.image));
            if !wanted {
                continue;
            }
            let checked = match t.generation {
                GenerationRef::Pinned(_) => check_template(t, self.live),
                GenerationRef::ToBuild(n) => self.new_generation(t, n),
            };
            match checked {
                Ok(()) => {
                    self.template_ok.insert(t.vmid.get());
                }
                Err(e) => self.errors.push(e),
            }
        }
    }

    /// Generation `n` of `t`: found built and stamped (adopted), or built.
    fn new_generation(&mut self, t: &DesiredTemplate, n: u32) -> Result<(), PlanError> {
        let existing = self.live.vms.get(&t.vmid.get());
        let stamp = existing.and_then(LiveVm::stamp);
        let ours = stamp
            .as_ref()
            .is_some_and(|s| s.is(&self.fleet.fleet, &format!("image.{}", t.image)));
        match (existing, stamp) {
            (Some(vm), Some(stamp))
                if ours
                    && vm.template
                    && stamp.generation == Some(n)
                    && stamp.inputs.as_deref() == Some(t.input_hash.as_str()) =>
            {
                self.adopted
                    .extend(crate::build::result_from_stamp(&stamp, &vm.node, vm.vmid));
                Ok(())
            }
            (Some(vm), _) if !ours => Err(PlanError::Foreign {
                address: format!("image.{}[{}]", t.image, t.node),
                vmid: vm.vmid,
                name: vm.name.clone().unwrap_or_default(),
                node: vm.node.clone(),
            }),
            (existing, _) => {
                let change = build_change(self.fleet, self.desired, t, n, existing.is_some())?;
                self.building.insert(t.vmid.get(), change.address.clone());
                self.changes.push(change);
                Ok(())
            }
        }
    }
}

/// Plans the removal of generations beyond each image's `rebuild.keep`
/// (the current one, and one being built, always stay). A generation with
/// stamped VMs on it stays too — they may be linked clones that pin it —
/// and is listed in the returned notes. Replicas already gone from the
/// cluster are dropped from `lock` directly.
pub(super) fn retire_generations(
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
    let stamps: Vec<Stamp> = owned(live, &fleet.fleet)
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
                .filter(|s| s.image.as_ref() == Some(name) && s.generation == Some(g.number))
                .map(|s| s.resource.clone())
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
