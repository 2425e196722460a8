//! The simulated cluster's state and what each API call does to it.
//!
//! Time is real (wall-clock milliseconds) and tasks are lazy: a task has a
//! begin and an end time, and [`State::advance`] applies the effects of
//! every task whose end has passed, in end order, before a request is
//! served. That makes the state serialisable (so `--state FILE` survives
//! restarts) and tasks deterministic. Failures happen where Proxmox has
//! them: synchronous checks return an [`ApiError`]; checks inside a worker
//! end the task with `TASK ERROR: …`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cluster::{ClusterSpec, StorageSpec};
use crate::config::{
    PropertyString, VmConfig, canonical_drive, canonical_net, format_size, is_drive_key,
    is_net_key, normalise_tags, parse_size,
};
use crate::options::SimOptions;

/// An error the API returns: the status, the message (reason phrase and
/// `message`), and the per-parameter `errors` of a 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub errors: BTreeMap<String, String>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            errors: BTreeMap::new(),
        }
    }

    /// A runtime refusal ("die" in a handler): 500.
    pub fn fail(message: impl Into<String>) -> Self {
        ApiError::new(500, message)
    }

    pub fn params(errors: BTreeMap<String, String>) -> Self {
        ApiError {
            status: 400,
            message: "Parameter verification failed.".to_owned(),
            errors,
        }
    }

    pub fn param(name: &str, reason: impl Into<String>) -> Self {
        ApiError::params(BTreeMap::from([(name.to_owned(), reason.into())]))
    }
}

pub type ApiResult = Result<Value, ApiError>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    pub node: String,
    pub config: VmConfig,
    #[serde(default)]
    pub running: bool,
    /// When `running` last changed and what it was before: the
    /// `/cluster/resources` status comes from pvestatd's RRD broadcast, so it
    /// shows the old state for a while (`extract_vm_stats` in pve-manager's
    /// `PVE/API2Tools.pm` reads `status` from the RRD entry).
    #[serde(default)]
    pub status_changed_ms: u64,
    #[serde(default)]
    pub was_running: bool,
    /// When the VM started (ms), for uptime and the guest agent.
    #[serde(default)]
    pub started_ms: u64,
    /// When the config first existed; `/cluster/resources` lags behind it.
    #[serde(default)]
    pub created_ms: u64,
    /// Keys typed on the console, not yet read by the guest (`sendkey`).
    #[serde(default)]
    pub console: Vec<String>,
    /// The NixOS system on the VM's disk, once a guest installed one.
    #[serde(default)]
    pub installed: Option<crate::guest::Installed>,
}

impl Vm {
    /// The config a worker writes first: only `lock: <lock>`.
    pub fn placeholder(node: &str, lock: &str) -> Self {
        let mut config = VmConfig::default();
        config.values.insert("lock".into(), lock.into());
        Vm {
            node: node.to_owned(),
            config,
            running: false,
            status_changed_ms: 0,
            was_running: false,
            started_ms: 0,
            created_ms: now_ms(),
            console: Vec::new(),
            installed: None,
        }
    }

