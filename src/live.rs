//! Live state: a read-only snapshot of the cluster, collected once per plan.
//!
//! One `GET /cluster/resources?type=vm` finds every VM and its node, name,
//! tags and lock; one `type=storage` listing says which storages exist
//! where and whether they are shared; one content listing per (node,
//! storage) that holds a desired ISO; and a config read only for the VMs the
//! fleet manages — by VMID, or by this fleet's ownership tag. Whether a VM
//! runs comes from the same resource listing; since that status lags (it is
//! pvestatd's RRD broadcast), `status/current` is read only where the lag
//! could cause a change: a VM the fleet wants started that the listing does
//! not show running. The number of calls does not grow with VMs the fleet
//! does not manage; it is reported with the plan.

use std::collections::{BTreeMap, BTreeSet};

use pve_api::types::{ClusterResource, VmConfig, Volume};
use pve_api::{ApiError, Client};
use sha2::Digest;

use crate::desired::{DesiredGraph, DesiredNode};
use crate::ids::{NodeName, Vmid};

/// Config reads a plan keeps in flight. Each holds an API worker only for
/// its service time, not for the round trip, so a few workers' worth of
/// reads in flight per worker keep the server busy: 16 saturates a
/// pveproxy/pvedaemon pair of 4 workers at a few milliseconds of latency,
/// where 8 left a third of the server idle.
pub const READ_CONCURRENCY: usize = 16;

/// Tags every VM nixgold creates carries: `nixgold` and `nixgold.<fleet>`.
pub fn fleet_tag(fleet: &str) -> String {
    format!("nixgold.{}", fleet.to_ascii_lowercase())
}

#[derive(Debug, Clone, PartialEq)]
pub struct LiveVm {
    pub vmid: Vmid,
    pub node: NodeName,
    pub name: Option<String>,
    pub template: bool,
    pub tags: BTreeSet<String>,
    pub lock: Option<String>,
    /// Read only for managed VMs.
    pub config: Option<LiveConfig>,
    pub running: Option<bool>,
}

impl LiveVm {
    /// The ownership stamp in its description (configs are read for
    /// managed VMs only).
    pub fn stamp(&self) -> Option<crate::stamp::Stamp> {
        crate::stamp::Stamp::parse(self.config.as_ref()?.values.get("description")?)
    }

