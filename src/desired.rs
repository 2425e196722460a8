//! The desired graph: a *complete* desired state built from the fleet and
//! the lockfile. Every VMID, node, generation and config value is decided
//! here, so apply never makes a choice (STYLE: the planner decides, the
//! executor obeys).
//!
//! Edges run ISO → template (one image generation on one node) → VM. Nodes
//! are inserted in sorted order, so the same inputs always give the same
//! graph, the same DOT text and the same node indices. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;

use crate::fleet::{Checksum, CloneMode, Fleet, Iso, SecretRef, VmNetwork, image_nodes};
use crate::ids::{DiskSize, NodeName, Sha256, Vmid};
use crate::lock::Lockfile;

/// One resource in the desired graph.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DesiredNode {
    Iso(DesiredIso),
    Template(DesiredTemplate),
    Vm(Box<DesiredVm>),
}

impl DesiredNode {
    /// Stable address used in plans, logs and `--target`.
    pub fn address(&self) -> String {
        match self {
            DesiredNode::Iso(i) => format!("iso.{}[{}]", i.name, i.node),
            DesiredNode::Template(t) => format!("image.{}[{}]", t.image, t.node),
            DesiredNode::Vm(v) => format!("vm.{}", v.name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DesiredIso {
    pub name: String,
    pub node: NodeName,
    pub storage: String,
    /// `STORAGE:iso/FILE` once the pin is known.
    pub volid: Option<String>,
    pub pin: IsoPinState,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum IsoPinState {
    Pinned {
        url: String,
        sha256: Sha256,
    },
    /// A channel or `file:` checksum that `nixgold update` has not resolved.
    Unresolved {
        source: String,
    },
}

/// Which generation of an image a template node stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "number", rename_all = "snake_case")]
pub enum GenerationRef {
    /// Built and recorded in the lockfile.
    Pinned(u32),
    /// Not built yet: apply builds it.
    ToBuild(u32),
}

impl GenerationRef {
    pub fn number(self) -> u32 {
        match self {
            GenerationRef::Pinned(n) | GenerationRef::ToBuild(n) => n,
        }
    }
}

impl std::fmt::Display for GenerationRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GenerationRef::Pinned(n) => write!(f, "generation {n}"),
            GenerationRef::ToBuild(n) => write!(f, "generation {n} (to build)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DesiredTemplate {
    pub image: String,
    pub generation: GenerationRef,
    pub node: NodeName,
    pub vmid: Vmid,
    pub storage: String,
    /// Identity of the generation this node should have: the hash of the
    /// ISO sha256, configuration.nix, install script and hardware.
    pub input_hash: Sha256,
    /// Why a build is needed (for `ToBuild`).
    pub build_reason: Option<String>,
}

/// The inputs a generation is built from, and their hash.
pub fn input_hash(
    image_name: &str,
    image: &crate::fleet::Image,
    iso_sha256: Option<&Sha256>,
) -> Sha256 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(
        iso_sha256
            .map(|s| s.to_string())
            .unwrap_or_default()
            .as_bytes(),
    );
    h.update(b"\0");
    h.update(crate::nixos::configuration_nix(image_name, image).as_bytes());
    h.update(b"\0");
    h.update(crate::nixos::install_script(image_name, image).as_bytes());
    h.update(b"\0");
    h.update(
        serde_json::to_string(&image.hardware)
            .unwrap_or_default()
            .as_bytes(),
    );
    Sha256::from_bytes(h.finalize().into())
}

/// The pinned ISO checksum of `image`'s ISO, if it is pinned.
fn image_iso_sha256(fleet: &Fleet, image: &crate::fleet::Image, lock: &Lockfile) -> Option<Sha256> {
    match fleet
        .isos
        .get(&image.iso)
        .map(|iso| iso_pin(&image.iso, iso, lock))
    {
        Some(IsoPinState::Pinned { sha256, .. }) => Some(sha256),
        _ => None,
    }
}

/// The input hash the fleet asks for for image `name` now (what a
/// rollback holds against), if the fleet has the image.
pub fn image_inputs(fleet: &Fleet, lock: &Lockfile, name: &str) -> Option<Sha256> {
    let image = fleet.images.get(name)?;
    let iso_sha = image_iso_sha256(fleet, image, lock);
    Some(input_hash(name, image, iso_sha.as_ref()))
}

/// The generation rules, for one image: `Ok(n)` — clones come from
/// generation `n` of the lockfile (the current one when the fleet still
/// asks for it, or a rollback holds it; a kept one whose inputs are what
/// the fleet asks for, which becomes current) — or `Err(why)` a new
/// generation must be built. A hold whose inputs the fleet no longer asks
/// for ends here (in `lock`).
fn choose_generation(
    name: &str,
    image: &crate::fleet::Image,
    lock: &mut Lockfile,
    hash: &Sha256,
    iso_sha256: Option<&Sha256>,
    notes: &mut Vec<String>,
) -> Result<u32, String> {
    let Some(entry) = lock.images.get_mut(name) else {
        return Err("the image has no generation yet".to_owned());
    };
    if let Some(hold) = entry.hold {
        if hold == *hash {
            notes.push(format!(
                "image.{name} is held at generation {} by `nixgold rollback`: nothing is built while the fleet asks for what it asked for then; `nixgold release --image {name}` ends the hold.",
                entry.current
            ));
            return Ok(entry.current);
        }
        entry.hold = None;
        notes.push(format!(
            "image.{name}: the hold on generation {} (`nixgold rollback`) ends: the image changed in the fleet since.",
            entry.current
        ));
    }
    // An imported generation whose ISO was unknown is compared on the
    // other inputs only.
    let without_iso = input_hash(name, image, None);
    let reason_for = |g: Option<&crate::lock::Generation>| {
        let baseline = match g {
            Some(g) if g.iso_sha256.is_none() => &without_iso,
            _ => hash,
        };
        rebuild_reason(image, g, baseline, iso_sha256)
    };
    let Some(reason) = reason_for(entry.current_generation()) else {
        return Ok(entry.current);
    };
    let reusable = entry
        .generations
        .iter()
        .filter(|g| reason_for(Some(g)).is_none())
        .map(|g| g.number)
        .max();
    match reusable {
        Some(number) => {
            notes.push(format!(
                "image.{name}: generation {number} is reused, not rebuilt: its inputs are what the fleet asks for (generation {} was current).",
                entry.current
            ));
            entry.current = number;
            Ok(number)
        }
        None => Err(reason),
    }
}

/// Whether the current generation still matches the image: `None` if it
/// does, else why a new one is needed.
fn rebuild_reason(
    image: &crate::fleet::Image,
    current: Option<&crate::lock::Generation>,
    hash: &Sha256,
    iso_sha256: Option<&Sha256>,
) -> Option<String> {
    let Some(g) = current else {
        return Some("the image has no generation yet".to_owned());
    };
    if let (Some(pin), Some(built)) = (iso_sha256, g.iso_sha256)
        && *pin != built
    {
        return Some("the pinned ISO changed".to_owned());
    }
    if g.input_hash != *hash {
        return Some(if g.imported {
            "its inputs changed since its template was imported".to_owned()
        } else {
            "its configuration, install script or hardware changed".to_owned()
        });
    }
    let days = image.rebuild.every_days?;
    let built = humantime::parse_rfc3339(&g.built_at).ok()?;
    let age = std::time::SystemTime::now().duration_since(built).ok()?;
    (age > std::time::Duration::from_secs(u64::from(days) * 86_400)).then(|| {
        format!(
            "the rebuild policy is due (built {} days ago)",
            age.as_secs() / 86_400
        )
    })
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DesiredVm {
    pub name: String,
    pub vmid: Vmid,
    /// True when the VMID was allocated by nixgold rather than fixed.
    pub allocated: bool,
    pub node: NodeName,
    pub image: String,
    pub generation: GenerationRef,
    pub template_vmid: Vmid,
    /// The node of the template it is cloned from (its own node, or the
    /// build node of an image on shared storage).
    pub template_node: NodeName,
    pub clone: CloneMode,
    pub storage: String,
    pub cores: u32,
    pub sockets: u32,
    pub memory: u64,
    pub disk: DiskSize,
    pub bridge: String,
    pub vlan: Option<u16>,
    pub network: VmNetwork,
    pub user: Option<String>,
    pub ssh_keys: Vec<String>,
    /// Where the password comes from; never the password.
    #[serde(serialize_with = "serialize_secret")]
    pub password: Option<SecretRef>,
    pub tags: Vec<String>,
    pub onboot: bool,
    pub start: bool,
    pub description: String,
}

fn serialize_secret<S: serde::Serializer>(
    secret: &Option<SecretRef>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        Some(r) => s.serialize_str(&r.to_string()),
        None => s.serialize_none(),
    }
}

/// The desired graph plus the lockfile it implies (new VMID allocations,
/// reused generations, ended holds).
#[derive(Debug, Clone)]
pub struct DesiredGraph {
    pub graph: DiGraph<DesiredNode, ()>,
    pub lock: Lockfile,
    /// What the generation rules decided that a person should know (a
    /// hold kept or ended, a kept generation reused).
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DesiredError {
    #[error(
        "images.{image}.vmid_range: no free VMID left for generation {generation} on {node}\n  hint: widen the range or lower `rebuild.keep`"
    )]
    ImageRangeFull {
        image: String,
        generation: u32,
        node: NodeName,
    },
    #[error("vm_vmid_range: no free VMID left for vm.{vm}\n  hint: widen `vm_vmid_range`")]
    VmRangeFull { vm: String },
}

/// Builds the desired graph. The fleet must have passed validation.
pub fn build(fleet: &Fleet, lock: &Lockfile) -> Result<DesiredGraph, DesiredError> {
    let mut lock = lock.clone();
    lock.fleet = fleet.fleet.clone();
    let mut b = Builder {
        fleet,
        lock,
        graph: DiGraph::new(),
        notes: Vec::new(),
        isos: BTreeMap::new(),
        templates: BTreeMap::new(),
        allocated_last: None,
    };
    b.isos();
    for (name, image) in &fleet.images {
        b.templates(name, image)?;
    }
    // VMIDs fixed in the fleet or already allocated are taken; new
    // allocations go to the lowest free id, in VM name order.
    let mut taken: BTreeSet<Vmid> = fleet.vms.values().filter_map(|vm| vm.vmid).collect();
    taken.extend(b.lock.vmids.values().copied());
    for (name, vm) in &fleet.vms {
        b.vm(name, vm, &mut taken)?;
    }
    // Allocations of VMs that left the fleet stay until apply has destroyed
    // them; that is the plan's business, not the graph's.
    Ok(DesiredGraph {
        graph: b.graph,
        lock: b.lock,
        notes: b.notes,
    })
}

/// The desired graph as its steps build it.
struct Builder<'a> {
    fleet: &'a Fleet,
    lock: Lockfile,
    graph: DiGraph<DesiredNode, ()>,
    notes: Vec<String>,
    /// ISO replicas by (ISO, node).
    isos: BTreeMap<(String, NodeName), NodeIndex>,
    /// Templates by (image, node).
    templates: BTreeMap<(String, NodeName), (NodeIndex, GenerationRef, Vmid)>,
    /// The VMID allocated last (allocations go up, in VM name order).
    allocated_last: Option<Vmid>,
}

impl Builder<'_> {
    /// ISO replicas needed: one per node that builds a template from it,
    /// or one on the first such node when the ISO storage is shared.
    fn isos(&mut self) {
        let fleet = self.fleet;
        let mut iso_nodes: BTreeMap<String, BTreeSet<NodeName>> = BTreeMap::new();
        for (name, image) in &fleet.images {
            for node in image_nodes(fleet, name) {
                iso_nodes.entry(image.iso.clone()).or_default().insert(node);
            }
        }
        for (name, nodes) in &iso_nodes {
            let Some(iso) = fleet.isos.get(name) else {
                continue;
            };
            let nodes: Vec<&NodeName> = if fleet.proxmox.is_shared(iso.storage()) {
                nodes.iter().take(1).collect()
            } else {
                nodes.iter().collect()
            };
            let pin = iso_pin(name, iso, &self.lock);
            let volid = match &pin {
                IsoPinState::Pinned { url, sha256 } => Some(format!(
                    "{}:iso/{}",
                    iso.storage(),
                    iso_filename(url, &sha256.to_string())
                )),
                IsoPinState::Unresolved { .. } => None,
            };
            for node in nodes {
                let idx = self.graph.add_node(DesiredNode::Iso(DesiredIso {
                    name: name.clone(),
                    node: node.clone(),
                    storage: iso.storage().to_owned(),
                    volid: volid.clone(),
                    pin: pin.clone(),
                }));
                self.isos.insert((name.clone(), node.clone()), idx);
            }
        }
    }

    /// The templates of image `name`, one per node that needs one: the
    /// generation the rules choose (`choose_generation`) where the node
    /// has its replica, a build (new VMID) where it has not.
    fn templates(&mut self, name: &str, image: &crate::fleet::Image) -> Result<(), DesiredError> {
        let fleet = self.fleet;
        let iso_sha = image_iso_sha256(fleet, image, &self.lock);
        let hash = input_hash(name, image, iso_sha.as_ref());
        let chosen = choose_generation(
            name,
            image,
            &mut self.lock,
            &hash,
            iso_sha.as_ref(),
            &mut self.notes,
        );
        let locked = self.lock.images.get(name).cloned();
        let reason = chosen.err();
        let pinned = locked
            .as_ref()
            .and_then(|l| l.current_generation())
            .filter(|_| reason.is_none());
        let used: BTreeSet<Vmid> = locked
            .iter()
            .flat_map(|l| &l.generations)
            .flat_map(|g| g.templates.iter().map(|t| t.vmid))
            .collect();
        let next_number = locked
            .as_ref()
            .and_then(|l| l.generations.iter().map(|g| g.number).max())
            .unwrap_or(0)
            + 1;
        let mut free = image.vmid_range.iter().filter(|id| !used.contains(id));
        for node in image_nodes(fleet, name) {
            let (generation, vmid) = match pinned
                .and_then(|g| g.templates.iter().find(|t| t.node == node).map(|t| (g, t)))
            {
                Some((g, t)) => (GenerationRef::Pinned(g.number), t.vmid),
                None => {
                    // A node without a replica of the current generation
                    // (or an image that needs a new one) gets a build.
                    let generation = pinned.map_or(next_number, |g| g.number);
                    let vmid = free.next().ok_or_else(|| DesiredError::ImageRangeFull {
                        image: name.to_owned(),
                        generation,
                        node: node.clone(),
                    })?;
                    (GenerationRef::ToBuild(generation), vmid)
                }
            };
            let build_reason = match generation {
                GenerationRef::ToBuild(_) => Some(
                    reason
                        .clone()
                        .unwrap_or_else(|| format!("node {node} has no replica yet")),
                ),
                GenerationRef::Pinned(_) => None,
            };
            let idx = self.graph.add_node(DesiredNode::Template(DesiredTemplate {
                image: name.to_owned(),
                generation,
                node: node.clone(),
                vmid,
                storage: image.hardware.storage.clone(),
                input_hash: hash,
                build_reason,
            }));
            if let Some(iso_idx) = self.iso_of(image, &node) {
                self.graph.add_edge(iso_idx, idx, ());
            }
            self.templates
                .insert((name.to_owned(), node), (idx, generation, vmid));
        }
        Ok(())
    }

    /// The ISO replica a template of `image` on `node` is built from.
    fn iso_of(&self, image: &crate::fleet::Image, node: &NodeName) -> Option<NodeIndex> {
        let fleet = self.fleet;
        let shared = fleet
            .proxmox
            .is_shared(fleet.isos.get(&image.iso).map_or("", |i| i.storage()));
        if shared {
            self.isos
                .iter()
                .find(|((iso, _), _)| iso == &image.iso)
                .map(|(_, i)| *i)
        } else {
            self.isos.get(&(image.iso.clone(), node.clone())).copied()
        }
    }

    /// VM `name`: its VMID (fixed, allocated before, or allocated now from
    /// what is not `taken`), its template, its settings with the image's
    /// defaults.
    fn vm(
        &mut self,
        name: &str,
        vm: &crate::fleet::Vm,
        taken: &mut BTreeSet<Vmid>,
    ) -> Result<(), DesiredError> {
        let fleet = self.fleet;
        let Some(image) = fleet.images.get(&vm.image) else {
            return Ok(());
        };
        let node = vm
            .node
            .clone()
            .unwrap_or_else(|| fleet.proxmox.default_node().clone());
        let (vmid, allocated) = self.vmid(name, vm, taken)?;
        let template_node = if fleet.proxmox.is_shared(&image.hardware.storage) {
            image
                .build_node
                .clone()
                .unwrap_or_else(|| fleet.proxmox.default_node().clone())
        } else {
            node.clone()
        };
        let Some(&(template_idx, generation, template_vmid)) = self
            .templates
            .get(&(vm.image.clone(), template_node.clone()))
        else {
            return Ok(());
        };
        let (bridge, vlan) = match &vm.network {
            VmNetwork::Dhcp { bridge, vlan, .. } | VmNetwork::Static { bridge, vlan, .. } => (
                bridge
                    .clone()
                    .unwrap_or_else(|| image.hardware.bridge.clone()),
                vlan.or(image.hardware.vlan),
            ),
        };
        let mut tags = vm.tags.clone();
        tags.sort();
        let idx = self.graph.add_node(DesiredNode::Vm(Box::new(DesiredVm {
            name: name.to_owned(),
            vmid,
            allocated,
            node,
            image: vm.image.clone(),
            generation,
            template_vmid,
            template_node,
            clone: vm.clone,
            storage: vm
                .storage
                .clone()
                .unwrap_or_else(|| image.hardware.storage.clone()),
            cores: vm.cores.unwrap_or(image.hardware.cores),
            sockets: image.hardware.sockets,
            memory: vm.memory.unwrap_or(image.hardware.memory),
            disk: vm.disk.unwrap_or(image.hardware.disk),
            bridge,
            vlan,
            network: vm.network.clone(),
            user: vm.user.clone(),
            ssh_keys: vm.ssh_keys.clone(),
            password: vm.password.clone(),
            tags,
            onboot: vm.onboot,
            start: vm.start,
            description: vm.description.clone(),
        })));
        self.graph.add_edge(template_idx, idx, ());
        Ok(())
    }

    /// VM `name`'s VMID and whether nixgold allocated it (recorded in the
    /// lockfile; a VMID the fleet fixes drops an old allocation).
    fn vmid(
        &mut self,
        name: &str,
        vm: &crate::fleet::Vm,
        taken: &mut BTreeSet<Vmid>,
    ) -> Result<(Vmid, bool), DesiredError> {
        let address = format!("vm.{name}");
        let full = || DesiredError::VmRangeFull {
            vm: name.to_owned(),
        };
        match (vm.vmid, self.lock.vmids.get(&address)) {
            (Some(id), _) => {
                self.lock.vmids.remove(&address);
                Ok((id, false))
            }
            (None, Some(id)) => Ok((*id, true)),
            (None, None) => {
                let range = self.fleet.vm_vmid_range.ok_or_else(full)?;
                // `taken` only grows, so the lowest free id only moves up:
                // each search starts at the previous allocation (from the
                // range's start, it made 10,000 VMs cost 50 million lookups).
                let id = range
                    .iter_from(self.allocated_last.unwrap_or(range.first))
                    .find(|id| !taken.contains(id))
                    .ok_or_else(full)?;
                taken.insert(id);
                self.allocated_last = Some(id);
                self.lock.vmids.insert(address, id);
                Ok((id, true))
            }
        }
    }
}

pub fn iso_pin(name: &str, iso: &Iso, lock: &Lockfile) -> IsoPinState {
    match (iso, lock.isos.get(name)) {
        (
            Iso::Url {
                url,
                checksum: Checksum::Sha256(sha256),
                ..
            },
            _,
        ) => IsoPinState::Pinned {
            url: url.clone(),
            sha256: *sha256,
        },
        (_, Some(pin)) if pin.source == iso.source() => IsoPinState::Pinned {
            url: pin.url.clone(),
            sha256: pin.sha256,
        },
        _ => IsoPinState::Unresolved {
            source: iso.source(),
        },
    }
}

/// The file name nixgold downloads a pinned ISO to: the URL's last path
/// segment with every character outside `[A-Za-z0-9_.-]` replaced by `_`
/// (what `download-url` does to `filename`), with the first 16 hex digits
/// of the pinned sha256 before the extension. A pin that moves to another
/// checksum therefore names another file, which is downloaded and verified
/// before a build uses it, instead of reusing the old file unchecked
/// (Proxmox keeps an existing file of the same name).
pub fn iso_filename(url: &str, sha256: &str) -> String {
    let last = url.rsplit('/').next().unwrap_or(url);
    let clean: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let (stem, ext) = match clean.rsplit_once('.') {
        Some((stem, ext)) if ext.eq_ignore_ascii_case("iso") || ext.eq_ignore_ascii_case("img") => {
            (stem, ext)
        }
        _ => (clean.as_str(), "iso"),
    };
    let short = sha256.get(..16).unwrap_or(sha256);
    format!("{stem}.{short}.{ext}")
}

impl DesiredGraph {
    /// Graphviz DOT, nodes and edges in insertion (sorted) order.
    pub fn to_dot(&self) -> String {
        let mut out = String::from(
            "digraph nixgold {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
        );
        for idx in self.graph.node_indices() {
            let node = &self.graph[idx];
            let shape = match node {
                DesiredNode::Iso(_) => "cylinder",
                DesiredNode::Template(_) => "component",
                DesiredNode::Vm(_) => "box",
            };
            let label = self.label(node).replace('"', "\\\"");
            let _ = writeln!(
                out,
                "  \"{}\" [shape={shape}, label=\"{}\\n{label}\"];",
                node.address(),
                node.address()
            );
        }
        for edge in self.graph.edge_indices() {
            if let Some((a, b)) = self.graph.edge_endpoints(edge) {
                let _ = writeln!(
                    out,
                    "  \"{}\" -> \"{}\";",
                    self.graph[a].address(),
                    self.graph[b].address()
                );
            }
        }
        out.push_str("}\n");
        out
    }