    /// Starts or stops it, remembering the old state for the lagging
    /// cluster-wide status.
    pub fn set_running(&mut self, running: bool) {
        if self.running != running {
            self.was_running = self.running;
            self.status_changed_ms = now_ms();
            self.running = running;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    pub storage: String,
    /// `None` on shared storage.
    pub node: Option<String>,
    pub volid: String,
    /// The virtual size.
    pub size: u64,
    /// What was really written: what a thin storage has allocated.
    #[serde(default)]
    pub written: u64,
    pub format: String,
    pub content: String,
    pub vmid: Option<u32>,
    pub parent: Option<String>,
    pub ctime: u64,
    /// sha256 of a downloaded file.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Where a downloaded file came from: what it is (an installer ISO's
    /// release), whatever name it was stored under.
    #[serde(default)]
    pub source_url: Option<String>,
}

/// A volume [`State::alloc_disk`] makes.
enum NewVolume {
    /// A disk of `size` bytes, `written` of them with data (a full copy).
    Disk {
        size: u64,
        written: u64,
    },
    CloudInit,
    /// A copy-on-write clone of the base volume `base`.
    Linked {
        base: String,
        size: u64,
    },
}

/// What a worker does when its task ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "work", rename_all = "snake_case")]
pub enum Work {
    Create {
        vmid: u32,
        values: BTreeMap<String, String>,
        start: bool,
    },
    Clone {
        source: u32,
        newid: u32,
        target: String,
        full: bool,
        storage: Option<String>,
        name: String,
        description: Option<String>,
    },
    Start {
        vmid: u32,
    },
    Stop {
        vmid: u32,
    },
    /// `qm reboot`: a shutdown and a start in one task.
    Reboot {
        vmid: u32,
    },
    Snapshot {
        vmid: u32,
        name: String,
        description: String,
        vmstate: bool,
    },
    DeleteSnapshot {
        vmid: u32,
        name: String,
    },
    Rollback {
        vmid: u32,
        name: String,
        start: bool,
    },
    Destroy {
        vmid: u32,
        unreferenced: bool,
    },
    Template {
        vmid: u32,
    },
    Resize {
        vmid: u32,
        disk: String,
        size: String,
        digest: Option<String>,
    },
    Config {
        vmid: u32,
        set: BTreeMap<String, String>,
        delete: Vec<String>,
        force: bool,
    },
    Download {
        storage: String,
        node: String,
        filename: String,
        url: String,
        checksum: Option<(String, String)>,
    },
    /// Fails with this message (lock timeouts decided at start, injected
    /// faults).
    Fail {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Task {
    pub upid: String,
    pub node: String,
    pub pid: u32,
    pub pstart: u32,
    pub starttime: u64,
    pub kind: String,
    pub id: String,
    /// The authenticated id (`user@realm!token` for tokens).
    pub user: String,
    pub ends_ms: Option<u64>,
    pub log: Vec<String>,
    pub work: Work,
    pub exitstatus: Option<String>,
    /// VMs whose config lock the worker holds exclusively while it runs.
    pub holds: Vec<u32>,
    /// VMs it holds with a shared lock (a clone's source): other shared
    /// holders may run, exclusive ones wait.
    #[serde(default)]
    pub shared: Vec<u32>,
    /// The storage (`storage@node` or `storage`) whose bandwidth a full
    /// clone's copy uses while it runs. Not a lock: pve-storage takes
    /// `cluster_lock_storage` only around `alloc_image` (`vdisk_alloc` in
    /// `PVE/Storage.pm`), and qemu-server's `clone_disk` copies after that.
    pub holds_storage: Option<String>,
    /// An injected failure: the worker ends with this error, no effect.
    #[serde(default)]
    pub injected: Option<String>,
    /// When the worker starts its work (after waiting for locks), in ms.
    #[serde(default)]
    pub begins_ms: u64,
}

/// A fault injected into the task a request starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskFault {
    Fail(String),
    Hang,
}

/// Everything [`State::spawn`] needs to start a worker.
#[derive(Debug, Clone)]
pub struct Spawn {
    pub node: String,
    /// Task type: `qmclone`, `qmstart`, `download`, …
    pub kind: String,
    /// The UPID's id field: the VMID (the *source* for clones), a file name.
    pub id: String,
    pub user: String,
    pub work: Work,
    /// VMs whose config lock the worker takes exclusively.
    pub holds: Vec<u32>,
    /// VMs whose config lock it takes shared.
    pub shared: Vec<u32>,
    pub holds_storage: Option<String>,
    /// How long the worker waits for its locks before "got timeout".
    pub lock_wait: std::time::Duration,
    pub fault: Option<TaskFault>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub spec: ClusterSpec,
    pub vms: BTreeMap<u32, Vm>,
    /// Keyed by `location|volid`, location = node, or `*` for shared storage.
    pub volumes: BTreeMap<String, Volume>,
    pub tasks: BTreeMap<String, Task>,
    pub next_pid: u32,
    pub mac_counter: u64,
    /// Node boot time in seconds (pstart base and uptime).
    pub boot_time: u64,
    /// Users, tokens, roles and ACLs (`user.cfg`).
    #[serde(default)]
    pub access: crate::access::AccessConfig,
    /// Resource pools by id (`user.cfg`'s `pool:` lines).
    #[serde(default)]
    pub pools: BTreeMap<String, crate::pools::Pool>,
    /// Something the guests follow changed since they last looked — a task
    /// ended, a write was served, a guest rebooted — so the sync after a
    /// request has work (see `guest::sync`). Not part of the cluster.
    #[serde(skip)]
    pub(crate) guests_stale: bool,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn missing_config(node: &str, vmid: u32) -> ApiError {
    ApiError::fail(format!(
        "Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"
    ))
}

pub fn lock_timeout_message(vmid: u32) -> String {
    format!("can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout")
}

impl State {
    pub fn new(spec: ClusterSpec) -> Self {
        let now = now_ms();
        let mut state = State {
            spec: spec.clone(),
            vms: BTreeMap::new(),
            volumes: BTreeMap::new(),
            tasks: BTreeMap::new(),
            next_pid: 0x1000,
            mac_counter: 0,
            boot_time: now / 1000 - 3600,
            access: crate::access::AccessConfig::default(),
            pools: BTreeMap::new(),
            guests_stale: true,
        };
        for vm in &spec.vms {
            let mut values = BTreeMap::new();
            for (k, v) in &vm.config {
                // Pre-existing VMs are written like a create would write them.
                if let Ok(v) = state.canonical_value(vm.vmid, &vm.node, k, v, &values) {
                    values.insert(k.clone(), v);
                }
            }
            add_generated_keys(&mut values);
            if vm.template {
                values.insert("template".into(), "1".into());
            }
            let mut config = VmConfig {
                values,
                ..Default::default()
            };
            if vm.template {
                rename_to_base(&mut state, vm.vmid, &vm.node, &mut config);
            }
            state.vms.insert(
                vm.vmid,
                Vm {
                    node: vm.node.clone(),
                    config,
                    running: vm.running && !vm.template,
                    status_changed_ms: 0,
                    was_running: false,
                    started_ms: now,
                    created_ms: 0,
                    console: Vec::new(),
                    installed: None,
                },
            );
        }
        state
    }

    // ----- lookups -------------------------------------------------------

    pub fn check_node(&self, node: &str) -> Result<(), ApiError> {
        if self.spec.node(node).is_some() {
            Ok(())
        } else {
            // pveproxy resolves the node named in the path to proxy the
            // call; the lookup fails in the handler: a plain 500.
            Err(ApiError::fail(format!(
                "hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known"
            )))
        }
    }

    /// The VM, if its config lives on `node` (Proxmox looks only there).
    pub fn vm_on(&self, node: &str, vmid: u32) -> Result<&Vm, ApiError> {
        self.vms
            .get(&vmid)
            .filter(|vm| vm.node == node)
            .ok_or_else(|| missing_config(node, vmid))
    }

    fn vm_on_mut(&mut self, node: &str, vmid: u32) -> Result<&mut Vm, ApiError> {
        self.vms
            .get_mut(&vmid)
            .filter(|vm| vm.node == node)
            .ok_or_else(|| missing_config(node, vmid))
    }

    fn storage(&self, id: &str) -> Result<&StorageSpec, ApiError> {
        self.spec
            .storage(id)
            .ok_or_else(|| ApiError::fail(format!("storage '{id}' does not exist")))
    }

    fn storage_on(&self, id: &str, node: &str) -> Result<&StorageSpec, ApiError> {
        let storage = self.storage(id)?;
        if storage.on_node(node) {
            Ok(storage)
        } else {
            Err(ApiError::fail(format!(
                "storage '{id}' is not available on node '{node}'"
            )))
        }
    }

    fn location(storage: &StorageSpec, node: &str) -> String {
        if storage.shared {
            "*".to_owned()
        } else {
            node.to_owned()
        }
    }

    fn volume(&self, storage: &StorageSpec, node: &str, volid: &str) -> Option<&Volume> {
        self.volumes
            .get(&format!("{}|{volid}", Self::location(storage, node)))
    }

    fn used_bytes(&self, storage: &StorageSpec, node: &str) -> u64 {
        let loc = Self::location(storage, node);
        self.volumes
            .iter()
            .filter(|(k, v)| v.storage == storage.id && k.starts_with(&format!("{loc}|")))
            .map(|(_, v)| {
                if storage.is_thin() || v.parent.is_some() {
                    v.written
                } else {
                    v.size
                }
            })
            .sum()
    }

    fn add_volume(&mut self, volume: Volume) {
        let loc = volume.node.clone().unwrap_or_else(|| "*".to_owned());
        self.volumes
            .insert(format!("{loc}|{}", volume.volid), volume);
    }

    fn remove_volume(&mut self, node: &str, volid: &str) -> Option<Volume> {
        let storage = volid.split(':').next()?;
        let storage = self.spec.storage(storage)?.clone();
        self.volumes
            .remove(&format!("{}|{volid}", Self::location(&storage, node)))
    }

    /// Allocates a new volume for `vmid` on `storage_id`: a blank disk
    /// (`vm-<vmid>-disk-N`), the one cloud-init image (`vm-<vmid>-cloudinit`,
    /// 4 MiB), or a linked clone of a base volume, named as each plugin
    /// names it (`clone_image` in pve-storage): ZFS and RBD put the base in
    /// the volume name (`base-9000-disk-0/vm-101-disk-0`), directories the
    /// base file (`9000/base-9000-disk-0.qcow2/101/vm-101-disk-0.qcow2`),
    /// LVM-thin only the new name. Files are `.qcow2`.
    fn alloc_disk(
        &mut self,
        vmid: u32,
        node: &str,
        storage_id: &str,
        new: NewVolume,
    ) -> Result<String, String> {
        let storage = self
            .storage_on(storage_id, node)
            .map_err(|e| e.message)?
            .clone();
        if !storage.has_content("images") {
            return Err(format!("storage '{storage_id}' does not support vm images"));
        }
        let file_based = storage.is_file_based();
        let file_name = |stem: &str| {
            if file_based {
                format!("{stem}.qcow2")
            } else {
                stem.to_owned()
            }
        };
        let taken = |state: &Self, name: &str| {
            state.volumes_on(&storage, node).any(|v| {
                v.volid
                    .rsplit(['/', ':'])
                    .next()
                    .is_some_and(|last| last == name)
            })
        };
        let stem = match new {
            NewVolume::CloudInit => format!("vm-{vmid}-cloudinit"),
            _ => (0..)
                .map(|n| format!("vm-{vmid}-disk-{n}"))
                .find(|stem| !taken(self, &file_name(stem)))
                .expect("an unused disk name exists"),
        };
        let name = file_name(&stem);
        let (size, written, base) = match &new {
            NewVolume::Disk { size, written } => (*size, *written, None),
            NewVolume::CloudInit => (4 << 20, 4 << 20, None),
            NewVolume::Linked { base, size } => (*size, 0, Some(base.clone())),
        };
        self.check_space(&storage, node, &name, size, written, base.is_some())?;
        let volname = match &base {
            Some(base) => {
                let base_name = base.split_once(':').map_or(base.as_str(), |(_, n)| n);
                match storage.plugin.as_str() {
                    "zfspool" | "rbd" => format!("{base_name}/{name}"),
                    _ if file_based => format!("{base_name}/{vmid}/{name}"),
                    _ => name.clone(),
                }
            }
            None if file_based => format!("{vmid}/{name}"),
            None => name.clone(),
        };
        let volid = format!("{storage_id}:{volname}");
        self.add_volume(Volume {
            storage: storage_id.to_owned(),
            node: (!storage.shared).then(|| node.to_owned()),
            volid: volid.clone(),
            size,
            written,
            format: if file_based { "qcow2" } else { "raw" }.to_owned(),
            content: "images".to_owned(),
            vmid: Some(vmid),
            parent: base,
            ctime: now_ms() / 1000,
            sha256: None,
            source_url: None,
        });
        Ok(volid)
    }

    /// Whether `storage` can take a new volume, refused with the storage
    /// tool's own error. Thick storage reserves the whole size: LVM
    /// (`LVMPlugin.pm` `alloc_image`: "not enough free space", free bytes
    /// against the size in KiB as the source prints them) and non-sparse
    /// ZFS (`zfs create -V` reserves it). Thin storage (LVM-thin, sparse
    /// ZFS, RBD, files) over-commits and fails only when what was really
    /// written fills it.
    fn check_space(
        &self,
        storage: &StorageSpec,
        node: &str,
        name: &str,
        size: u64,
        written: u64,
        linked: bool,
    ) -> Result<(), String> {
        let used = self.used_bytes(storage, node);
        let free = storage.capacity.saturating_sub(used);
        let needs = if storage.is_thin() || linked {
            written
        } else {
            size
        };
        if needs <= free && (needs > 0 || used < storage.capacity) {
            return Ok(());
        }
        Err(match storage.plugin.as_str() {
            "lvm" => format!("not enough free space ({free} < {})", size >> 10),
            "zfspool" => format!(
                "zfs error: cannot create '{}/{name}': out of space",
                storage.id
            ),
            "lvmthin" => format!(
                "lvcreate '{}/{name}' error:   Cannot create new thin volume, free space in thin pool {}/data reached threshold.",
                storage.id, storage.id
            ),
            "rbd" => format!("rbd create '{name}' error: (28) No space left on device"),
            _ => format!(
                "unable to create image: qemu-img: {name}: Could not create '{name}': No space left on device"
            ),
        })
    }

    fn new_mac(&mut self) -> String {
        self.mac_counter += 1;
        let n = self.mac_counter.wrapping_mul(0x9E37_79B9) & 0xFF_FFFF;
        format!(
            "BC:24:11:{:02X}:{:02X}:{:02X}",
            (n >> 16) & 0xFF,
            (n >> 8) & 0xFF,
            n & 0xFF
        )
    }

    /// Canonical stored value for a config key being written; allocates
    /// disks for `STORAGE:SIZE` and `STORAGE:cloudinit`.
    fn canonical_value(
        &mut self,
        vmid: u32,
        node: &str,
        key: &str,
        value: &str,
        existing: &BTreeMap<String, String>,
    ) -> Result<String, String> {
        if is_net_key(key) {
            // Without a MAC, Proxmox generates a new one on every write.
            return canonical_net(value, || self.new_mac());
        }
        if key == "tags" {
            return Ok(normalise_tags(value));
        }
        if !is_drive_key(key) {
            return Ok(value.to_owned());
        }
        let mut ps = PropertyString::parse(value, "file")?;
        let file = ps
            .head
            .clone()
            .ok_or("property is missing and it is not optional (file)")?;
        if let Some((storage, rest)) = file.split_once(':') {
            if rest == "cloudinit" {
                if let Some((k, _)) = existing
                    .iter()
                    .find(|(k, v)| *k != key && v.contains("cloudinit") && is_drive_key(k))
                {
                    return Err(format!(
                        "{file} - cloud-init drive is already attached at '{k}'"
                    ));
                }
                let volid = self.alloc_disk(vmid, node, storage, NewVolume::CloudInit)?;
                ps.head = Some(volid);
                ps.pairs.insert("media".into(), "cdrom".into());
            } else if rest.bytes().all(|b| b.is_ascii_digit() || b == b'.') && !rest.is_empty() {
                let gib: f64 = rest.parse().map_err(|_| format!("invalid size '{rest}'"))?;
                let size = (gib * (1u64 << 30) as f64) as u64;
                let volid =
                    self.alloc_disk(vmid, node, storage, NewVolume::Disk { size, written: 0 })?;
                ps.head = Some(volid);
                ps.pairs.insert("size".into(), format_size(size));
            } else if rest.starts_with("iso/") {
                let spec = self
                    .storage_on(storage, node)
                    .map_err(|e| e.message)?
                    .clone();
                let iso = self
                    .volume(&spec, node, &file)
                    .ok_or_else(|| format!("volume '{file}' does not exist"))?;
                ps.pairs.insert("size".into(), format_size(iso.size));
                ps.pairs
                    .entry("media".into())
                    .or_insert_with(|| "cdrom".into());
            }
        } else if file != "none" && file != "cdrom" {
            return Err(format!("unable to parse volume ID '{file}'"));
        }
        canonical_drive(&ps)
    }

    // ----- tasks ---------------------------------------------------------

    /// When an exclusive locker of `vmid` can have its config lock: after
    /// every running task holding it, shared or not.
    pub fn vm_busy_until(&self, vmid: u32) -> Option<u64> {
        self.tasks
            .values()
            .filter(|t| {
                t.exitstatus.is_none() && (t.holds.contains(&vmid) || t.shared.contains(&vmid))
            })
            .map(|t| t.ends_ms.unwrap_or(u64::MAX))
            .max()
    }

    /// When a shared locker of `vmid` can have it: after exclusive holders.
    fn vm_exclusive_until(&self, vmid: u32) -> Option<u64> {
        self.tasks
            .values()
            .filter(|t| t.exitstatus.is_none() && t.holds.contains(&vmid))
            .map(|t| t.ends_ms.unwrap_or(u64::MAX))
            .max()
    }

    fn storage_busy_until(&self, key: &str) -> Option<u64> {
        self.tasks
            .values()
            .filter(|t| t.exitstatus.is_none() && t.holds_storage.as_deref() == Some(key))
            .map(|t| t.ends_ms.unwrap_or(u64::MAX))
            .max()
    }

    /// Starts a worker task; returns its UPID.
    pub fn spawn(&mut self, opts: &SimOptions, spawn: Spawn) -> String {
        let Spawn {
            node,
            kind,
            id,
            user,
            work,
            holds,
            shared,
            holds_storage,
            lock_wait,
            fault,
        } = spawn;
        let lock_wait_ms = lock_wait.as_millis() as u64;
        let now = now_ms();
        self.next_pid += 1;
        let pid = self.next_pid;
        let pstart = ((self.boot_time % 100_000) as u32) * 100 + (pid % 100);
        let starttime = now / 1000;
        let upid =
            format!("UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{kind}:{id}:{user}:");
        let mut begins = now;
        let mut work = work;
        // Wait for the VM locks held by other workers, or time out.
        let waits = holds
            .iter()
            .filter_map(|v| self.vm_busy_until(*v).map(|u| (*v, u)))
            .chain(
                shared
                    .iter()
                    .filter_map(|v| self.vm_exclusive_until(*v).map(|u| (*v, u))),
            );
        if let Some((vmid, until)) = waits.max_by_key(|(_, u)| *u)
            && until > now
        {
            if until - now > lock_wait_ms {
                begins = now + lock_wait_ms;
                work = Work::Fail {
                    message: lock_timeout_message(vmid),
                };
            } else {
                begins = until;
            }
        }
        // A full clone's copy shares the target storage's bandwidth with the
        // other copies: queued behind them (the same makespan as fair
        // sharing). It never waits for the storage *lock*, which Proxmox
        // holds only while allocating the volume.
        let holds_storage = holds_storage.filter(|_| !matches!(work, Work::Fail { .. }));
        if let Some(until) = holds_storage
            .as_deref()
            .and_then(|key| self.storage_busy_until(key))
        {
            begins = begins.max(until);
        }
        let duration = opts.task_duration(&kind).as_millis() as u64;
        let (ends_ms, injected) = match fault {
            Some(TaskFault::Hang) => (None, None),
            Some(TaskFault::Fail(message)) => (Some(begins + duration), Some(message)),
            None => (Some(begins + duration), None),
        };
        let task = Task {
            upid: upid.clone(),
            node,
            pid,
            pstart,
            starttime,
            kind,
            id,
            user,
            ends_ms,
            injected,
            log: Vec::new(),
            work,
            exitstatus: None,
            holds,
            shared,
            holds_storage,
            begins_ms: begins,
        };
        self.tasks.insert(upid.clone(), task);
        upid
    }

    /// Ends every task whose time has come, in end order.
    pub fn advance(&mut self, opts: &SimOptions) {
        let now = now_ms();
        self.log_downloads(opts, now);
        loop {
            let next = self
                .tasks
                .values()
                .filter(|t| t.exitstatus.is_none() && t.ends_ms.is_some_and(|e| e <= now))
                .min_by_key(|t| (t.ends_ms, t.pid))
                .map(|t| t.upid.clone());
            let Some(upid) = next else { break };
            self.finish(&upid, opts);
        }
    }

    fn finish(&mut self, upid: &str, opts: &SimOptions) {
        self.guests_stale = true;
        let Some(task) = self.tasks.get(upid).cloned() else {
            return;
        };
        let outcome = match task.injected.clone() {
            Some(message) => {
                self.undo(&task);
                Err(message)
            }
            None => self.complete(&task, opts),
        };
        let Some(t) = self.tasks.get_mut(upid) else {
            return;
        };
        match outcome {
            Ok(lines) => {
                // The whole log: a download's replaces its progress so far.
                t.log = lines;
                t.log.push("TASK OK".to_owned());
                t.exitstatus = Some("OK".to_owned());
            }
            Err(message) => {
                let message = if t.kind == "qmclone" && !message.starts_with("clone failed") {
                    format!("clone failed: {message}")
                } else {
                    message
                };
                t.log.push(format!("TASK ERROR: {message}"));
                t.exitstatus = Some(message);
            }
        }
    }

    /// Stops a running task (`DELETE …/tasks/{upid}`).
    pub fn stop_task(&mut self, upid: &str) {
        if let Some(task) = self.tasks.get(upid).cloned()
            && task.exitstatus.is_none()
        {
            self.undo(&task);
            if let Some(t) = self.tasks.get_mut(upid) {
                t.log.push("received interrupt".to_owned());
                t.log.push("TASK ERROR: interrupted by signal".to_owned());
                t.exitstatus = Some("interrupted by signal".to_owned());
            }
        }
    }

    /// Cleans up what a failed worker leaves behind (as Proxmox does).
    fn undo(&mut self, task: &Task) {
        match &task.work {
            Work::Clone { newid: vmid, .. } | Work::Create { vmid, .. }
                if self
                    .vms
                    .get(vmid)
                    .is_some_and(|vm| matches!(vm.config.lock(), Some("clone" | "create"))) =>
            {
                self.vms.remove(vmid);
                self.volumes.retain(|_, v| v.vmid != Some(*vmid));
            }
            _ => {}
        }
    }

    fn complete(&mut self, task: &Task, opts: &SimOptions) -> Result<Vec<String>, String> {
        let result = match task.work.clone() {
            Work::Fail { message } => Err(message),
            Work::Create {
                vmid,
                values,
                start,
            } => self.complete_create(&task.node, vmid, values, start),
            Work::Clone {
                source,
                newid,
                target,
                full,
                storage,
                name,
                description,
            } => self.complete_clone(
                &task.node,
                source,
                newid,
                &target,
                full,
                storage,
                name,
                description,
            ),
            Work::Start { vmid } => self.complete_start(&task.node, vmid),
            Work::Snapshot {
                vmid,
                name,
                description,
                vmstate,
            } => crate::snapshots::take(self, vmid, &name, &description, vmstate),
            Work::DeleteSnapshot { vmid, name } => crate::snapshots::delete(self, vmid, &name),
            Work::Rollback { vmid, name, start } => {
                let log = crate::snapshots::rollback(self, vmid, &name)?;
                if start {
                    return self.complete_start(&task.node, vmid);
                }
                Ok(log)
            }
            Work::Reboot { vmid } => {
                let vm = self
                    .vms
                    .get_mut(&vmid)
                    .ok_or_else(|| missing_config(&task.node, vmid).message)?;
                if !vm.running {
                    return Err(format!("VM {vmid} not running"));
                }
                vm.running = false;
                self.complete_start(&task.node, vmid)
            }
            Work::Stop { vmid } => {
                if let Some(vm) = self.vms.get_mut(&vmid) {
                    vm.set_running(false);
                    apply_pending(&mut vm.config);
                }
                Ok(vec![])
            }
            Work::Destroy { vmid, unreferenced } => {
                self.complete_destroy(&task.node, vmid, unreferenced)
            }
            Work::Template { vmid } => {
                let node = task.node.clone();
                let mut vm = self
                    .vms
                    .get(&vmid)
                    .cloned()
                    .ok_or_else(|| missing_config(&node, vmid).message)?;
                if let Some(lock) = vm.config.lock() {
                    return Err(format!("VM is locked ({lock})"));
                }
                rename_to_base(self, vmid, &node, &mut vm.config);
                vm.config.values.insert("template".into(), "1".into());
                self.vms.insert(vmid, vm);
                Ok(vec![])
            }
            Work::Resize {
                vmid,
                disk,
                size,
                digest,
            } => self.complete_resize(&task.node, vmid, &disk, &size, digest),
            Work::Config {
                vmid,
                set,
                delete,
                force,
            } => {
                let node = task.node.clone();
                let vm = self.vm_on(&node, vmid).map_err(|e| e.message)?;
                if let Some(lock) = vm.config.lock() {
                    return Err(format!("VM is locked ({lock})"));
                }
                self.apply_config(&node, vmid, &set, &delete, force)
                    .map_err(|e| e.message)?;
                Ok(vec![])
            }
            Work::Download {
                storage,
                node,
                filename,
                url,
                checksum,
            } => {
                let wget = |size| {
                    let elapsed = task.ends_ms.unwrap_or_else(now_ms) - task.begins_ms;
                    crate::wget::log(&url, &iso_path(&filename), task.pid, size, size, elapsed)
                };
                self.complete_download(&storage, &node, &filename, &url, checksum, opts)
                    .map(|size| match size {
                        Some(size) => [
                            wget(size),
                            vec![
                                "calculating checksum...OK, checksum verified".to_owned(),
                                format!(
                                    "download of '{url}' to '{}' finished",
                                    iso_path(&filename)
                                ),
                            ],
                        ]
                        .concat(),
                        None => {
                            vec!["OK, got correct file already, no need to download".to_owned()]
                        }
                    })
            }
        };
        if result.is_err() {
            self.undo(task);
        }
        result
    }

    fn complete_create(
        &mut self,
        node: &str,
        vmid: u32,
        values: BTreeMap<String, String>,
        start: bool,
    ) -> Result<Vec<String>, String> {
        let mut stored = BTreeMap::new();
        for (k, v) in &values {
            let v = self.canonical_value(vmid, node, k, v, &stored)?;
            stored.insert(k.clone(), v);
        }
        add_generated_keys(&mut stored);
        let vm = self.vms.get_mut(&vmid).ok_or("VM vanished during create")?;
        vm.config.values = stored;
        if start {
            return self.complete_start(node, vmid);
        }
        Ok(vec![])
    }

    #[allow(clippy::too_many_arguments)]
    fn complete_clone(
        &mut self,
        node: &str,
        source: u32,
        newid: u32,
        target: &str,
        full: bool,
        storage: Option<String>,
        name: String,
        description: Option<String>,
    ) -> Result<Vec<String>, String> {
        let src = self
            .vms
            .get(&source)
            .cloned()
            .ok_or_else(|| missing_config(node, source).message)?;
        let mut values = BTreeMap::new();
        let mut log = vec![format!(
            "create {} clone of drive(s)",
            if full { "full" } else { "linked" }
        )];
        for (k, v) in &src.config.values {
            if matches!(
                k.as_str(),
                "template"
                    | "lock"
                    | "parent"
                    | "vmstate"
                    | "snaptime"
                    | "runningcpu"
                    | "runningmachine"
            ) || k.starts_with("unused")
            {
                continue;
            }
            if is_net_key(k) {
                let model = v
                    .split(',')
                    .next()
                    .and_then(|h| h.split('=').next())
                    .unwrap_or("virtio")
                    .to_owned();
                let rest: Vec<&str> = v.split(',').skip(1).collect();
                let mac = self.new_mac();
                let mut nv = format!("{model}={mac}");
                for r in rest {
                    nv.push(',');
                    nv.push_str(r);
                }
                values.insert(k.clone(), nv);
                continue;
            }
            if is_drive_key(k) {
                let mut ps = PropertyString::parse(v, "file").map_err(|e| e.to_string())?;
                let file = ps.head.clone().unwrap_or_default();
                let is_cdrom = ps.pairs.get("media").is_some_and(|m| m == "cdrom");
                let is_cloudinit = file.contains("cloudinit");
                if (is_cdrom && !is_cloudinit) || file == "none" {
                    values.insert(k.clone(), v.clone());
                    continue;
                }
                let (src_storage, _) = file.split_once(':').ok_or("bad volume id")?;
                let size = ps
                    .pairs
                    .get("size")
                    .and_then(|s| parse_size(s))
                    .unwrap_or(4 << 20);
                let target_storage = storage.clone().unwrap_or_else(|| src_storage.to_owned());
                let volid = if is_cloudinit {
                    // The cloud-init drive is always copied in full.
                    self.alloc_disk(newid, target, &target_storage, NewVolume::CloudInit)?
                } else if full {
                    log.push(format!(
                        "drive {k}: transferred {} of {}",
                        format_size(size),
                        format_size(size)
                    ));
                    let written = self
                        .volumes
                        .values()
                        .find(|v| v.volid == file)
                        .map_or(0, |v| v.written);
                    let copy = NewVolume::Disk { size, written };
                    self.alloc_disk(newid, target, &target_storage, copy)?
                } else {
                    let base = file.clone();
                    self.alloc_disk(newid, target, src_storage, NewVolume::Linked { base, size })?
                };
                ps.head = Some(volid);
                values.insert(k.clone(), canonical_drive(&ps)?);
                continue;
            }
            values.insert(k.clone(), v.clone());
        }
        values.insert("name".into(), name);
        if let Some(d) = description {
            values.insert("description".into(), d);
        }
        // A clone always gets a new SMBIOS uuid (other smbios1 fields stay)
        // and a new vmgenid when the source had one (`clone_vm`).
        let mut smbios = values
            .get("smbios1")
            .and_then(|v| PropertyString::parse(v, "uuid").ok())
            .unwrap_or(PropertyString {
                head: None,
                pairs: BTreeMap::new(),
            });
        smbios.head = None;
        smbios.pairs.insert("uuid".into(), new_uuid());
        values.insert("smbios1".into(), smbios.render());
        if values.contains_key("vmgenid") {
            values.insert("vmgenid".into(), new_uuid());
        }
        let vm = self.vms.get_mut(&newid).ok_or("clone target vanished")?;
        vm.config.values = values;
        vm.node = target.to_owned();
        // The installed system lives on the disk the clone copies (or, for
        // a linked clone, reads through its base).
        vm.installed = src.installed;
        Ok(log)
    }

    fn complete_start(&mut self, node: &str, vmid: u32) -> Result<Vec<String>, String> {
        let vm = self
            .vms
            .get_mut(&vmid)
            .ok_or_else(|| missing_config(node, vmid).message)?;
        if vm.config.is_template() {
            return Err("you can't start a vm if it's a template".to_owned());
        }
        if vm.running {
            return Err(format!("VM {vmid} already running"));
        }
        if let Some(lock) = vm.config.lock() {
            return Err(format!("VM is locked ({lock})"));
        }
        // A cold start applies pending changes, then regenerates cloud-init.
        apply_pending(&mut vm.config);
        regenerate_cloudinit(&mut vm.config);
        vm.set_running(true);
        vm.started_ms = now_ms();
        vm.console.clear();
        Ok(vec![])
    }

    fn complete_destroy(
        &mut self,
        node: &str,
        vmid: u32,
        unreferenced: bool,
    ) -> Result<Vec<String>, String> {
        let vm = self
            .vms
            .get(&vmid)
            .cloned()
            .ok_or_else(|| missing_config(node, vmid).message)?;
        if let Some(lock) = vm.config.lock() {
            return Err(format!("VM is locked ({lock})"));
        }
        if vm.running {
            return Err(format!("VM {vmid} is running - destroy failed"));
        }
        let referenced: Vec<String> = vm
            .config
            .drives()
            .filter_map(|(_, v)| v.split(',').next().map(str::to_owned))
            .filter(|f| f.contains(':') && !f.contains(":iso/"))
            .collect();
        for volid in &referenced {
            if let Some(child) = self
                .volumes
                .values()
                .find(|v| v.parent.as_deref() == Some(volid))
            {
                let _ = child;
                return Err(format!(
                    "base volume '{volid}' is still in use by linked cloned"
                ));
            }
        }
        let mut log = Vec::new();
        for volid in &referenced {
            if self.remove_volume(node, volid).is_some() {
                log.push(format!("Removing image: 100% complete...done. ({volid})"));
            }
        }
        if unreferenced {
            self.volumes
                .retain(|_, v| v.vmid != Some(vmid) || v.content != "images");
        }
        self.vms.remove(&vmid);
        Ok(log)
    }

    fn complete_resize(
        &mut self,
        node: &str,
        vmid: u32,
        disk: &str,
        size: &str,
        digest: Option<String>,
    ) -> Result<Vec<String>, String> {
        let vm = self
            .vms
            .get(&vmid)
            .cloned()
            .ok_or_else(|| missing_config(node, vmid).message)?;
        if let Some(d) = digest
            && d != vm.config.digest()
        {
            return Err("checksum mismatch (file change by other user?)".to_owned());
        }
        if let Some(lock) = vm.config.lock() {
            return Err(format!("VM is locked ({lock})"));
        }
        let value = vm
            .config
            .get(disk)
            .ok_or(format!("disk '{disk}' does not exist"))?;
        let mut ps = PropertyString::parse(value, "file")?;
        if ps.pairs.get("media").is_some_and(|m| m == "cdrom") {
            return Err("you can't resize a cdrom".to_owned());
        }
        let current = ps
            .pairs
            .get("size")
            .and_then(|s| parse_size(s))
            .unwrap_or(0);
        let (relative, amount) = match size.strip_prefix('+') {
            Some(rest) => (true, rest),
            None => (false, size),
        };
        let amount = parse_size(amount).ok_or(format!("invalid size '{size}'"))?;
        let new_size = if relative { current + amount } else { amount };
        if new_size < current {
            return Err("shrinking disks is not supported".to_owned());
        }
        if new_size == current {
            return Ok(vec![]);
        }
        let volid = ps.head.clone().unwrap_or_default();
        let storage = volid.split(':').next().unwrap_or_default().to_owned();
        let spec = self.storage(&storage).map_err(|e| e.message)?.clone();
        let key = format!("{}|{volid}", Self::location(&spec, node));
        let linked = self.volumes.get(&key).is_some_and(|v| v.parent.is_some());
        // Thick volumes reserve what they grow by; thin ones over-commit
        // (`volume_resize` in pve-storage: `lvextend` and `zfs set volsize`).
        let free = spec.capacity.saturating_sub(self.used_bytes(&spec, node));
        if !spec.is_thin() && !linked && new_size - current > free {
            let name = volid.rsplit(['/', ':']).next().unwrap_or_default();
            return Err(match spec.plugin.as_str() {
                "zfspool" => format!(
                    "zfs error: cannot set property for '{storage}/{name}': size is greater than available space"
                ),
                _ => format!(
                    "error resizing volume '/dev/{storage}/{name}': Insufficient free space: {} extents needed, but only {} available",
                    (new_size - current) >> 22,
                    free >> 22
                ),
            });
        }
        if let Some(vol) = self.volumes.get_mut(&key) {
            vol.size = new_size;
        }
        ps.pairs.insert("size".into(), format_size(new_size));
        let new_value = canonical_drive(&ps)?;
        if let Some(vm) = self.vms.get_mut(&vmid) {
            vm.config.values.insert(disk.to_owned(), new_value);
        }
        Ok(vec![format!("Image resized to {}", format_size(new_size))])
    }

    /// Running downloads log wget's progress as the file arrives (at the
    /// rate that ends the transfer when the task does).
    fn log_downloads(&mut self, opts: &SimOptions, now: u64) {
        let running = self.tasks.values().filter_map(|t| match &t.work {
            Work::Download {
                storage,
                node,
                filename,
                url,
                ..
            } if t.exitstatus.is_none() && t.injected.is_none() => {
                let ends = t.ends_ms?;
                let spec = self.storage(storage).ok()?;
                let exists = self
                    .volume(spec, node, &format!("{storage}:iso/{filename}"))
                    .is_some();
                let size = opts.remote_file(url).filter(|_| !exists)?.size;
                let elapsed = now.saturating_sub(t.begins_ms);
                let done = size * elapsed.min(ends - t.begins_ms) / (ends - t.begins_ms).max(1);
                let log = crate::wget::log(
                    url,
                    &iso_path(filename),
                    t.pid,
                    size,
                    done.min(size - 1),
                    elapsed,
                );
                Some((t.upid.clone(), log))
            }
            _ => None,
        });
        let logs: Vec<(String, Vec<String>)> = running.collect();
        for (upid, log) in logs {
            if let Some(t) = self.tasks.get_mut(&upid) {
                t.log = log;
            }
        }
    }

    /// Downloads a fetched file of the node's storage: Some(size), or None
    /// when the file is there with the expected checksum already.
    fn complete_download(
        &mut self,
        storage: &str,
        node: &str,
        filename: &str,
        url: &str,
        checksum: Option<(String, String)>,
        opts: &SimOptions,
    ) -> Result<Option<u64>, String> {
        let spec = self.storage(storage).map_err(|e| e.message)?.clone();
        let volid = format!("{storage}:iso/{filename}");
        let path = iso_path(filename);
        if let Some(existing) = self.volume(&spec, node, &volid) {
            return match &checksum {
                Some((_, expected)) if existing.sha256.as_deref() == Some(expected.as_str()) => {
                    Ok(None)
                }
                Some((_, expected)) => Err(format!(
                    "checksum mismatch: got '{}' != expect '{expected}', aborting",
                    existing.sha256.clone().unwrap_or_default()
                )),
                None => Err(format!("refusing to override existing file '{path}'")),
            };
        }
        let remote = opts
            .remote_file(url)
            .ok_or_else(|| format!("download failed: 404 Not Found ({url})"))?;
        if let Some((algorithm, expected)) = &checksum {
            if algorithm != "sha256" {
                return Err(format!(
                    "checksum algorithm '{algorithm}' is not simulated (use sha256)"
                ));
            }
            if expected != &remote.sha256 {
                return Err(format!(
                    "checksum mismatch: got '{}' != expect '{expected}', aborting",
                    remote.sha256
                ));
            }
        }
        // A download writes every byte, thin storage or not.
        let free = spec.capacity.saturating_sub(self.used_bytes(&spec, node));
        if remote.size > free {
            return Err(format!(
                "download failed: write error: Cannot write to '{path}' (No space left on device)"
            ));
        }
        self.add_volume(Volume {
            storage: storage.to_owned(),
            node: (!spec.shared).then(|| node.to_owned()),
            volid,
            size: remote.size,
            written: remote.size,
            format: "iso".to_owned(),
            content: "iso".to_owned(),
            vmid: None,
            parent: None,
            ctime: now_ms() / 1000,
            sha256: Some(remote.sha256.clone()),
            source_url: Some(url.to_owned()),
        });
        Ok(Some(remote.size))
    }

    // ----- config writes -------------------------------------------------

    /// Applies a config change: at once when stopped, hot-pluggable keys at
    /// once and the rest pending when running. Validates every value first
    /// so a bad request changes nothing.
    pub fn apply_config(
        &mut self,
        node: &str,
        vmid: u32,
        set: &BTreeMap<String, String>,
        delete: &[String],
        force: bool,
    ) -> Result<(), ApiError> {
        let vm = self.vm_on(node, vmid)?.clone();
        let running = vm.running;
        let mut values = vm.config.effective(false);
        check_boot_order(set, delete, &values)?;
        let mut errors = BTreeMap::new();
        let mut canonical = BTreeMap::new();
        for (k, v) in set {
            match self.canonical_value(vmid, node, k, v, &values) {
                Ok(c) => {
                    canonical.insert(k.clone(), c);
                }
                Err(e) => {
                    errors.insert(k.clone(), e);
                }
            }
        }
        if !errors.is_empty() {
            // Undo disk allocations of this failed request.
            for (k, v) in &canonical {
                if is_drive_key(k)
                    && values.get(k).is_none_or(|old| old != v)
                    && let Some(volid) = v.split(',').next()
                {
                    self.remove_volume(node, volid);
                }
            }
            return Err(ApiError::params(errors));
        }
        let mut config = vm.config.clone();
        for (k, v) in canonical {
            values.insert(k.clone(), v.clone());
            if running && !hotpluggable(&k) {
                config.pending_delete.remove(&k);
                // `cleanup_pending`: a value equal to the applied one is
                // not pending.
                if config.values.get(&k) == Some(&v) {
                    config.pending.remove(&k);
                } else {
                    config.pending.insert(k.clone(), v);
                }
            } else {
                if is_drive_key(&k)
                    && let Some(old) = config.values.get(&k).cloned()
                    && old != v
                {
                    move_to_unused(&mut config, old);
                }
                config.values.insert(k.clone(), v);
                config.pending.remove(&k);
            }
        }
        for k in delete {
            if running && !hotpluggable(k) {
                // `cleanup_pending` keeps only deletes of keys that exist.
                config.pending.remove(k);
                if config.values.contains_key(k) {
                    config.pending_delete.insert(k.clone());
                }
                continue;
            }
            if let Some(old) = config.values.remove(k) {
                if is_drive_key(k) {
                    if force {
                        if let Some(volid) = old.split(',').next() {
                            self.remove_volume(node, volid);
                        }
                    } else if !old.contains("media=cdrom") {
                        move_to_unused(&mut config, old);
                    } else if old.contains("cloudinit")
                        && let Some(volid) = old.split(',').next()
                    {
                        self.remove_volume(node, volid);
                    }
                }
                if let Some(boot) = config.values.get_mut("boot") {
                    *boot = drop_boot_device(boot, k);
                }
            }
            config.pending.remove(k);
        }
        if let Some(vm) = self.vms.get_mut(&vmid) {
            vm.config = config;
        }
        Ok(())
    }

    // ----- views ---------------------------------------------------------

    pub fn vm_resource(&self, vmid: u32, vm: &Vm, opts: &SimOptions) -> Value {
        let c = &vm.config;
        let lag = opts.resources_lag.as_millis() as u64;
        let fresh = now_ms().saturating_sub(vm.created_ms) < lag;
        let running = if now_ms().saturating_sub(vm.status_changed_ms) < lag {
            vm.was_running
        } else {
            vm.running
        };
        let mut entry = json!({
            "id": format!("qemu/{vmid}"),
            "vmid": vmid,
            "node": vm.node,
            "type": "qemu",
            "status": if fresh { "unknown" } else if running { "running" } else { "stopped" },
        });
        let obj = entry.as_object_mut().expect("object");
        if !fresh {
            obj.insert(
                "name".into(),
                json!(c.get("name").unwrap_or(&format!("VM {vmid}")).to_owned()),
            );
            obj.insert("template".into(), json!(u8::from(c.is_template())));
            let (cpus, mem, disk) = vm_sizes(c);
            obj.insert("maxcpu".into(), json!(cpus));
            obj.insert("cpu".into(), json!(if running { 0.0123 } else { 0.0 }));
            obj.insert("maxmem".into(), json!(mem));
            obj.insert("mem".into(), json!(if running { mem / 4 } else { 0 }));
            obj.insert("maxdisk".into(), json!(disk));
            obj.insert("disk".into(), json!(0));
            obj.insert("netin".into(), json!(0));
            obj.insert("netout".into(), json!(0));
            obj.insert("diskread".into(), json!(0));
            obj.insert("diskwrite".into(), json!(0));
            obj.insert("uptime".into(), json!(self.uptime(vm)));
        }
        if let Some(lock) = c.lock() {
            obj.insert("lock".into(), json!(lock));
        }
        if let Some(tags) = c.get("tags") {
            obj.insert("tags".into(), json!(tags));
        }
        entry
    }

    pub fn uptime(&self, vm: &Vm) -> u64 {
        if vm.running {
            now_ms().saturating_sub(vm.started_ms) / 1000
        } else {
            0
        }
    }

    pub fn storage_used(&self, storage: &StorageSpec, node: &str) -> u64 {
        self.used_bytes(storage, node)
    }

    pub fn volumes_on<'a>(
        &'a self,
        storage: &'a StorageSpec,
        node: &'a str,
    ) -> impl Iterator<Item = &'a Volume> + 'a {
        let prefix = format!("{}|", Self::location(storage, node));
        self.volumes
            .iter()
            .filter(move |(k, v)| v.storage == storage.id && k.starts_with(&prefix))
            .map(|(_, v)| v)
    }

    pub fn mark_created(&mut self, vmid: u32) {
        if let Some(vm) = self.vms.get_mut(&vmid) {
            vm.created_ms = now_ms();
        }
    }

    pub fn insert_vm(&mut self, vmid: u32, vm: Vm) {
        self.vms.insert(vmid, vm);
    }

    pub fn vm_mut(&mut self, node: &str, vmid: u32) -> Result<&mut Vm, ApiError> {
        self.vm_on_mut(node, vmid)
    }

    pub fn storage_spec_on(&self, id: &str, node: &str) -> Result<StorageSpec, ApiError> {
        self.storage_on(id, node).cloned()
    }

    pub fn storage_spec(&self, id: &str) -> Result<StorageSpec, ApiError> {
        self.storage(id).cloned()
    }

    pub fn has_volume(&self, storage: &StorageSpec, node: &str, volid: &str) -> bool {
        self.volume(storage, node, volid).is_some()
    }
}

/// Keys a running VM takes at once; everything else waits for a restart.
fn hotpluggable(key: &str) -> bool {
    matches!(
        key,
        "name"
            | "tags"
            | "description"
            | "onboot"
            | "protection"
            | "startup"
            | "ciuser"
            | "cipassword"
            | "citype"
            | "ciupgrade"
            | "cicustom"
            | "sshkeys"
            | "nameserver"
            | "searchdomain"
            | "hookscript"
            | "lock"
    ) || key.starts_with("ipconfig")
        || is_net_key(key)
        || (is_drive_key(key) && !key.starts_with("efidisk") && !key.starts_with("tpmstate"))
        || key.starts_with("unused")
}

fn move_to_unused(config: &mut VmConfig, old: String) {
    let volid = old.split(',').next().unwrap_or_default().to_owned();
    if volid.contains(":iso/") || volid == "none" || volid == "cdrom" {
        return;
    }
    let n = (0..)
        .find(|n| !config.values.contains_key(&format!("unused{n}")))
        .unwrap_or(0);
    config.values.insert(format!("unused{n}"), volid);
}

fn drop_boot_device(boot: &str, key: &str) -> String {
    match boot.strip_prefix("order=") {
        Some(order) => {
            let kept: Vec<&str> = order.split(';').filter(|d| *d != key).collect();
            format!("order={}", kept.join(";"))
        }
        None => boot.to_owned(),
    }
}

fn apply_pending(config: &mut VmConfig) {
    for k in std::mem::take(&mut config.pending_delete) {
        config.values.remove(&k);
    }
    let pending = std::mem::take(&mut config.pending);
    config.values.extend(pending);
}

/// The cloud-init keys the image is built from.
pub fn cloudinit_keys(values: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    values
        .iter()
        .filter(|(k, _)| {
            matches!(
                k.as_str(),
                "ciuser"
                    | "cipassword"
                    | "citype"
                    | "ciupgrade"
                    | "sshkeys"
                    | "nameserver"
                    | "searchdomain"
                    | "name"
            ) || k.starts_with("ipconfig")
                || is_net_key(k)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

pub fn regenerate_cloudinit(config: &mut VmConfig) {
    let has_drive = config.drives().any(|(_, v)| v.contains("cloudinit"));
    config.cloudinit = if has_drive {
        cloudinit_keys(&config.values)
    } else {
        BTreeMap::new()
    };
}

/// Renames a VM's disks to base volumes (`vm-N-disk-M` → `base-N-disk-M`).
fn rename_to_base(state: &mut State, vmid: u32, node: &str, config: &mut VmConfig) {
    let keys: Vec<String> = config.drives().map(|(k, _)| k.clone()).collect();
    for key in keys {
        let value = config.values[&key].clone();
        if value.contains("media=cdrom") {
            continue;
        }
        let Some(volid) = value.split(',').next().map(str::to_owned) else {
            continue;
        };
        let based = volid.replace(&format!("vm-{vmid}-disk"), &format!("base-{vmid}-disk"));
        if based == volid {
            continue;
        }
        if let Some(mut vol) = state.remove_volume(node, &volid) {
            vol.volid = based.clone();
            state.add_volume(vol);
        }
        config.values.insert(key, value.replacen(&volid, &based, 1));
    }
}

/// CPUs, memory bytes and root disk bytes of a config.
pub fn vm_sizes(c: &VmConfig) -> (u64, u64, u64) {
    let cores: u64 = c.get("cores").and_then(|v| v.parse().ok()).unwrap_or(1);
    let sockets: u64 = c.get("sockets").and_then(|v| v.parse().ok()).unwrap_or(1);
    let memory: u64 = c
        .get("memory")
        .and_then(|v| {
            v.trim_start_matches("current=")
                .split(',')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(512);
    let disk = c
        .drives()
        .filter(|(_, v)| !v.contains("media=cdrom"))
        .filter_map(|(_, v)| {
            PropertyString::parse(v, "file")
                .ok()?
                .pairs
                .get("size")
                .and_then(|s| parse_size(s))
        })
        .next()
        .unwrap_or(0);
    (cores * sockets, memory << 20, disk)
}

/// A random (version 4) UUID, as `PVE::QemuServer::generate_uuid` makes.
pub(crate) fn new_uuid() -> String {
    let n = (rand::random::<u128>() & !(0xF << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Where a directory storage keeps an ISO (what download-url logs).
fn iso_path(filename: &str) -> String {
    format!("/var/lib/vz/template/iso/{filename}")
}

/// The QEMU version `meta` records (`kvm_user_version` at create time).
pub const QEMU_VERSION: &str = "9.2.0";

/// The keys qemu-server's `create_vm` adds when the request has none
/// (`API2/Qemu.pm`): `meta` (creation QEMU and time), `smbios1` with a
/// random uuid, `vmgenid` (also replacing `1`), and `boot` naming the
/// first disk, the first CD-ROM and the first NIC
/// (`get_default_bootdevices`).
fn add_generated_keys(values: &mut BTreeMap<String, String>) {
    values.insert(
        "meta".into(),
        format!("creation-qemu={QEMU_VERSION},ctime={}", now_ms() / 1000),
    );
    values
        .entry("smbios1".into())
        .or_insert_with(|| format!("uuid={}", new_uuid()));
    if values.get("vmgenid").is_none_or(|v| v == "1") {
        values.insert("vmgenid".into(), new_uuid());
    }
    if !values.contains_key("boot") {
        let order = default_boot_devices(values);
        if !order.is_empty() {
            values.insert("boot".into(), format!("order={}", order.join(";")));
        }
    }
}

/// `get_default_bootdevices`: the first disk and the first CD-ROM in
/// ide, scsi, virtio, sata order, then the first NIC.
fn default_boot_devices(values: &BTreeMap<String, String>) -> Vec<String> {
    let drives: Vec<(&String, bool)> = ["ide", "scsi", "virtio", "sata"]
        .iter()
        .flat_map(|base| {
            let range = crate::params::index_range(base).expect("a drive base");
            range.map(move |i| format!("{base}{i}"))
        })
        .filter_map(|k| values.get_key_value(&k))
        .map(|(k, v)| (k, v.contains("media=cdrom")))
        .collect();
    let first = |cdrom: bool| {
        drives
            .iter()
            .find(|(_, c)| *c == cdrom)
            .map(|(k, _)| (*k).clone())
    };
    let net = (0..=31)
        .map(|i| format!("net{i}"))
        .find(|k| values.contains_key(k));
    [first(false), first(true), net]
        .into_iter()
        .flatten()
        .collect()
}

/// `update_vm_api`: every device a new `boot` order names must exist (or
/// come with the same request) and not be deleted by it. The message keeps
/// qemu-server's stray quote.
fn check_boot_order(
    set: &BTreeMap<String, String>,
    delete: &[String],
    values: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let Some(boot) = set.get("boot") else {
        return Ok(());
    };
    let Ok(ps) = PropertyString::parse(boot, "legacy") else {
        return Ok(());
    };
    for dev in ps
        .pairs
        .get("order")
        .map(String::as_str)
        .map(crate::params::split_list)
        .into_iter()
        .flatten()
    {
        let exists = values.contains_key(dev) || set.contains_key(dev);
        if !exists || delete.iter().any(|d| d == dev) {
            return Err(ApiError::fail(format!(
                "invalid bootorder: device '{dev}' does not exist'"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_order_drops_deleted_devices() {
        assert_eq!(
            drop_boot_device("order=scsi0;ide2;net0", "ide2"),
            "order=scsi0;net0"
        );
    }
}
