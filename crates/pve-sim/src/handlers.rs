//! What each route does: the synchronous checks Proxmox makes before it
//! answers, and the worker it starts. Runs with the state locked; waiting
//! for config locks happens in the server before this is called.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::auth::Identity;
use crate::config::{PropertyString, VmConfig, api_value, is_drive_key, net_mac};
use crate::options::SimOptions;
use crate::params::split_list;
use crate::routes::RouteId;
use crate::state::{
    ApiError, ApiResult, Spawn, State, TaskFault, Vm, Work, cloudinit_keys, now_ms, vm_sizes,
};

/// One request, validated.
pub struct Call<'a> {
    pub params: &'a BTreeMap<String, String>,
    pub who: &'a Identity,
    pub task_fault: Option<TaskFault>,
    pub lock_timeout: bool,
    /// `sendkey` delivers another key than the one sent.
    pub wrong_key: bool,
}

impl Call<'_> {
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    fn flag(&self, name: &str) -> Option<bool> {
        self.get(name).map(|v| v == "1")
    }

    fn node(&self) -> &str {
        self.get("node").unwrap_or_default()
    }

    fn vmid(&self) -> u32 {
        self.get("vmid").and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

pub const VERSION: &str = "9.1.9";
pub const RELEASE: &str = "9.1";
pub const REPOID: &str = "8a3f1c2e";

/// Parameters that are not config keys on create/config.
pub(crate) const NON_CONFIG: &[&str] = &[
    "node",
    "vmid",
    "archive",
    "bwlimit",
    "force",
    "ha-managed",
    "live-restore",
    "pool",
    "start",
    "storage",
    "unique",
    "delete",
    "revert",
    "digest",
    "skiplock",
    "background_delay",
    "import-working-storage",
];

pub fn handle(state: &mut State, opts: &SimOptions, route: RouteId, call: &Call) -> ApiResult {
    use RouteId::*;
    if !matches!(
        route,
        Version
            | ClusterResources
            | ClusterNextid
            | ClusterStatus
            | Nodes
            | TicketGet
            | TicketPost
            | Permissions
            | UserCreate
            | TokenCreate
            | AclPut
            | RoleCreate
            | PoolIndex
            | PoolCreate
            | PoolUpdate
            | PoolDelete
            | PoolRead
            | PoolUpdateById
            | PoolDeleteById
    ) {
        state.check_node(call.node())?;
    }
    crate::access_routes::authorize(state, route, call)?;
    match route {
        Version => Ok(json!({ "version": VERSION, "release": RELEASE, "repoid": REPOID })),
        ClusterResources => Ok(cluster_resources(state, opts, call)),
        ClusterNextid => nextid(state, call),
        Nodes => Ok(Value::Array(
            state
                .spec
                .nodes
                .iter()
                .map(|n| {
                    json!({
                        "node": n.name, "status": "online", "id": format!("node/{}", n.name), "type": "node",
                        "cpu": 0.02, "maxcpu": n.cpus, "mem": n.memory / 8, "maxmem": n.memory,
                        "disk": 8u64 << 30, "maxdisk": 100u64 << 30,
                        "uptime": now_ms() / 1000 - state.boot_time, "level": "",
                        "ssl_fingerprint": "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF",
                    })
                })
                .collect(),
        )),
        NodeStorage => Ok(node_storage(state, call)),
        StorageContent => storage_content(state, call),
        DownloadUrl => download_url(state, opts, call),
        QemuList => Ok(Value::Array(
            state
                .vms
                .iter()
                .filter(|(_, vm)| vm.node == call.node())
                .filter(|(id, _)| may(state, call, &format!("/vms/{id}"), &["VM.Audit"]))
                .map(|(id, vm)| qemu_list_entry(state, *id, vm))
                .collect(),
        )),
        QemuCreate => create(state, opts, call),
        QemuIndex => {
            state.vm_on(call.node(), call.vmid())?;
            Ok(json!([
                {"subdir": "config"}, {"subdir": "pending"}, {"subdir": "status"}, {"subdir": "clone"},
                {"subdir": "template"}, {"subdir": "resize"}, {"subdir": "sendkey"}, {"subdir": "agent"},
                {"subdir": "cloudinit"}
            ]))
        }
        QemuDestroy => destroy(state, opts, call),
        ConfigGet => {
            if call.get("current").is_some() && call.get("snapshot").is_some() {
                let msg = "option conflicts with option 'current'";
                return Err(ApiError::params(BTreeMap::from([
                    ("current".to_owned(), msg.replace("'current'", "'snapshot'")),
                    ("snapshot".to_owned(), msg.to_owned()),
                ])));
            }
            let vm = state.vm_on(call.node(), call.vmid())?;
            if let Some(name) = call.get("snapshot") {
                let snap = vm
                    .config
                    .snapshots
                    .get(name)
                    .ok_or_else(|| ApiError::fail(format!("snapshot '{name}' does not exist")))?;
                let config = VmConfig {
                    values: snap.values.clone(),
                    ..VmConfig::default()
                };
                return Ok(config.to_api_json(true));
            }
            Ok(vm.config.to_api_json(call.flag("current").unwrap_or(false)))
        }
        ConfigPost | ConfigPut => config_write(state, opts, call, route == ConfigPost),
        Pending => Ok(pending(&state.vm_on(call.node(), call.vmid())?.config)),
        StatusCurrent => {
            let vmid = call.vmid();
            let vm = state.vm_on(call.node(), vmid)?;
            let mut entry = qemu_list_entry(state, vmid, vm);
            let obj = entry.as_object_mut().expect("object");
            obj.insert("ha".into(), json!({"managed": 0}));
            obj.insert("qmpstatus".into(), json!(if vm.running { "running" } else { "stopped" }));
            if agent_enabled(&vm.config) {
                obj.insert("agent".into(), json!(1));
            }
            if vm.running {
                obj.insert("running-machine".into(), json!("pc-q35-9.2+pve1"));
                obj.insert("running-qemu".into(), json!("9.2.0"));
            }
            Ok(entry)
        }
        Start | Stop | Shutdown => power(state, opts, call, route),
        Clone => clone(state, opts, call),
        Template => {
            let vmid = call.vmid();
            let vm = state.vm_on(call.node(), vmid)?;
            if vm.running {
                return Err(ApiError::fail("you can't convert a VM to template if VM is running"));
            }
            if vm.config.is_template() {
                return Err(ApiError::fail("you can't convert a template to a template"));
            }
            if let Some(lock) = vm.config.lock() {
                return Err(ApiError::fail(format!("VM is locked ({lock})")));
            }
            let work = Work::Template { vmid };
            spawn_on_vm(state, opts, call, "qmtemplate", vmid, work)
        }
        Resize => {
            let vmid = call.vmid();
            state.vm_on(call.node(), vmid)?;
            let work = Work::Resize {
                vmid,
                disk: call.get("disk").unwrap_or_default().to_owned(),
                size: call.get("size").unwrap_or_default().to_owned(),
                digest: call.get("digest").map(str::to_owned),
            };
            spawn_on_vm(state, opts, call, "resize", vmid, work)
        }
        Sendkey => sendkey(state, call),
        AgentNetwork => agent_network(state, call),
        AgentOsinfo | AgentPing | AgentExec | AgentExecStatus => {
            unreachable!("the guest model answers agent commands (guest::agent)")
        }
        CloudinitGet => Ok(cloudinit_pending(&state.vm_on(call.node(), call.vmid())?.config)),
        CloudinitPut => {
            let vm = state.vm_mut(call.node(), call.vmid())?;
            crate::state::regenerate_cloudinit(&mut vm.config);
            Ok(Value::Null)
        }
        CloudinitDump => {
            let vmid = call.vmid();
            let vm = state.vm_on(call.node(), vmid)?;
            Ok(Value::String(cloudinit_dump(vmid, &vm.config, call.get("type").unwrap_or("user"))))
        }
        TaskList => task_list(state, call).map(|(tasks, _)| tasks),
        NodeStatus => Ok(node_status(state, call.node())),
        NodeNetwork => Ok(node_network(state, call)),
        ClusterStatus => Ok(cluster_status(state)),
        SnapshotList => {
            let vm = state.vm_on(call.node(), call.vmid())?;
            Ok(crate::snapshots::list(&vm.config, vm.running))
        }
        SnapshotCreate | SnapshotDelete | SnapshotRollback => snapshot_task(state, opts, call, route),
        Reboot => {
            let vmid = call.vmid();
            if !state.vm_on(call.node(), vmid)?.running {
                return Err(ApiError::fail(format!("VM {vmid} not running")));
            }
            let work = Work::Reboot { vmid };
            spawn_on_vm(state, opts, call, "qmreboot", vmid, work)
        }
        TaskStatus => task_status(state, call),
        TaskLog => task_log(state, call),
        TaskStop => {
            let upid = find_task(state, call)?.upid.clone();
            state.stop_task(&upid);
            Ok(Value::Null)
        }
        Permissions | UserCreate | TokenCreate | AclPut | RoleCreate => {
            crate::access_routes::handle(state, route, call)
        }
        PoolIndex => crate::pools::list(state, call),
        PoolRead => crate::pools::read(state, call),
        PoolCreate => crate::pools::create(state, call),
        PoolUpdate | PoolUpdateById => crate::pools::update(state, call),
        PoolDelete | PoolDeleteById => crate::pools::delete(state, call),
        TicketGet => Ok(Value::Null),
        TicketPost => unreachable!("the server answers /access/ticket itself"),
    }
}

/// The locks a worker takes: exclusive and shared VM locks; and the
/// storage a full clone copies into (its bandwidth, not a lock).
#[derive(Default)]
struct Locks {
    exclusive: Vec<u32>,
    shared: Vec<u32>,
    storage: Option<String>,
}

/// A worker on one VM, holding its config lock exclusively; answers its UPID.
fn spawn_on_vm(
    state: &mut State,
    opts: &SimOptions,
    call: &Call,
    kind: &str,
    vmid: u32,
    work: Work,
) -> ApiResult {
    let locks = Locks {
        exclusive: vec![vmid],
        ..Locks::default()
    };
    let upid = spawn(state, opts, call, kind, vmid.to_string(), work, locks);
    Ok(json!(upid))
}

fn spawn(
    state: &mut State,
    opts: &SimOptions,
    call: &Call,
    kind: &str,
    id: String,
    work: Work,
    locks: Locks,
) -> String {
    let Locks {
        exclusive: holds,
        shared,
        storage: holds_storage,
    } = locks;
    let lock_wait = if kind == "qmclone" {
        opts.clone_lock_timeout
    } else {
        opts.vm_lock_timeout
    };
    let work = match (call.lock_timeout, holds.first().or(shared.first())) {
        (true, Some(vmid)) => Work::Fail {
            message: crate::state::lock_timeout_message(*vmid),
        },
        _ => work,
    };
    state.spawn(
        opts,
        Spawn {
            node: call.node().to_owned(),
            kind: kind.to_owned(),
            id,
            user: call.who.authid.clone(),
            work,
            holds,
            shared,
            holds_storage,
            lock_wait,
            fault: call.task_fault.clone(),
        },
    )
}

/// Whether the caller holds any of `privs` on `path` (a list filter, not
/// an error).
fn may(state: &State, call: &Call, path: &str, privs: &[&str]) -> bool {
    state
        .access
        .check(&call.who.authid, path, privs, true)
        .is_ok()
}

/// `GET /cluster/resources` (pve-manager `API2/Cluster.pm` `resources`):
/// VMs the caller has VM.Audit on, storages it has Datastore.Audit on, and
/// every node, with its statistics only given Sys.Audit on it.
fn cluster_resources(state: &State, opts: &SimOptions, call: &Call) -> Value {
    let kind = call.get("type");
    let mut out = Vec::new();
    if kind.is_none() || kind == Some("vm") {
        out.extend(
            state
                .vms
                .iter()
                .filter(|(id, _)| may(state, call, &format!("/vms/{id}"), &["VM.Audit"]))
                .map(|(id, vm)| state.vm_resource(*id, vm, opts)),
        );
    }
    if kind.is_none() || kind == Some("node") {
        for n in &state.spec.nodes {
            let mut entry = json!({
                "id": format!("node/{}", n.name), "node": n.name, "type": "node", "status": "online",
            });
            if may(state, call, &format!("/nodes/{}", n.name), &["Sys.Audit"]) {
                entry.as_object_mut().expect("object").extend(
                    json!({
                        "cpu": 0.02, "maxcpu": n.cpus, "mem": n.memory / 8, "maxmem": n.memory,
                        "disk": 8u64 << 30, "maxdisk": 100u64 << 30,
                        "uptime": now_ms() / 1000 - state.boot_time, "level": "", "cgroup-mode": 2,
                    })
                    .as_object()
                    .expect("object")
                    .clone(),
                );
            }
            out.push(entry);
        }
    }
    if kind.is_none() || kind == Some("storage") {
        for n in &state.spec.nodes {
            for s in state.spec.storages.iter().filter(|s| {
                s.on_node(&n.name)
                    && may(
                        state,
                        call,
                        &format!("/storage/{}", s.id),
                        &["Datastore.Audit"],
                    )
            }) {
                out.push(json!({
                    "id": format!("storage/{}/{}", n.name, s.id), "storage": s.id, "node": n.name,
                    "type": "storage", "plugintype": s.plugin, "status": "available",
                    "shared": u8::from(s.shared), "content": s.content.join(","),
                    "disk": state.storage_used(s, &n.name), "maxdisk": s.capacity,
                }));
            }
        }
    }
    Value::Array(out)
}

fn nextid(state: &State, call: &Call) -> ApiResult {
    if let Some(want) = call.get("vmid") {
        let id: u32 = want.parse().unwrap_or(0);
        if state.vms.contains_key(&id) {
            return Err(ApiError::param("vmid", format!("VM {id} already exists")));
        }
        // Echoes the query string: a JSON string.
        return Ok(Value::String(want.to_owned()));
    }
    (100..1_000_000u32)
        .find(|id| !state.vms.contains_key(id))
        .map(|id| Value::String(id.to_string()))
        .ok_or_else(|| ApiError::fail("unable to get any free VMID in range [100, 1000000]"))
}

fn node_storage(state: &State, call: &Call) -> Value {
    let node = call.node();
    let content = call.get("content");
    Value::Array(
        state
            .spec
            .storages
            .iter()
            .filter(|s| s.on_node(node))
            .filter(|s| {
                let path = format!("/storage/{}", s.id);
                may(
                    state,
                    call,
                    &path,
                    &["Datastore.Audit", "Datastore.AllocateSpace"],
                )
            })
            .filter(|s| call.get("storage").is_none_or(|id| id == s.id))
            .filter(|s| content.is_none_or(|c| split_list(c).all(|c| s.has_content(c))))
            .map(|s| {
                let used = state.storage_used(s, node);
                json!({
                    "storage": s.id, "type": s.plugin, "content": s.content.join(","),
                    "active": 1, "enabled": 1, "shared": u8::from(s.shared),
                    "total": s.capacity, "used": used, "avail": s.capacity.saturating_sub(used),
                    "used_fraction": used as f64 / s.capacity.max(1) as f64,
                })
            })
            .collect(),
    )
}

fn storage_content(state: &State, call: &Call) -> ApiResult {
    let node = call.node();
    let spec = state.storage_spec_on(call.get("storage").unwrap_or_default(), node)?;
    let vmid: Option<u32> = call.get("vmid").and_then(|v| v.parse().ok());
    let mut items: Vec<Value> = state
        .volumes_on(&spec, node)
        .filter(|v| call.get("content").is_none_or(|c| c == v.content))
        .filter(|v| vmid.is_none() || v.vmid == vmid)
        .map(|v| content_item(&spec, v))
        .collect();
    items.sort_by(|a, b| a["volid"].as_str().cmp(&b["volid"].as_str()));
    Ok(Value::Array(items))
}

/// One content listing entry with the fields the storage plugin's
/// `list_images` returns (pve-storage; `API2/Storage/Content.pm` `index`
/// makes `size`, `used` and `vmid` integers): LVM gives `ctime` and no
/// parent (an LVM-thin linked clone cannot be told from a full one); ZFS
/// and RBD give the bare `name` and a `parent` snapshot
/// (`base-9000-disk-0@__base__`) but no `ctime`; files give `used` (what
/// is really allocated), `ctime` and the base file as `parent`.
fn content_item(spec: &crate::cluster::StorageSpec, v: &crate::state::Volume) -> Value {
    let mut item = json!({
        "volid": v.volid, "content": v.content, "format": v.format, "size": v.size,
    });
    let obj = item.as_object_mut().expect("object");
    if let Some(id) = v.vmid {
        obj.insert("vmid".into(), json!(id));
    }
    let base_name = |base: &str| base.split_once(':').map_or(base, |(_, n)| n).to_owned();
    match spec.plugin.as_str() {
        "zfspool" | "rbd" if v.vmid.is_some() => {
            let name = v.volid.rsplit(['/', ':']).next().unwrap_or_default();
            obj.insert("name".into(), json!(name));
            if let Some(base) = &v.parent {
                obj.insert(
                    "parent".into(),
                    json!(format!("{}@__base__", base_name(base))),
                );
            }
        }
        "lvm" | "lvmthin" => {
            obj.insert("ctime".into(), json!(v.ctime));
        }
        _ => {
            obj.insert("ctime".into(), json!(v.ctime));
            if v.vmid.is_some() {
                obj.insert("used".into(), json!(v.written));
            }
            if let Some(base) = &v.parent {
                obj.insert("parent".into(), json!(format!("../{}", base_name(base))));
            }
        }
    }
    item
}

fn download_url(state: &mut State, opts: &SimOptions, call: &Call) -> ApiResult {
    let node = call.node().to_owned();
    let storage_id = call.get("storage").unwrap_or_default().to_owned();
    let spec = state.storage_spec_on(&storage_id, &node)?;
    let content = call.get("content").unwrap_or_default();
    if !spec.is_file_based() {
        return Err(ApiError::fail(format!(
            "can't upload to storage type '{}', not a file based storage!",
            spec.plugin
        )));
    }
    if !spec.has_content(content) {
        return Err(ApiError::fail(format!(
            "storage '{storage_id}' is not configured for content-type '{content}'"
        )));
    }
    let raw = call.get("filename").unwrap_or_default();
    let base = raw.rsplit(['/', '\\']).next().unwrap_or(raw);
    let filename: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let lower = filename.to_ascii_lowercase();
    if content == "iso" && !(lower.ends_with(".iso") || lower.ends_with(".img")) {
        return Err(ApiError::param("filename", "wrong file extension"));
    }
    let checksum = match (call.get("checksum"), call.get("checksum-algorithm")) {
        (Some(c), Some(a)) => Some((a.to_owned(), c.to_ascii_lowercase())),
        (Some(_), None) => {
            return Err(ApiError::param(
                "checksum-algorithm",
                "missing property required by 'checksum'",
            ));
        }
        (None, Some(_)) => {
            return Err(ApiError::param(
                "checksum",
                "missing property required by 'checksum-algorithm'",
            ));
        }
        (None, None) => None,
    };
    let work = Work::Download {
        storage: storage_id,
        node,
        filename: filename.clone(),
        url: call.get("url").unwrap_or_default().to_owned(),
        checksum,
    };
    Ok(json!(spawn(
        state,
        opts,
        call,
        "download",
        filename,
        work,
        Locks::default()
    )))
}

pub fn qemu_list_entry(state: &State, vmid: u32, vm: &Vm) -> Value {
    let c = &vm.config;
    let (cpus, mem, disk) = vm_sizes(c);
    let mut entry = json!({
        "vmid": vmid,
        "name": c.get("name").map(str::to_owned).unwrap_or_else(|| format!("VM {vmid}")),
        "status": if vm.running { "running" } else { "stopped" },
        "cpus": cpus, "cpu": if vm.running { 0.0123 } else { 0.0 },
        "maxmem": mem, "mem": if vm.running { mem / 4 } else { 0 }, "memhost": if vm.running { mem / 4 } else { 0 },
        "maxdisk": disk, "disk": 0, "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0,
        "uptime": state.uptime(vm),
    });
    let obj = entry.as_object_mut().expect("object");
    if vm.running {
        obj.insert("pid".into(), json!(10_000 + vmid % 50_000));
    }
    if c.is_template() {
        obj.insert("template".into(), json!(1));
    }
    if let Some(lock) = c.lock() {
        obj.insert("lock".into(), json!(lock));
    }
    if let Some(tags) = c.get("tags") {
        obj.insert("tags".into(), json!(tags));
    }
    entry
}

fn config_values(call: &Call) -> BTreeMap<String, String> {
    call.params
        .iter()
        .filter(|(k, _)| !NON_CONFIG.contains(&k.as_str()))
        .map(|(k, v)| {
            let key = if k == "cdrom" {
                "ide2".to_owned()
            } else {
                k.clone()
            };
            let value = if k == "cdrom" && !v.contains("media=") {
                format!("{v},media=cdrom")
            } else {
                v.clone()
            };
            (key, value)
        })
        .collect()
}

fn create(state: &mut State, opts: &SimOptions, call: &Call) -> ApiResult {
    let node = call.node().to_owned();
    let vmid = call.vmid();
    if let Some(existing) = state.vms.get(&vmid) {
        return Err(ApiError::fail(format!(
            "unable to create VM {vmid} - VM {vmid} already exists on node '{}'",
            existing.node
        )));
    }
    if call.get("archive").is_some() {
        return Err(ApiError::fail("restoring backups is not simulated"));
    }
    let values = config_values(call);
    check_config_values(state, &node, &values)?;
    // The placeholder is written before the reply: the VMID is reserved now.
    state.insert_vm(vmid, Vm::placeholder(&node, "create"));
    let work = Work::Create {
        vmid,
        values,
        start: call.flag("start").unwrap_or(false),
    };
    Ok(json!(spawn(
        state,
        opts,
        call,
        "qmcreate",
        vmid.to_string(),
        work,
        Locks::default()
    )))
}

/// Synchronous sanity checks of config values (what the schema's formats
/// catch before a worker runs): bridges exist, storages exist on the node.
fn check_config_values(
    state: &State,
    node: &str,
    values: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    if let Some(keys) = values.get("sshkeys") {
        let decoded = percent_encoding::percent_decode_str(keys).decode_utf8_lossy();
        if !decoded
            .lines()
            .filter(|l| !l.trim().is_empty())
            .all(is_ssh_public_key)
        {
            return Err(ApiError::fail("SSH public key validation error"));
        }
    }
    let mut errors = BTreeMap::new();
    let bridges = state
        .spec
        .node(node)
        .map(|n| n.bridges.clone())
        .unwrap_or_default();
    for (k, v) in values {
        if crate::config::is_net_key(k)
            && let Ok(ps) = PropertyString::parse(v, "model")
            && let Some(bridge) = ps.pairs.get("bridge")
            && !bridges.contains(bridge)
        {
            errors.insert(k.clone(), format!("bridge '{bridge}' does not exist"));
        }
        let Some((storage, volname)) = is_drive_key(k)
            .then(|| PropertyString::parse(v, "file").ok()?.head)
            .flatten()
            .and_then(|f| f.split_once(':').map(|(s, n)| (s.to_owned(), n.to_owned())))
        else {
            continue;
        };
        // `$check_storage_access` in qemu-server `API2/Qemu.pm`, before
        // the worker: a new disk's storage must exist (`storage_config`
        // dies) and hold images.
        let new_disk = volname != "cloudinit"
            && !volname.is_empty()
            && volname.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        if new_disk && !state.storage_spec(&storage)?.has_content("images") {
            return Err(ApiError::param(
                "storage",
                format!("storage '{storage}' does not support vm images"),
            ));
        }
        if let Err(e) = state.storage_spec_on(&storage, node) {
            errors.insert(k.clone(), e.message);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::params(errors))
    }
}

/// What `ssh-keygen -l` accepts in pve-common's
/// `validate_ssh_public_keys`: an authorized_keys line (options allowed
/// before the key) whose base64 blob starts with its own key type.
fn is_ssh_public_key(line: &str) -> bool {
    use base64::Engine;
    const TYPES: &[&str] = &[
        "ssh-ed25519",
        "ssh-rsa",
        "ssh-dss",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    let words: Vec<&str> = line.split_whitespace().collect();
    words.windows(2).any(|pair| {
        TYPES.contains(&pair[0])
            && base64::engine::general_purpose::STANDARD
                .decode(pair[1])
                .is_ok_and(|blob| {
                    let name = pair[0].as_bytes();
                    blob.len() > 4 + name.len()
                        && blob[..4] == (name.len() as u32).to_be_bytes()
                        && &blob[4..4 + name.len()] == name
                })
    })
}

fn destroy(state: &mut State, opts: &SimOptions, call: &Call) -> ApiResult {
    let vmid = call.vmid();
    let vm = state.vm_on(call.node(), vmid)?;
    if vm.running {
        return Err(ApiError::fail(format!(
            "VM {vmid} is running - destroy failed"
        )));
    }
    if vm.config.get("protection") == Some("1") {
        return Err(ApiError::fail(format!(
            "can't remove VM {vmid} - protection mode enabled"
        )));
    }
    let work = Work::Destroy {
        vmid,
        unreferenced: call.flag("destroy-unreferenced-disks").unwrap_or(false),
    };
    spawn_on_vm(state, opts, call, "qmdestroy", vmid, work)
}

fn config_write(state: &mut State, opts: &SimOptions, call: &Call, is_async: bool) -> ApiResult {
    let node = call.node().to_owned();
    let vmid = call.vmid();
    let vm = state.vm_on(&node, vmid)?;
    let set = config_values(call);
    let delete: Vec<String> = call
        .get("delete")
        .map(|d| {
            split_list(d)
                .map(|k| {
                    if k == "cdrom" {
                        "ide2".to_owned()
                    } else {
                        k.to_owned()
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some(k) = delete.iter().find(|k| set.contains_key(*k)) {
        return Err(ApiError::param(
            "delete",
            format!("you can't use '-{k}' and -delete {k}' at the same time"),
        ));
    }
    let config_keys = crate::routes::qemu_config_keys();
    if let Some(k) = delete
        .iter()
        .find(|k| crate::params::lookup(&config_keys, k).is_none())
    {
        return Err(ApiError::param("delete", format!("unknown option '{k}'")));
    }
    if call.get("force").is_some() && delete.is_empty() {
        return Err(ApiError::param(
            "force",
            "missing property required by 'delete'",
        ));
    }
    if let Some(digest) = call.get("digest")
        && digest != vm.config.digest()
    {
        return Err(ApiError::fail(
            "checksum mismatch (file change by other user?)",
        ));
    }
    if let Some(lock) = vm.config.lock() {
        return Err(ApiError::fail(format!("VM is locked ({lock})")));
    }
    let revert: Vec<String> = call
        .get("revert")
        .map(|r| split_list(r).map(str::to_owned).collect())
        .unwrap_or_default();
    if set.is_empty() && delete.is_empty() && revert.is_empty() {
        return Err(ApiError::fail("no options specified"));
    }
    check_config_values(state, &node, &set)?;
    if !revert.is_empty() {
        let vm = state.vm_mut(&node, vmid)?;
        for k in &revert {
            vm.config.pending.remove(k);
            vm.config.pending_delete.remove(k);
        }
    }
    let force = call.flag("force").unwrap_or(false);
    if is_async {
        let work = Work::Config {
            vmid,
            set,
            delete,
            force,
        };
        spawn_on_vm(state, opts, call, "qmconfig", vmid, work)
    } else {
        state.apply_config(&node, vmid, &set, &delete, force)?;
        Ok(Value::Null)
    }
}

/// `GET …/pending`: `config_with_pending_array` (pve-guest-common
/// `GuestHelpers.pm`) over the loaded config, so the `digest` the loader
/// adds is a row too; values typed as `check_type` parsed them.
fn pending(config: &VmConfig) -> Value {
    let mut keys: Vec<&String> = config
        .values
        .keys()
        .chain(config.pending.keys())
        .chain(config.pending_delete.iter())
        .collect();
    keys.sort();
    keys.dedup();
    let mut rows: Vec<Value> = keys
        .into_iter()
        .map(|k| {
            let mut e = json!({ "key": k });
            let obj = e.as_object_mut().expect("object");
            if let Some(v) = config.values.get(k) {
                obj.insert("value".into(), api_value(k, v));
            }
            if let Some(v) = config.pending.get(k) {
                obj.insert("pending".into(), api_value(k, v));
            }
            if config.pending_delete.contains(k) {
                obj.insert("delete".into(), json!(1));
            }
            e
        })
        .collect();
    rows.push(json!({ "key": "digest", "value": config.digest() }));
    Value::Array(rows)
}

/// `snapshot`, `delsnapshot` and `rollback` in qemu-server `API2/Qemu.pm`:
/// the names `current` and `pending` are reserved; the work happens in
/// `qmsnapshot`, `qmdelsnapshot` and `qmrollback` workers.
fn snapshot_task(state: &mut State, opts: &SimOptions, call: &Call, route: RouteId) -> ApiResult {
    let vmid = call.vmid();
    state.vm_on(call.node(), vmid)?;
    let name = call.get("snapname").unwrap_or_default().to_owned();
    let (kind, work) = match route {
        RouteId::SnapshotCreate => {
            if matches!(name.as_str(), "current" | "pending") {
                return Err(ApiError::fail(format!(
                    "unable to use snapshot name '{name}' (reserved name)"
                )));
            }
            let work = Work::Snapshot {
                vmid,
                name,
                description: call.get("description").unwrap_or_default().to_owned(),
                vmstate: call.flag("vmstate").unwrap_or(false),
            };
            ("qmsnapshot", work)
        }
        RouteId::SnapshotDelete => ("qmdelsnapshot", Work::DeleteSnapshot { vmid, name }),
        _ => {
            let start = call.flag("start").unwrap_or(false);
            ("qmrollback", Work::Rollback { vmid, name, start })
        }
    };
    spawn_on_vm(state, opts, call, kind, vmid, work)
}

fn power(state: &mut State, opts: &SimOptions, call: &Call, route: RouteId) -> ApiResult {
    let vmid = call.vmid();
    state.vm_on(call.node(), vmid)?;
    let (kind, work) = match route {
        RouteId::Start => ("qmstart", Work::Start { vmid }),
        RouteId::Stop => ("qmstop", Work::Stop { vmid }),
        _ => ("qmshutdown", Work::Stop { vmid }),
    };
    spawn_on_vm(state, opts, call, kind, vmid, work)
}

fn clone(state: &mut State, opts: &SimOptions, call: &Call) -> ApiResult {
    let node = call.node().to_owned();
    let source = call.vmid();
    let newid: u32 = call.get("newid").and_then(|v| v.parse().ok()).unwrap_or(0);
    let src = state.vm_on(&node, source)?.clone();
    let full = call.flag("full").unwrap_or(!src.config.is_template());
    if !full {
        if call.get("storage").is_some() {
            return Err(ApiError::fail(
                "parameter 'storage' not allowed for linked clones",
            ));
        }
        if call.get("format").is_some() {
            return Err(ApiError::fail(
                "parameter 'format' not allowed for linked clones",
            ));
        }
    }
    if let Some(lock) = src.config.lock() {
        return Err(ApiError::fail(format!("VM is locked ({lock})")));
    }
    if state.vms.contains_key(&newid) {
        return Err(ApiError::fail(format!(
            "unable to create VM {newid}: config file already exists"
        )));
    }
    let target = call.get("target").unwrap_or(&node).to_owned();
    state.check_node(&target)?;
    let mut storage_key = None;
    for (key, value) in src.config.drives() {
        let Ok(ps) = PropertyString::parse(value, "file") else {
            continue;
        };
        let file = ps.head.clone().unwrap_or_default();
        if ps.pairs.get("media").is_some_and(|m| m == "cdrom") && !file.contains("cloudinit") {
            continue;
        }
        let Some((storage_id, _)) = file.split_once(':') else {
            continue;
        };
        let spec = state.storage_spec(storage_id)?;
        if target != node && !spec.shared {
            return Err(ApiError::fail(format!(
                "can't clone VM to node '{target}' (VM uses local storage)"
            )));
        }
        if !full
            && !file.contains("cloudinit")
            && (!src.config.is_template() || !spec.supports_linked_clone())
        {
            return Err(ApiError::fail(format!(
                "Linked clone feature is not supported for '{file}' ({key})"
            )));
        }
        if full {
            let target_storage = call.get("storage").unwrap_or(storage_id);
            let tspec = state.storage_spec_on(target_storage, &target)?;
            if target != node && !tspec.shared {
                return Err(ApiError::fail(format!(
                    "can't clone to non-shared storage '{target_storage}'"
                )));
            }
            storage_key.get_or_insert_with(|| {
                if tspec.shared {
                    tspec.id.clone()
                } else {
                    format!("{}@{target}", tspec.id)
                }
            });
        }
    }
    let src_name = src
        .config
        .get("name")
        .map(str::to_owned)
        .unwrap_or_else(|| format!("VM-{source}"));
    let work = Work::Clone {
        source,
        newid,
        target: target.clone(),
        full,
        storage: call.get("storage").map(str::to_owned),
        name: call
            .get("name")
            .map(str::to_owned)
            .unwrap_or_else(|| format!("Copy-of-VM-{src_name}")),
        description: call.get("description").map(str::to_owned),
    };
    // The source is held shared (exclusive when running); the target is
    // guarded by its `lock: clone` property, not by the flock.
    let locks = if src.running {
        Locks {
            exclusive: vec![source],
            storage: storage_key,
            ..Locks::default()
        }
    } else {
        Locks {
            shared: vec![source],
            storage: storage_key,
            ..Locks::default()
        }
    };
    let upid = spawn(
        state,
        opts,
        call,
        "qmclone",
        source.to_string(),
        work,
        locks,
    );
    // The worker writes the target placeholder (`lock: clone`) at once.
    let begins_ok = state
        .tasks
        .get(&upid)
        .is_some_and(|t| !matches!(t.work, Work::Fail { .. }));
    if begins_ok && !state.vms.contains_key(&newid) {
        state.insert_vm(newid, Vm::placeholder(&target, "clone"));
    }
    Ok(json!(upid))
}

/// QEMU key names `sendkey` accepts (QKeyCode, the US layout's keys).
fn valid_key(key: &str) -> bool {
    const NAMED: &[&str] = &[
        "ret",
        "spc",
        "tab",
        "esc",
        "backspace",
        "minus",
        "equal",
        "bracket_left",
        "bracket_right",
        "semicolon",
        "apostrophe",
        "grave_accent",
        "backslash",
        "comma",
        "dot",
        "slash",
        "up",
        "down",
        "left",
        "right",
        "home",
        "end",
        "pgup",
        "pgdn",
        "insert",
        "delete",
        "kp_enter",
        "caps_lock",
        "less",
    ];
    key.split('-').all(|part| {
        matches!(
            part,
            "shift" | "ctrl" | "alt" | "shift_r" | "ctrl_r" | "alt_r" | "meta_l" | "meta_r"
        ) || (part.len() == 1
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
            || NAMED.contains(&part)
            || (part.starts_with('f')
                && part[1..].parse::<u8>().is_ok_and(|n| (1..=12).contains(&n)))
    })
}

fn sendkey(state: &mut State, call: &Call) -> ApiResult {
    let vmid = call.vmid();
    let key = call.get("key").unwrap_or_default().to_owned();
    let vm = state.vm_mut(call.node(), vmid)?;
    if !vm.running {
        return Err(ApiError::fail(format!("VM {vmid} not running")));
    }
    if !valid_key(&key) {
        return Err(ApiError::fail(format!(
            "Parameter 'keys' expects a valid QKeyCode: '{key}'"
        )));
    }
    vm.console.push(if call.wrong_key {
        if key == "x" { "z" } else { "x" }.to_owned()
    } else {
        key
    });
    Ok(Value::Null)
}

pub(crate) fn agent_enabled(config: &VmConfig) -> bool {
    config
        .get("agent")
        .and_then(|a| a.split(',').next())
        .is_some_and(|first| first == "1" || first == "enabled=1")
}

/// `lo` as qemu-guest-agent reports it on every Linux guest.
pub(crate) fn loopback_interface() -> Value {
    json!({
        "name": "lo", "hardware-address": "00:00:00:00:00:00",
        "ip-addresses": [
            {"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8},
            {"ip-address": "::1", "ip-address-type": "ipv6", "prefix": 128}
        ],
        "statistics": {"rx-bytes": 0, "rx-dropped": 0, "rx-errs": 0, "rx-packets": 0, "tx-bytes": 0, "tx-dropped": 0, "tx-errs": 0, "tx-packets": 0}
    })
}

/// The guest's interfaces; whether the agent answers at all was checked
/// by [`crate::guest::agent_ready`].
fn agent_network(state: &State, call: &Call) -> ApiResult {
    let vmid = call.vmid();
    let vm = state.vm_on(call.node(), vmid)?;
    let mut result = vec![loopback_interface()];
    let values = vm.config.effective(true);
    for (key, value) in values.iter().filter(|(k, _)| crate::config::is_net_key(k)) {
        let n = &key[3..];
        let mac = net_mac(value).unwrap_or_default().to_ascii_lowercase();
        let ipconfig = values
            .get(&format!("ipconfig{n}"))
            .cloned()
            .unwrap_or_default();
        let ip = ipconfig
            .split(',')
            .find_map(|p| p.strip_prefix("ip="))
            .filter(|ip| *ip != "dhcp")
            .map(str::to_owned)
            .unwrap_or_else(|| {
                format!(
                    "10.{}.{}.{}/24",
                    (vmid >> 16) & 0xFF,
                    (vmid >> 8) & 0xFF,
                    (vmid & 0xFF).max(2)
                )
            });
        let (addr, prefix) = ip.split_once('/').unwrap_or((ip.as_str(), "24"));
        result.push(json!({
            "name": format!("eth{n}"), "hardware-address": mac,
            "ip-addresses": [
                {"ip-address": addr, "ip-address-type": "ipv4", "prefix": prefix.parse::<u8>().unwrap_or(24)},
                {"ip-address": format!("fe80::be24:11ff:fe{}", &mac.replace(':', "")[6..]), "ip-address-type": "ipv6", "prefix": 64}
            ],
            "statistics": {"rx-bytes": 1024, "rx-dropped": 0, "rx-errs": 0, "rx-packets": 12, "tx-bytes": 2048, "tx-dropped": 0, "tx-errs": 0, "tx-packets": 16}
        }));
    }
    Ok(json!({ "result": result }))
}

fn cloudinit_pending(config: &VmConfig) -> Value {
    let now = cloudinit_keys(&config.effective(false));
    let built = &config.cloudinit;
    let mut keys: Vec<&String> = now.keys().chain(built.keys()).collect();
    keys.sort();
    keys.dedup();
    Value::Array(
        keys.into_iter()
            .filter(|k| !crate::config::is_net_key(k) && k.as_str() != "name")
            .map(|k| {
                let mask = |v: &String| {
                    if k == "cipassword" {
                        "**********".to_owned()
                    } else {
                        v.clone()
                    }
                };
                let mut e = json!({ "key": k });
                let obj = e.as_object_mut().expect("object");
                match (built.get(k), now.get(k)) {
                    (Some(b), Some(n)) if b == n => {
                        obj.insert("value".into(), json!(mask(b)));
                    }
                    (Some(b), Some(n)) => {
                        obj.insert("value".into(), json!(mask(b)));
                        obj.insert("pending".into(), json!(mask(n)));
                    }
                    (Some(b), None) => {
                        obj.insert("value".into(), json!(mask(b)));
                        obj.insert("delete".into(), json!(1));
                    }
                    (None, Some(n)) => {
                        obj.insert("pending".into(), json!(mask(n)));
                    }
                    (None, None) => {}
                }
                e
            })
            .collect(),
    )
}

/// What Proxmox would write on the cloud-init drive (NoCloud).
fn cloudinit_dump(vmid: u32, config: &VmConfig, kind: &str) -> String {
    let v = config.effective(false);
    match kind {
        "user" => {
            let mut out = String::from("#cloud-config\n");
            let host = v
                .get("name")
                .cloned()
                .unwrap_or_else(|| format!("VM{vmid}"));
            out.push_str(&format!("hostname: {host}\nmanage_etc_hosts: true\n"));
            if let Some(domain) = v.get("searchdomain") {
                out.push_str(&format!("fqdn: {host}.{domain}\n"));
            }
            if let Some(user) = v.get("ciuser") {
                out.push_str(&format!("user: {user}\n"));
            }
            if v.contains_key("cipassword") {
                out.push_str("password: **********\n");
            }
            if let Some(keys) = v.get("sshkeys") {
                let decoded = percent_encoding::percent_decode_str(keys)
                    .decode_utf8_lossy()
                    .into_owned();
                out.push_str("ssh_authorized_keys:\n");
                for line in decoded.lines().filter(|l| !l.trim().is_empty()) {
                    out.push_str(&format!("  - {line}\n"));
                }
            }
            out.push_str("chpasswd:\n  expire: False\nusers:\n  - default\n");
            if v.get("ciupgrade").is_none_or(|u| u == "1") {
                out.push_str("package_upgrade: true\n");
            }
            out
        }
        "network" => {
            let mut out = String::from("version: 1\nconfig:\n");
            for (key, value) in v.iter().filter(|(k, _)| crate::config::is_net_key(k)) {
                let n = &key[3..];
                let Some(ipconfig) = v.get(&format!("ipconfig{n}")) else {
                    continue;
                };
                let mac = net_mac(value).unwrap_or_default().to_ascii_lowercase();
                out.push_str(&format!("    - type: physical\n      name: eth{n}\n      mac_address: '{mac}'\n      subnets:\n"));
                let ip = ipconfig.split(',').find_map(|p| p.strip_prefix("ip="));
                let gw = ipconfig.split(',').find_map(|p| p.strip_prefix("gw="));
                match ip {
                    Some("dhcp") | None => out.push_str("      - type: dhcp4\n"),
                    Some(ip) => {
                        out.push_str(&format!("      - type: static\n        address: '{ip}'\n"));
                        if let Some(gw) = gw {
                            out.push_str(&format!("        gateway: '{gw}'\n"));
                        }
                    }
                }
            }
            if let Some(ns) = v.get("nameserver") {
                out.push_str("    - type: nameserver\n      address:\n");
                for a in split_list(ns) {
                    out.push_str(&format!("      - '{a}'\n"));
                }
                if let Some(domain) = v.get("searchdomain") {
                    out.push_str(&format!("      search:\n      - '{domain}'\n"));
                }
            }
            out
        }
        _ => {
            use sha1::{Digest, Sha1};
            let mut h = Sha1::new();
            h.update(cloudinit_dump(vmid, config, "user"));
            h.update(cloudinit_dump(vmid, config, "network"));
            let id: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            format!("instance-id: {id}\n")
        }
    }
}

fn find_task<'s>(state: &'s State, call: &Call) -> Result<&'s crate::state::Task, ApiError> {
    let upid = call.get("upid").unwrap_or_default();
    let parts: Vec<&str> = upid.split(':').collect();
    if parts.len() != 9 || parts[0] != "UPID" || !upid.ends_with(':') {
        return Err(ApiError::param("upid", "unable to parse worker upid"));
    }
    state
        .tasks
        .get(upid)
        .filter(|t| t.node == call.node())
        .ok_or_else(|| ApiError::param("upid", "no such task"))
}

fn task_status(state: &State, call: &Call) -> ApiResult {
    let t = find_task(state, call)?;
    let (user, tokenid) = match t.user.split_once('!') {
        Some((u, token)) => (u.to_owned(), Some(token.to_owned())),
        None => (t.user.clone(), None),
    };
    let mut status = json!({
        "upid": t.upid, "node": t.node, "pid": t.pid, "pstart": t.pstart, "starttime": t.starttime,
        "type": t.kind, "id": t.id, "user": user,
        "status": if t.exitstatus.is_some() { "stopped" } else { "running" },
    });
    let obj = status.as_object_mut().expect("object");
    if let Some(token) = tokenid {
        obj.insert("tokenid".into(), json!(token));
    }
    if let Some(exit) = &t.exitstatus {
        obj.insert("exitstatus".into(), json!(exit));
    }
    Ok(status)
}

/// The task log and its `total`: (lines, total).
pub fn task_log_page(state: &State, call: &Call) -> Result<(Value, usize), ApiError> {
    let t = find_task(state, call)?;
    let start: usize = call.get("start").and_then(|s| s.parse().ok()).unwrap_or(0);
    let limit: usize = call.get("limit").and_then(|s| s.parse().ok()).unwrap_or(50);
    if t.log.is_empty() {
        return Ok((json!([{"n": 1, "t": "no content"}]), 1));
    }
    let take = if limit == 0 { usize::MAX } else { limit };
    let lines: Vec<Value> = t
        .log
        .iter()
        .enumerate()
        .skip(start)
        .take(take)
        .map(|(i, line)| json!({"n": i + 1, "t": line}))
        .collect();
    Ok((Value::Array(lines), t.log.len()))
}

/// The `total` attribute a listing carries next to `data`
/// (`set_result_attrib('total', …)` in the task log and task list).
pub fn result_total(state: &State, route: RouteId, call: &Call) -> Option<usize> {
    match route {
        RouteId::TaskLog => task_log_page(state, call).ok().map(|(_, total)| total),
        RouteId::TaskList => task_list(state, call).ok().map(|(_, total)| total),
        _ => None,
    }
}

/// `GET /nodes/{node}/tasks` (pve-manager `API2/Tasks.pm` `node_tasks`):
/// finished tasks by default (`source=archive`), newest first, filtered,
/// then paged by `start`/`limit` (50); `status` is the exit status and
/// `endtime` is set once a task stopped.
fn task_list(state: &State, call: &Call) -> Result<(Value, usize), ApiError> {
    let node = call.node();
    let source = call.get("source").unwrap_or("archive");
    let num = |k: &str| call.get(k).and_then(|v| v.parse::<u64>().ok());
    let statuses: Vec<&str> = call
        .get("statusfilter")
        .map(|s| split_list(s).collect())
        .unwrap_or_default();
    let mut tasks: Vec<&crate::state::Task> = state
        .tasks
        .values()
        .filter(|t| t.node == node)
        .filter(|t| match source {
            "active" => t.exitstatus.is_none(),
            "all" => true,
            _ => t.exitstatus.is_some(),
        })
        .filter(|t| call.get("vmid").is_none_or(|v| t.id == v))
        .filter(|t| call.get("typefilter").is_none_or(|k| t.kind == k))
        .filter(|t| call.get("userfilter").is_none_or(|u| t.user.contains(u)))
        .filter(|t| num("since").is_none_or(|s| t.starttime >= s))
        .filter(|t| num("until").is_none_or(|u| t.starttime <= u))
        .filter(|t| {
            let kind = match t.exitstatus.as_deref() {
                None => "unknown",
                Some("OK") => "ok",
                Some(e) if e.starts_with("WARNINGS") => "warning",
                Some(_) => "error",
            };
            let error = call.flag("errors") == Some(true);
            (statuses.is_empty() || statuses.contains(&kind)) && (!error || kind == "error")
        })
        .collect();
    tasks.sort_by_key(|t| std::cmp::Reverse((t.starttime, t.pid)));
    let total = tasks.len();
    let start = num("start").unwrap_or(0) as usize;
    let limit = num("limit").unwrap_or(50) as usize;
    let items = tasks
        .into_iter()
        .skip(start)
        .take(limit)
        .map(|t| {
            let mut item = json!({
                "upid": t.upid, "node": t.node, "pid": t.pid, "pstart": t.pstart,
                "starttime": t.starttime, "type": t.kind, "id": t.id, "user": t.user,
            });
            if let (Some(exit), Some(end)) = (&t.exitstatus, t.ends_ms) {
                item["status"] = json!(exit);
                item["endtime"] = json!(end / 1000);
            }
            item
        })
        .collect();
    Ok((Value::Array(items), total))
}

/// `GET /nodes/{node}/status`: the fields the 9.1 schema requires, and
/// `uptime`/`kversion` that pve-manager `API2/Nodes.pm` `status` adds.
fn node_status(state: &State, node: &str) -> Value {
    let spec = state.spec.node(node).expect("the node was checked");
    json!({
        "cpu": 0.02,
        "cpuinfo": {"cores": spec.cpus / 2, "cpus": spec.cpus, "model": "QEMU Virtual CPU", "sockets": 1},
        "memory": {"total": spec.memory, "used": spec.memory / 8, "free": spec.memory - spec.memory / 8, "available": spec.memory - spec.memory / 8},
        "rootfs": {"total": 100u64 << 30, "used": 8u64 << 30, "free": 92u64 << 30, "avail": 87u64 << 30},
        "loadavg": ["0.12", "0.10", "0.09"],
        "pveversion": format!("pve-manager/{VERSION}/{REPOID}"),
        "boot-info": {"mode": "efi", "secureboot": 0},
        "current-kernel": {"sysname": "Linux", "release": "6.14.8-2-pve", "machine": "x86_64", "version": "#1 SMP PREEMPT_DYNAMIC PMX 6.14.8-2"},
        "kversion": "Linux 6.14.8-2-pve #1 SMP PREEMPT_DYNAMIC PMX 6.14.8-2",
        "uptime": now_ms() / 1000 - state.boot_time,
    })
}

/// `GET /nodes/{node}/network` (pve-manager `API2/Network.pm` `index`):
/// the node's uplink `eth0` and its Linux bridges, filtered by `type`
/// (`any_bridge` and `any_local_bridge` include bridges).
fn node_network(state: &State, call: &Call) -> Value {
    let spec = state.spec.node(call.node()).expect("the node was checked");
    let kind = call.get("type");
    let wants = |t: &str| {
        kind.is_none_or(|k| {
            k == t || (t == "bridge" && matches!(k, "any_bridge" | "any_local_bridge"))
        })
    };
    let mut ifaces = Vec::new();
    if wants("eth") {
        ifaces.push(json!({"iface": "eth0", "type": "eth", "active": 1, "exists": 1, "method": "manual", "families": ["inet"], "priority": 1}));
    }
    if wants("bridge") {
        for (i, bridge) in spec.bridges.iter().enumerate() {
            ifaces.push(json!({
                "iface": bridge, "type": "bridge", "active": 1, "autostart": 1, "method": "manual",
                "bridge_ports": if i == 0 { "eth0" } else { "" }, "bridge_stp": "off", "bridge_fd": "0",
                "families": ["inet"], "priority": i + 2,
            }));
        }
    }
    Value::Array(ifaces)
}

/// `GET /cluster/status`: a `cluster` row when the nodes form a cluster,
/// then one row per node; booleans are 0/1 (pve-manager
/// `API2/ClusterStatus.pm`).
fn cluster_status(state: &State) -> Value {
    let nodes = &state.spec.nodes;
    let mut rows = Vec::new();
    if let Some(name) = &state.spec.cluster_name {
        rows.push(json!({
            "type": "cluster", "id": "cluster", "name": name,
            "nodes": nodes.len(), "quorate": 1, "version": nodes.len() + 1,
        }));
    }
    for (i, n) in nodes.iter().enumerate() {
        rows.push(json!({
            "type": "node", "id": format!("node/{}", n.name), "name": n.name,
            "ip": format!("192.0.2.{}", i + 10), "local": u8::from(i == 0),
            "nodeid": i + 1, "online": 1, "level": "",
        }));
    }
    Value::Array(rows)
}

fn task_log(state: &State, call: &Call) -> ApiResult {
    task_log_page(state, call).map(|(lines, _)| lines)
}