    /// An indented tree from the ISOs down to the VMs.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let roots: Vec<NodeIndex> = self
            .graph
            .node_indices()
            .filter(|i| {
                self.graph
                    .neighbors_directed(*i, petgraph::Incoming)
                    .next()
                    .is_none()
            })
            .collect();
        for root in roots {
            self.write_tree(root, "", "", &mut out);
        }
        out
    }

    fn write_tree(&self, idx: NodeIndex, first: &str, rest: &str, out: &mut String) {
        let node = &self.graph[idx];
        let _ = writeln!(out, "{first}{} ({})", node.address(), self.label(node));
        let mut children: Vec<NodeIndex> = self.graph.neighbors(idx).collect();
        children.sort();
        for (i, child) in children.iter().enumerate() {
            let last = i + 1 == children.len();
            let (f, r) = if last {
                ("└── ", "    ")
            } else {
                ("├── ", "│   ")
            };
            self.write_tree(*child, &format!("{rest}{f}"), &format!("{rest}{r}"), out);
        }
    }

    fn label(&self, node: &DesiredNode) -> String {
        match node {
            DesiredNode::Iso(iso) => match &iso.pin {
                IsoPinState::Pinned { sha256, .. } => {
                    format!(
                        "{}, sha256 {}…",
                        iso.volid.as_deref().unwrap_or("?"),
                        &sha256.to_string()[..12]
                    )
                }
                IsoPinState::Unresolved { source } => {
                    format!("{}:iso/?, {source} not pinned yet", iso.storage)
                }
            },
            DesiredNode::Template(t) => {
                format!("{}, VMID {} on {}", t.generation, t.vmid, t.storage)
            }
            DesiredNode::Vm(vm) => format!(
                "VMID {}{} on {}, {} clone, {} cores, {} MiB, {}",
                vm.vmid,
                if vm.allocated { " (allocated)" } else { "" },
                vm.node,
                match vm.clone {
                    CloneMode::Full => "full",
                    CloneMode::Linked => "linked",
                },
                vm.cores,
                vm.memory,
                vm.disk
            ),
        }
    }
}
