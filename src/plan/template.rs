//! Template planning: the build of a new generation, the check of a
//! pinned one, and the retirement of generations beyond `rebuild.keep`.

use std::collections::{BTreeMap, BTreeSet};

use super::address::targeted;
use super::adopt;
use super::{Action, Change, FieldDiff, Impact, PlanError, Planner, Work, owned};
use crate::address::Address;
use crate::desired::{DesiredGraph, DesiredNode, DesiredTemplate, GenerationRef, IsoPinState};
use crate::fleet::Fleet;
use crate::live::{LiveState, LiveVm};
use crate::lock::{Generation, ImageLock, Lockfile};

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
                GenerationRef::Pinned(n) => check_template(t, self.live).and_then(|()| {
                    let adopt = adopt::template_change(
                        &self.fleet.fleet,
                        &self.desired.lock,
                        t,
                        n,
                        self.live,
                    )?;
                    self.changes.extend(adopt);
                    Ok(())
                }),
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
        let existing = self.live.vms.get(&t.vmid);
        let stamp = existing.and_then(LiveVm::stamp);
        let ours = stamp
            .as_ref()
            .is_some_and(|s| s.is(&self.fleet.fleet, &format!("image.{}", t.image)));
        match (existing, stamp) {
            (Some(vm), Some(stamp))
                if ours
                    && vm.template
                    && stamp.generation == Some(n)
                    && stamp.inputs == Some(t.input_hash) =>
            {
                self.adopted
                    .extend(crate::build::result_from_stamp(&stamp, &vm.node, vm.vmid));
                Ok(())
            }
            (Some(vm), _) if !ours => Err(PlanError::Foreign {
                address: format!("image.{}[{}]", t.image, t.node),
                vmid: vm.vmid.get(),
                name: vm.name.clone().unwrap_or_default(),
                node: vm.node.to_string(),
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

impl Planner<'_> {
    /// Step 5: the generations each image no longer keeps, retired in this
    /// plan — see [`Planner::retire_generation`] for when. Replicas
    /// already gone from the cluster are dropped from `lock` directly.
    pub(super) fn retire(&mut self, lock: &mut Lockfile) {
        let fleet = self.fleet;
        for (name, image) in &fleet.images {
            let Some(entry) = self.desired.lock.images.get(name) else {
                continue;
            };
            let builds: Vec<&DesiredTemplate> = self
                .desired
                .graph
                .node_weights()
                .filter_map(|n| match n {
                    DesiredNode::Template(t)
                        if t.image == *name && self.building.contains_key(&t.vmid.get()) =>
                    {
                        Some(t)
                    }
                    _ => None,
                })
                .collect();
            let successor = builds.first().map(|t| t.generation.number());
            let keep = kept_generations(entry, successor, image.rebuild.keep);
            let builds: Vec<Address> = builds
                .iter()
                .map(|t| Address::image(&t.image, t.node.as_str()))
                .collect();
            for g in entry
                .generations
                .iter()
                .filter(|g| !keep.contains(&g.number))
            {
                self.retire_generation(name, g, &builds, lock);
            }
        }
    }

    /// Retires generation `g` of image `name`, after `builds` (its
    /// successor's builds, all of them: until every replica is built and
    /// recorded, `g` may still be what clones come from) and after the
    /// changes that move its linked clones off it. A linked clone this plan
    /// leaves on it keeps it (Proxmox refuses to delete a base volume a
    /// linked clone uses): the generation is listed as retained.
    fn retire_generation(
        &mut self,
        name: &str,
        g: &Generation,
        builds: &[Address],
        lock: &mut Lockfile,
    ) {
        let users = self.linked_users(name, g.number);
        let movers: Vec<Address> = users.iter().filter_map(|u| self.moving(u)).collect();
        if movers.len() < users.len() {
            let staying = users
                .iter()
                .filter(|u| self.moving(u).is_none())
                .cloned()
                .collect();
            self.retained
                .push((format!("image.{name} generation {}", g.number), staying));
            return;
        }
        let image = &self.fleet.images[name];
        for t in &g.templates {
            if !self.live.vms.get(&t.vmid).is_some_and(|v| v.template) {
                lock.forget_replica(name, g.number, t.node.as_str());
                continue;
            }
            self.changes.push(Change {
                address: Address::generation(name, t.node.as_str(), g.number),
                action: Action::Destroy,
                depends_on: builds.iter().chain(&movers).cloned().collect(),
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
                    image: name.to_owned(),
                    generation: g.number,
                    vmid: t.vmid,
                    node: t.node.clone(),
                },
                unchanged: BTreeMap::new(),
            });
        }
    }

    /// The stamped VMs of this fleet that are linked clones of `image`'s
    /// generation `number` (where the storage cannot say, LVM-thin, every
    /// VM on it is taken to be one).
    fn linked_users(&self, image: &str, number: u32) -> Vec<String> {
        let live = self.live;
        owned(live, &self.fleet.fleet)
            .filter(|(vm, _)| {
                vm.disk_volid().is_some_and(|volid| {
                    live.linked_disks.contains(volid) || live.clone_mode_unknown.contains(volid)
                })
            })
            .filter(|(_, s)| s.image.as_deref() == Some(image) && s.generation == Some(number))
            .map(|(_, s)| s.resource)
            .collect()
    }

    /// The change of this plan that takes VM `address` off its template
    /// (a replace or a destroy), if any.
    fn moving(&self, address: &str) -> Option<Address> {
        self.changes
            .iter()
            .find(|c| {
                matches!(c.action, Action::Replace | Action::Destroy)
                    && matches!(c.address, Address::Vm { .. })
                    && c.address.to_string() == address
            })
            .map(|c| c.address.clone())
    }
}

/// The generations an image keeps: the one clones come from after this
/// plan — `successor`, the one being built, or else the current one — and
/// then the newest others, up to `keep` in all.
fn kept_generations(entry: &ImageLock, successor: Option<u32>, keep: u32) -> BTreeSet<u32> {
    let mut kept = BTreeSet::from([successor.unwrap_or(entry.current)]);
    let mut newest: Vec<u32> = entry.generations.iter().map(|g| g.number).collect();
    newest.sort_unstable_by(|a, b| b.cmp(a));
    for n in newest {
        if kept.len() >= keep.max(1) as usize {
            break;
        }
        kept.insert(n);
    }
    kept
}

/// The change that builds generation `n` of `t.image` on `t.node`.
fn build_change(
    fleet: &Fleet,
    desired: &DesiredGraph,
    t: &DesiredTemplate,
    n: u32,
    leftover: bool,
) -> Result<Change, PlanError> {
    let build = build_work(fleet, desired, t, n)?;
    let image = &fleet.images[&t.image];
    let field = |f: &str, v: String| FieldDiff {
        field: f.to_owned(),
        before: None,
        after: Some(v),
        sensitive: false,
    };
    let mut fields = vec![
        field("generation", n.to_string()),
        field("vmid", t.vmid.to_string()),
        field("iso", build.iso_volid.clone()),
        field(
            "access",
            match &build.access {
                crate::build::Access::CallHome { .. } => "call-home".to_owned(),
                crate::build::Access::Static { address, .. } => format!("static {address}"),
            },
        ),
        field("inputs", t.input_hash.to_string()[..12].to_owned()),
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
        address: Address::image(&t.image, t.node.as_str()),
        action: Action::Create,
        depends_on: Vec::new(),
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

/// Everything the build of generation `n` of `t.image` on `t.node` needs,
/// its pinned ISO on that node (or the shared storage) included.
fn build_work(
    fleet: &Fleet,
    desired: &DesiredGraph,
    t: &DesiredTemplate,
    n: u32,
) -> Result<crate::build::BuildWork, PlanError> {
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
    let pinned = iso.and_then(|iso| match (&iso.volid, &iso.pin) {
        (Some(volid), IsoPinState::Pinned { sha256, .. }) => Some((volid.clone(), sha256)),
        _ => None,
    });
    let Some((volid, sha256)) = pinned else {
        return Err(PlanError::IsoMissing {
            address: format!("image.{}[{}]", t.image, t.node),
            iso: image.iso.clone(),
            node: t.node.to_string(),
        });
    };
    Ok(crate::build::BuildWork {
        image: t.image.clone(),
        generation: n,
        node: t.node.clone(),
        vmid: t.vmid,
        vm_config: crate::build::build_vm_config(
            &image.hardware,
            &format!("{}-g{n}", t.image),
            &volid,
        ),
        iso_volid: volid,
        iso_sha256: *sha256,
        input_hash: t.input_hash,
        storage: image.hardware.storage.clone(),
        configuration_nix: crate::nixos::configuration_nix(&t.image, image),
        install_script: crate::nixos::install_script(&t.image, image),
        services: crate::build::verified_services(&t.image, image),
        boot_wait_ms: u64::try_from(image.build.boot_wait.get().as_millis()).unwrap_or(u64::MAX),
        timeout_secs: image.build.timeout.get().as_secs(),
        timeouts: image.build.timeouts.clone(),
        key_interval_ms: u64::from(image.build.key_interval_ms),
        access,
        guest_agent: image.nixos.guest_agent,
        fleet: fleet.fleet.clone(),
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
    let vm = live.vms.get(&t.vmid).ok_or_else(missing)?;
    if !vm.template || vm.node != t.node {
        return Err(missing());
    }
    Ok(())
}