    /// The volume id of its root disk (`scsi0`), e.g. `tank:vm-400-disk-0`.
    pub fn disk_volid(&self) -> Option<&str> {
        self.config.as_ref()?.values.get("scsi0")?.split(',').next()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LiveConfig {
    pub values: BTreeMap<String, String>,
    pub digest: String,
}

impl From<VmConfig> for LiveConfig {
    fn from(c: VmConfig) -> Self {
        LiveConfig {
            values: c.values,
            digest: c.digest,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LiveStorage {
    pub shared: bool,
    pub content: BTreeSet<String>,
    /// The plugin type (`lvmthin`, `zfspool`, `dir`, …).
    pub plugin: String,
    /// Bytes in use and in all, as the storage reports them (for thin
    /// storage: what is written, not what volumes could grow to).
    pub used: u64,
    pub total: u64,
}

impl LiveStorage {
    /// Thin storage over-commits: a volume takes space as it is written.
    /// ZFS counts as thick: `sparse` is off unless configured, and the
    /// resources listing does not show it.
    pub fn is_thin(&self) -> bool {
        !matches!(self.plugin.as_str(), "lvm" | "zfspool")
    }

    pub fn free(&self) -> u64 {
        self.total.saturating_sub(self.used)
    }

    /// Whether a content listing shows a linked clone's base: ZFS and RBD
    /// name it (`parent`: `base-…@__base__`), files too (the base file);
    /// LVM-thin lists a linked clone like any other volume
    /// (pve-storage `LvmThinPlugin.pm` `list_images`).
    pub fn shows_clone_parent(&self) -> bool {
        self.plugin != "lvmthin"
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveState {
    pub vms: BTreeMap<Vmid, LiveVm>,
    /// (node, storage) → storage.
    pub storages: BTreeMap<(String, String), LiveStorage>,
    /// ISO volumes by (node, storage).
    pub isos: BTreeMap<(String, String), Vec<Volume>>,
    /// Managed VMs' disk volumes that are linked clones (have a `parent`).
    pub linked_disks: BTreeSet<String>,
    /// Managed VMs' disk volumes on storage whose listing cannot tell a
    /// linked clone from a full one (LVM-thin).
    pub clone_mode_unknown: BTreeSet<String>,
    /// API calls it took.
    pub calls: u64,
}

impl LiveState {
    /// A fingerprint of everything the plan depends on; a saved plan is
    /// refused when it changed.
    pub fn fingerprint(&self) -> String {
        let mut h = sha2::Sha256::new();
        for (id, vm) in &self.vms {
            h.update(
                format!(
                    "{id}|{}|{:?}|{:?}|{:?}|{:?}\n",
                    vm.node, vm.name, vm.lock, vm.running, vm.tags
                )
                .as_bytes(),
            );
            if let Some(c) = &vm.config {
                h.update(c.digest.as_bytes());
            }
        }
        for ((node, storage), vols) in &self.isos {
            for v in vols {
                h.update(format!("{node}|{storage}|{}\n", v.volid).as_bytes());
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Collects the live state the desired graph needs.
pub async fn collect(
    client: &Client,
    desired: &DesiredGraph,
    fleet: &str,
    concurrency: usize,
) -> Result<LiveState, ApiError> {
    let start = client.calls();
    let mut live = LiveState::default();
    // Reads that do not need each other's answers go out together: a
    // round trip each saved, of the few a plan makes in a row.
    let (vms, storages) = tokio::try_join!(
        client.cluster_resources(Some("vm")),
        client.cluster_resources(Some("storage")),
    )?;
    add_vms(&mut live, vms);
    add_storages(&mut live, storages);
    let wanted = Wanted::from_graph(desired, &live, fleet);
    let (isos, disks) = tokio::try_join!(
        read_isos(client, &live.storages, &wanted.iso_places),
        read_managed(client, &mut live.vms, &live.storages, &wanted, concurrency),
    )?;
    live.isos = isos;
    add_disk_listings(&mut live, disks);
    live.calls = client.calls() - start;
    Ok(live)
}

/// Every VM from one `/cluster/resources?type=vm`, running state included.
fn add_vms(live: &mut LiveState, resources: Vec<ClusterResource>) {
    for r in resources.into_iter().filter(|r| r.kind == "qemu") {
        // What Proxmox lists always has a valid VMID and node; anything
        // else could not be a VM of the fleet.
        let Some(vmid) = r.vmid.and_then(|id| Vmid::new(u64::from(id)).ok()) else {
            continue;
        };
        let Some(node) = r.node.and_then(|n| n.parse::<NodeName>().ok()) else {
            continue;
        };
        let tags = r
            .tags
            .as_deref()
            .unwrap_or_default()
            .split([';', ',', ' '])
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        live.vms.insert(
            vmid,
            LiveVm {
                vmid,
                node,
                name: r.name,
                template: r.template,
                tags,
                lock: r.lock,
                config: None,
                running: match r.status.as_deref() {
                    Some("running") => Some(true),
                    Some("stopped") => Some(false),
                    _ => None,
                },
            },
        );
    }
}

/// Every storage on every node from one `/cluster/resources?type=storage`.
fn add_storages(live: &mut LiveState, resources: Vec<ClusterResource>) {
    for r in resources {
        let (Some(node), Some(storage)) = (r.node, r.storage) else {
            continue;
        };
        let content = r
            .content
            .unwrap_or_default()
            .split(',')
            .map(str::to_owned)
            .collect();
        live.storages.insert(
            (node, storage),
            LiveStorage {
                shared: r.shared,
                content,
                plugin: r.plugintype.unwrap_or_default(),
                used: r.disk.unwrap_or(0),
                total: r.maxdisk.unwrap_or(0),
            },
        );
    }
}

/// What the plan needs read beyond the listings.
struct Wanted {
    /// (node, storage) that should hold an ISO.
    iso_places: BTreeSet<(String, String)>,
    /// VMIDs the fleet manages: declared, or carrying its tag.
    managed: BTreeSet<Vmid>,
    /// VMs the fleet wants started.
    running: BTreeSet<Vmid>,
}

impl Wanted {
    fn from_graph(desired: &DesiredGraph, live: &LiveState, fleet: &str) -> Self {
        let mut wanted = Wanted {
            iso_places: BTreeSet::new(),
            managed: BTreeSet::new(),
            running: BTreeSet::new(),
        };
        for node in desired.graph.node_weights() {
            match node {
                DesiredNode::Iso(iso) => {
                    wanted
                        .iso_places
                        .insert((iso.node.to_string(), iso.storage.clone()));
                }
                DesiredNode::Template(t) => {
                    wanted.managed.insert(t.vmid);
                }
                DesiredNode::Vm(vm) => {
                    wanted.managed.insert(vm.vmid);
                    if vm.start {
                        wanted.running.insert(vm.vmid);
                    }
                }
            }
        }
        let tag = fleet_tag(fleet);
        wanted.managed.extend(
            live.vms
                .values()
                .filter(|v| v.tags.contains(&tag))
                .map(|v| v.vmid),
        );
        wanted
    }
}

/// ISO listings, once per (node, storage) that exists.
async fn read_isos(
    client: &Client,
    storages: &BTreeMap<(String, String), LiveStorage>,
    places: &BTreeSet<(String, String)>,
) -> Result<BTreeMap<(String, String), Vec<Volume>>, ApiError> {
    let mut isos = BTreeMap::new();
    for (node, storage) in places {
        if !storages.contains_key(&(node.clone(), storage.clone())) {
            continue; // planned as an error: the storage does not exist there
        }
        let vols = client
            .storage_content(node, storage, Some("iso"), None)
            .await?;
        isos.insert((node.clone(), storage.clone()), vols);
    }
    Ok(isos)
}

/// A storage's disk volumes as one node lists them.
type DiskListing = ((String, String), Vec<Volume>);

/// The config of managed VMs that exist, and their node-local status where
/// the lagging listing could start a VM that already runs; and the disk
/// listing of each (node, storage) holding a managed VM's disk, started as
/// the first config naming it arrives, alongside the remaining reads.
async fn read_managed(
    client: &Client,
    vms: &mut BTreeMap<Vmid, LiveVm>,
    storages: &BTreeMap<(String, String), LiveStorage>,
    wanted: &Wanted,
    concurrency: usize,
) -> Result<Vec<DiskListing>, ApiError> {
    let targets: Vec<(Vmid, NodeName, bool)> = wanted
        .managed
        .iter()
        .filter_map(|&id| {
            let vm = vms.get(&id)?;
            let confirm =
                vm.running.is_none() || (vm.running == Some(false) && wanted.running.contains(&id));
            Some((id, vm.node.clone(), confirm))
        })
        .collect();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (vmid, node, confirm) in targets {
        let client = client.clone();
        let semaphore = semaphore.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await.expect("open semaphore");
            let config = client.vm_config(&node, vmid.get(), false).await?;
            let running = if confirm {
                Some(client.vm_status(&node, vmid.get()).await?.is_running())
            } else {
                None
            };
            Ok::<_, ApiError>((vmid, config, running))
        });
    }
    let mut listings = tokio::task::JoinSet::new();
    let mut listed = BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        let (vmid, config, running) = joined.expect("config reads do not panic")?;
        let Some(vm) = vms.get_mut(&vmid) else {
            continue;
        };
        vm.config = Some(config.into());
        if running.is_some() {
            vm.running = running;
        }
        if let Some(place) = disk_place(vm).filter(|p| storages.contains_key(p))
            && listed.insert(place.clone())
        {
            let client = client.clone();
            listings.spawn(async move {
                let vols = client
                    .storage_content(&place.0, &place.1, Some("images"), None)
                    .await?;
                Ok::<_, ApiError>((place, vols))
            });
        }
    }
    let mut disks = Vec::new();
    while let Some(joined) = listings.join_next().await {
        disks.push(joined.expect("disk listings do not panic")?);
    }
    Ok(disks)
}

/// The (node, storage) of a VM's root disk, for a VM that is not a
/// template.
fn disk_place(vm: &LiveVm) -> Option<(String, String)> {
    let storage = vm.disk_volid()?.split(':').next()?;
    (!vm.template).then(|| (vm.node.to_string(), storage.to_owned()))
}

/// Whether a managed VM is a linked clone shows only in its storage's
/// content (the volume's `parent`), from one disk listing per (node,
/// storage) holding a managed VM's disk.
fn add_disk_listings(live: &mut LiveState, listings: Vec<DiskListing>) {
    for (place, vols) in listings {
        let shows_parent = live.storages[&place].shows_clone_parent();
        for v in vols {
            if !shows_parent {
                live.clone_mode_unknown.insert(v.volid);
            } else if v.parent.is_some() {
                live.linked_disks.insert(v.volid);
            }
        }
    }
}

/// VMs of the cluster with their configs: every VM, or those of `only`
/// (for `import` and `init --from-cluster`, which look at VMs nixgold does
/// not manage yet).
pub async fn read_with_configs(
    client: &Client,
    only: Option<&BTreeSet<u32>>,
) -> Result<BTreeMap<u32, LiveVm>, ApiError> {
    let mut live = LiveState::default();
    add_vms(&mut live, client.cluster_resources(Some("vm")).await?);
    let mut vms: BTreeMap<u32, LiveVm> = live
        .vms
        .into_iter()
        .map(|(id, vm)| (id.get(), vm))
        .filter(|(id, _)| only.is_none_or(|only| only.contains(id)))
        .collect();
    for vm in vms.values_mut() {
        vm.config = Some(
            client
                .vm_config(&vm.node, vm.vmid.get(), false)
                .await?
                .into(),
        );
    }
    Ok(vms)
}
