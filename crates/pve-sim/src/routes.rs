//! The routes the simulator serves: method, path template, parameters and
//! the declared return type, as in the Proxmox VE 9 API schema.
//!
//! Dispatch matches a request against this table; a path or method that is
//! not here gets Proxmox's 501. `routes()` is public so the conformance
//! test can compare every declaration with `apidoc.json`.

use std::sync::LazyLock;

use crate::formats::QmFormat;
use crate::params::{
    ARRAY, BOOL, Check, Format, INT, Kind, NODE, Param, Pattern, STR, VMID, int, opt, opt_c, req,
    req_c,
};

/// What a route returns, as the schema's `returns.type` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returns {
    Null,
    String,
    Integer,
    Object,
    Array,
}

impl Returns {
    pub fn type_name(self) -> &'static str {
        match self {
            Returns::Null => "null",
            Returns::String => "string",
            Returns::Integer => "integer",
            Returns::Object => "object",
            Returns::Array => "array",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteId {
    Version,
    ClusterResources,
    ClusterNextid,
    Nodes,
    NodeStorage,
    StorageContent,
    DownloadUrl,
    QemuList,
    QemuCreate,
    QemuIndex,
    QemuDestroy,
    ConfigGet,
    ConfigPost,
    ConfigPut,
    Pending,
    StatusCurrent,
    Start,
    Stop,
    Shutdown,
    Clone,
    Template,
    Resize,
    Sendkey,
    AgentNetwork,
    AgentOsinfo,
    AgentPing,
    AgentExec,
    AgentExecStatus,
    CloudinitGet,
    CloudinitPut,
    CloudinitDump,
    TaskList,
    TaskStatus,
    TaskLog,
    TaskStop,
    SnapshotList,
    SnapshotCreate,
    SnapshotDelete,
    SnapshotRollback,
    NodeStatus,
    NodeNetwork,
    ClusterStatus,
    Reboot,
    TicketGet,
    TicketPost,
    Permissions,
    UserCreate,
    TokenCreate,
    AclPut,
    RoleCreate,
    PoolIndex,
    PoolCreate,
    PoolUpdate,
    PoolDelete,
    /// The per-id forms PVE 9 keeps for older clients (deprecated there,
    /// the only ones before 8.1).
    PoolRead,
    PoolUpdateById,
    PoolDeleteById,
}

#[derive(Debug, Clone)]
pub struct RouteDef {
    pub id: RouteId,
    pub method: &'static str,
    /// Path template below `/api2/json`, e.g. `/nodes/{node}/qemu/{vmid}/config`.
    pub path: &'static str,
    /// Every parameter, path parameters included.
    pub params: Vec<Param>,
    pub returns: Returns,
    /// Reachable without a ticket or token.
    pub public: bool,
}

impl RouteDef {
    /// True when the call returns a task id (runs in a worker).
    pub fn is_async(&self) -> bool {
        self.returns == Returns::String && self.id != RouteId::CloudinitDump
    }
}

const STORAGE: Param = req_c("storage", STR, Check::Format(Format::PveStorageId));
const UPID: Param = req("upid", STR);
const VMID_P: Param = req("vmid", VMID);
const SNAPNAME: Param = req_c("snapname", STR, Check::Format(Format::ConfigId));
const DISKS: &[&str] = &[
    "ide0",
    "ide1",
    "ide2",
    "ide3",
    "scsi0",
    "scsi1",
    "scsi2",
    "scsi3",
    "scsi4",
    "scsi5",
    "scsi6",
    "scsi7",
    "scsi8",
    "scsi9",
    "scsi10",
    "scsi11",
    "scsi12",
    "scsi13",
    "scsi14",
    "scsi15",
    "scsi16",
    "scsi17",
    "scsi18",
    "scsi19",
    "scsi20",
    "scsi21",
    "scsi22",
    "scsi23",
    "scsi24",
    "scsi25",
    "scsi26",
    "scsi27",
    "scsi28",
    "scsi29",
    "scsi30",
    "virtio0",
    "virtio1",
    "virtio2",
    "virtio3",
    "virtio4",
    "virtio5",
    "virtio6",
    "virtio7",
    "virtio8",
    "virtio9",
    "virtio10",
    "virtio11",
    "virtio12",
    "virtio13",
    "virtio14",
    "virtio15",
    "sata0",
    "sata1",
    "sata2",
    "sata3",
    "sata4",
    "sata5",
    "efidisk0",
    "tpmstate0",
];

/// Every QEMU config key (create and config share them).
pub fn qemu_config_keys() -> Vec<Param> {
    let e = |v: &'static [&'static str]| Check::Enum(v);
    vec![
        opt("acpi", BOOL),
        opt("affinity", STR),
        opt("agent", STR),
        opt("allow-ksm", BOOL),
        opt("amd-sev", STR),
        opt_c("arch", STR, e(&["x86_64", "aarch64"])),
        opt("args", STR),
        opt("audio0", STR),
        opt("autostart", BOOL),
        opt("balloon", int(0, None)),
        opt_c("bios", STR, e(&["seabios", "ovmf"])),
        opt_c("boot", STR, Check::Format(Format::Qm(QmFormat::Boot))),
        opt("bootdisk", STR),
        opt("cdrom", STR),
        opt("cicustom", STR),
        opt("cipassword", STR),
        opt_c("citype", STR, e(&["configdrive2", "nocloud", "opennebula"])),
        opt("ciupgrade", BOOL),
        opt("ciuser", STR),
        opt("cores", int(1, None)),
        opt("cpu", STR),
        opt(
            "cpulimit",
            Kind::Number {
                min: Some(0.0),
                max: Some(128.0),
            },
        ),
        opt("cpuunits", int(1, Some(262_144))),
        opt("description", STR),
        opt("efidisk0", STR),
        opt("freeze", BOOL),
        opt("hookscript", STR),
        opt("hostpci[n]", STR),
        opt("hotplug", STR),
        opt_c("hugepages", STR, e(&["any", "2", "1024"])),
        opt("ide[n]", STR),
        opt("intel-tdx", STR),
        opt_c(
            "ipconfig[n]",
            STR,
            Check::Format(Format::Qm(QmFormat::IpConfig)),
        ),
        opt("ivshmem", STR),
        opt("keephugepages", BOOL),
        opt_c(
            "keyboard",
            STR,
            e(&[
                "de", "de-ch", "da", "en-gb", "en-us", "es", "fi", "fr", "fr-be", "fr-ca", "fr-ch",
                "hu", "is", "it", "ja", "lt", "mk", "nl", "no", "pl", "pt", "pt-br", "sv", "sl",
                "tr",
            ]),
        ),
        opt("kvm", BOOL),
        opt("localtime", BOOL),
        opt_c(
            "lock",
            STR,
            e(&[
                "backup",
                "clone",
                "create",
                "migrate",
                "rollback",
                "snapshot",
                "snapshot-delete",
                "suspending",
                "suspended",
            ]),
        ),
        opt("machine", STR),
        opt_c("memory", STR, Check::Format(Format::Qm(QmFormat::Memory))),
        opt(
            "migrate_downtime",
            Kind::Number {
                min: Some(0.0),
                max: None,
            },
        ),
        opt("migrate_speed", int(0, None)),
        opt_c("name", STR, Check::Format(Format::DnsName)),
        opt_c("nameserver", STR, Check::Format(Format::AddressList)),
        opt_c("net[n]", STR, Check::Format(Format::Qm(QmFormat::Net))),
        opt("numa", BOOL),
        opt("numa[n]", STR),
        opt("onboot", BOOL),
        opt_c(
            "ostype",
            STR,
            e(&[
                "other", "wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11",
                "l24", "l26", "solaris",
            ]),
        ),
        opt("parallel[n]", STR),
        opt("protection", BOOL),
        opt("reboot", BOOL),
        opt("rng0", STR),
        opt("sata[n]", STR),
        opt("scsi[n]", STR),
        opt_c(
            "scsihw",
            STR,
            e(&[
                "lsi",
                "lsi53c810",
                "virtio-scsi-pci",
                "virtio-scsi-single",
                "megasas",
                "pvscsi",
            ]),
        ),
        opt("searchdomain", STR),
        opt("serial[n]", STR),
        opt("shares", int(0, Some(50_000))),
        opt("smbios1", STR),
        opt("smp", int(1, None)),
        opt("sockets", int(1, None)),
        opt("spice_enhancements", STR),
        opt_c("sshkeys", STR, Check::Format(Format::UrlEncoded)),
        opt("startdate", STR),
        opt("startup", STR),
        opt("tablet", BOOL),
        opt_c("tags", STR, Check::Format(Format::TagList)),
        opt("tdf", BOOL),
        opt("template", BOOL),
        opt("tpmstate0", STR),
        opt("unused[n]", STR),
        opt("usb[n]", STR),
        opt("vcpus", int(1, None)),
        opt("vga", STR),
        opt("virtio[n]", STR),
        opt("virtiofs[n]", STR),
        opt("vmgenid", STR),
        opt_c("vmstatestorage", STR, Check::Format(Format::PveStorageId)),
        opt("watchdog", STR),
    ]
}

const POOLID: Param = req_c("poolid", STR, Check::Format(Format::PoolId));

/// `PUT /pools` and `PUT /pools/{poolid}` take the same parameters.
fn pool_update() -> Vec<Param> {
    vec![
        POOLID,
        opt("allow-move", BOOL),
        opt("comment", STR),
        opt("delete", BOOL),
        opt("storage", STR),
        opt("vms", STR),
    ]
}

fn with(mut base: Vec<Param>, extra: &[Param]) -> Vec<Param> {
    base.extend_from_slice(extra);
    base
}

static ROUTES: LazyLock<Vec<RouteDef>> = LazyLock::new(|| {
    use RouteId::*;
    let r = |id, method, path, params: Vec<Param>, returns| RouteDef {
        id,
        method,
        path,
        params,
        returns,
        public: false,
    };
    let pool = opt_c("pool", STR, Check::Format(Format::PoolId));
    let config_edit = [
        NODE,
        VMID_P,
        opt_c("delete", STR, Check::Format(Format::ConfigIdList)),
        opt_c("revert", STR, Check::Format(Format::ConfigIdList)),
        opt("digest", STR),
        opt("force", BOOL),
        opt("skiplock", BOOL),
    ];
    vec![
        r(Version, "GET", "/version", vec![], Returns::Object),
        r(
            ClusterResources,
            "GET",
            "/cluster/resources",
            vec![opt_c(
                "type",
                STR,
                Check::Enum(&["vm", "storage", "node", "sdn"]),
            )],
            Returns::Array,
        ),
        r(
            ClusterNextid,
            "GET",
            "/cluster/nextid",
            vec![opt("vmid", VMID)],
            Returns::Integer,
        ),
        r(Nodes, "GET", "/nodes", vec![], Returns::Array),
        r(
            NodeStorage,
            "GET",
            "/nodes/{node}/storage",
            vec![
                NODE,
                opt("content", STR),
                opt("enabled", BOOL),
                opt("format", BOOL),
                opt_c("storage", STR, Check::Format(Format::PveStorageId)),
                opt_c("target", STR, Check::Format(Format::PveNode)),
            ],
            Returns::Array,
        ),
        r(
            StorageContent,
            "GET",
            "/nodes/{node}/storage/{storage}/content",
            vec![NODE, STORAGE, opt("content", STR), opt("vmid", VMID)],
            Returns::Array,
        ),
        r(
            DownloadUrl,
            "POST",
            "/nodes/{node}/storage/{storage}/download-url",
            vec![
                NODE,
                STORAGE,
                req_c("url", STR, Check::Pattern(Pattern::HttpUrl)),
                req_c("content", STR, Check::Enum(&["iso", "vztmpl", "import"])),
                req("filename", STR),
                opt("checksum", STR),
                opt_c(
                    "checksum-algorithm",
                    STR,
                    Check::Enum(&["md5", "sha1", "sha224", "sha256", "sha384", "sha512"]),
                ),
                opt("compression", STR),
                opt("verify-certificates", BOOL),
            ],
            Returns::String,
        ),
        r(
            QemuList,
            "GET",
            "/nodes/{node}/qemu",
            vec![NODE, opt("full", BOOL)],
            Returns::Array,
        ),
        r(
            QemuCreate,
            "POST",
            "/nodes/{node}/qemu",
            with(
                qemu_config_keys(),
                &[
                    NODE,
                    VMID_P,
                    opt("archive", STR),
                    opt("bwlimit", int(0, None)),
                    opt("force", BOOL),
                    opt("ha-managed", BOOL),
                    opt_c(
                        "import-working-storage",
                        STR,
                        Check::Format(Format::PveStorageId),
                    ),
                    opt("live-restore", BOOL),
                    pool,
                    opt("start", BOOL),
                    opt_c("storage", STR, Check::Format(Format::PveStorageId)),
                    opt("unique", BOOL),
                ],
            ),
            Returns::String,
        ),
        r(
            QemuIndex,
            "GET",
            "/nodes/{node}/qemu/{vmid}",
            vec![NODE, VMID_P],
            Returns::Array,
        ),
        r(
            QemuDestroy,
            "DELETE",
            "/nodes/{node}/qemu/{vmid}",
            vec![
                NODE,
                VMID_P,
                opt("destroy-unreferenced-disks", BOOL),
                opt("purge", BOOL),
                opt("skiplock", BOOL),
            ],
            Returns::String,
        ),
        r(
            ConfigGet,
            "GET",
            "/nodes/{node}/qemu/{vmid}/config",
            vec![NODE, VMID_P, opt("current", BOOL), opt("snapshot", STR)],
            Returns::Object,
        ),
        r(
            ConfigPost,
            "POST",
            "/nodes/{node}/qemu/{vmid}/config",
            with(
                with(qemu_config_keys(), &config_edit),
                &[
                    opt("background_delay", int(1, Some(30))),
                    opt_c(
                        "import-working-storage",
                        STR,
                        Check::Format(Format::PveStorageId),
                    ),
                ],
            ),
            Returns::String,
        ),
        r(
            ConfigPut,
            "PUT",
            "/nodes/{node}/qemu/{vmid}/config",
            with(qemu_config_keys(), &config_edit),
            Returns::Null,
        ),
        r(
            Pending,
            "GET",
            "/nodes/{node}/qemu/{vmid}/pending",
            vec![NODE, VMID_P],
            Returns::Array,
        ),
        r(
            StatusCurrent,
            "GET",
            "/nodes/{node}/qemu/{vmid}/status/current",
            vec![NODE, VMID_P],
            Returns::Object,
        ),
        r(
            Start,
            "POST",
            "/nodes/{node}/qemu/{vmid}/status/start",
            vec![
                NODE,
                VMID_P,
                opt("force-cpu", STR),
                opt("machine", STR),
                opt_c("migratedfrom", STR, Check::Format(Format::PveNode)),
                opt("migration_network", STR),
                opt_c("migration_type", STR, Check::Enum(&["secure", "insecure"])),
                opt("nets-host-mtu", STR),
                opt("skiplock", BOOL),
                opt("stateuri", STR),
                opt("targetstorage", STR),
                opt("timeout", int(0, None)),
                opt("with-conntrack-state", BOOL),
            ],
            Returns::String,
        ),
        r(
            Stop,
            "POST",
            "/nodes/{node}/qemu/{vmid}/status/stop",
            vec![
                NODE,
                VMID_P,
                opt("keepActive", BOOL),
                opt_c("migratedfrom", STR, Check::Format(Format::PveNode)),
                opt("overrule-shutdown", BOOL),
                opt("skiplock", BOOL),
                opt("timeout", int(0, None)),
            ],
            Returns::String,
        ),
        r(
            Shutdown,
            "POST",
            "/nodes/{node}/qemu/{vmid}/status/shutdown",
            vec![
                NODE,
                VMID_P,
                opt("forceStop", BOOL),
                opt("keepActive", BOOL),
                opt("skiplock", BOOL),
                opt("timeout", int(0, None)),
            ],
            Returns::String,
        ),
        r(
            Clone,
            "POST",
            "/nodes/{node}/qemu/{vmid}/clone",
            vec![
                NODE,
                VMID_P,
                req("newid", VMID),
                opt("bwlimit", int(0, None)),
                opt("description", STR),
                opt_c("format", STR, Check::Enum(&["raw", "qcow2", "vmdk"])),
                opt("full", BOOL),
                opt_c("name", STR, Check::Format(Format::DnsName)),
                pool,
                opt("snapname", STR),
                opt_c("storage", STR, Check::Format(Format::PveStorageId)),
                opt_c("target", STR, Check::Format(Format::PveNode)),
            ],
            Returns::String,
        ),
        r(
            Template,
            "POST",
            "/nodes/{node}/qemu/{vmid}/template",
            vec![NODE, VMID_P, opt_c("disk", STR, Check::Enum(DISKS))],
            Returns::String,
        ),
        r(
            Resize,
            "PUT",
            "/nodes/{node}/qemu/{vmid}/resize",
            vec![
                NODE,
                VMID_P,
                req_c("disk", STR, Check::Enum(DISKS)),
                req_c("size", STR, Check::Pattern(Pattern::DiskSize)),
                opt("digest", STR),
                opt("skiplock", BOOL),
            ],
            Returns::String,
        ),
        r(
            Sendkey,
            "PUT",
            "/nodes/{node}/qemu/{vmid}/sendkey",
            vec![NODE, VMID_P, req("key", STR), opt("skiplock", BOOL)],
            Returns::Null,
        ),
        r(
            AgentNetwork,
            "GET",
            "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces",
            vec![NODE, VMID_P],
            Returns::Object,
        ),
        r(
            AgentOsinfo,
            "GET",
            "/nodes/{node}/qemu/{vmid}/agent/get-osinfo",
            vec![NODE, VMID_P],
            Returns::Object,
        ),
        r(
            AgentPing,
            "POST",
            "/nodes/{node}/qemu/{vmid}/agent/ping",
            vec![NODE, VMID_P],
            Returns::Object,
        ),
        r(
            AgentExec,
            "POST",
            "/nodes/{node}/qemu/{vmid}/agent/exec",
            vec![NODE, VMID_P, req("command", ARRAY), opt("input-data", STR)],
            Returns::Object,
        ),
        r(
            AgentExecStatus,
            "GET",
            "/nodes/{node}/qemu/{vmid}/agent/exec-status",
            vec![NODE, VMID_P, req("pid", INT)],
            Returns::Object,
        ),
        r(
            CloudinitGet,
            "GET",
            "/nodes/{node}/qemu/{vmid}/cloudinit",
            vec![NODE, VMID_P],
            Returns::Array,
        ),
        r(
            CloudinitPut,
            "PUT",
            "/nodes/{node}/qemu/{vmid}/cloudinit",
            vec![NODE, VMID_P],
            Returns::Null,
        ),
        r(
            CloudinitDump,
            "GET",
            "/nodes/{node}/qemu/{vmid}/cloudinit/dump",
            vec![
                NODE,
                VMID_P,
                req_c("type", STR, Check::Enum(&["user", "network", "meta"])),
            ],
            Returns::String,
        ),
        r(
            TaskList,
            "GET",
            "/nodes/{node}/tasks",
            vec![
                NODE,
                opt("errors", BOOL),
                opt("limit", int(0, None)),
                opt("since", INT),
                opt_c("source", STR, Check::Enum(&["archive", "active", "all"])),
                opt("start", int(0, None)),
                opt("statusfilter", STR),
                opt("typefilter", STR),
                opt("until", INT),
                opt("userfilter", STR),
                opt("vmid", VMID),
            ],
            Returns::Array,
        ),
        r(
            NodeStatus,
            "GET",
            "/nodes/{node}/status",
            vec![NODE],
            Returns::Object,
        ),
        r(
            SnapshotList,
            "GET",
            "/nodes/{node}/qemu/{vmid}/snapshot",
            vec![NODE, VMID_P],
            Returns::Array,
        ),
        r(
            SnapshotCreate,
            "POST",
            "/nodes/{node}/qemu/{vmid}/snapshot",
            vec![
                NODE,
                VMID_P,
                SNAPNAME,
                opt("description", STR),
                opt("vmstate", BOOL),
            ],
            Returns::String,
        ),
        r(
            SnapshotDelete,
            "DELETE",
            "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}",
            vec![NODE, VMID_P, SNAPNAME, opt("force", BOOL)],
            Returns::String,
        ),
        r(
            SnapshotRollback,
            "POST",
            "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/rollback",
            vec![NODE, VMID_P, SNAPNAME, opt("start", BOOL)],
            Returns::String,
        ),
        r(
            NodeNetwork,
            "GET",
            "/nodes/{node}/network",
            vec![
                NODE,
                opt_c(
                    "type",
                    STR,
                    Check::Enum(&[
                        "bridge",
                        "bond",
                        "eth",
                        "alias",
                        "vlan",
                        "fabric",
                        "OVSBridge",
                        "OVSBond",
                        "OVSPort",
                        "OVSIntPort",
                        "vnet",
                        "any_bridge",
                        "any_local_bridge",
                        "include_sdn",
                    ]),
                ),
            ],
            Returns::Array,
        ),
        r(
            ClusterStatus,
            "GET",
            "/cluster/status",
            vec![],
            Returns::Array,
        ),
        r(
            Reboot,
            "POST",
            "/nodes/{node}/qemu/{vmid}/status/reboot",
            vec![NODE, VMID_P, opt("timeout", int(0, None))],
            Returns::String,
        ),
        r(
            TaskStatus,
            "GET",
            "/nodes/{node}/tasks/{upid}/status",
            vec![NODE, UPID],
            Returns::Object,
        ),
        r(
            TaskLog,
            "GET",
            "/nodes/{node}/tasks/{upid}/log",
            vec![
                NODE,
                UPID,
                opt("download", BOOL),
                opt("limit", int(0, None)),
                opt("start", int(0, None)),
            ],
            Returns::Array,
        ),
        r(
            TaskStop,
            "DELETE",
            "/nodes/{node}/tasks/{upid}",
            vec![NODE, UPID],
            Returns::Null,
        ),
        r(
            Permissions,
            "GET",
            "/access/permissions",
            vec![
                opt("path", STR),
                opt_c("userid", STR, Check::Pattern(Pattern::AuthId)),
            ],
            Returns::Object,
        ),
        r(
            UserCreate,
            "POST",
            "/access/users",
            vec![
                req_c("userid", STR, Check::Pattern(Pattern::UserId)),
                opt("comment", STR),
                opt("email", STR),
                opt("enable", BOOL),
                opt("expire", int(0, None)),
                opt("firstname", STR),
                opt("groups", STR),
                opt("keys", STR),
                opt("lastname", STR),
                opt("password", STR),
            ],
            Returns::Null,
        ),
        r(
            TokenCreate,
            "POST",
            "/access/users/{userid}/token/{tokenid}",
            vec![
                req_c("userid", STR, Check::Pattern(Pattern::UserId)),
                req_c("tokenid", STR, Check::Pattern(Pattern::TokenName)),
                opt("comment", STR),
                opt("expire", int(0, None)),
                opt("privsep", BOOL),
            ],
            Returns::Object,
        ),
        r(
            AclPut,
            "PUT",
            "/access/acl",
            vec![
                req("path", STR),
                req("roles", STR),
                opt("delete", BOOL),
                opt("groups", STR),
                opt("propagate", BOOL),
                opt("tokens", STR),
                opt("users", STR),
            ],
            Returns::Null,
        ),
        r(
            RoleCreate,
            "POST",
            "/access/roles",
            vec![req("roleid", STR), opt("privs", STR)],
            Returns::Null,
        ),
        r(
            PoolIndex,
            "GET",
            "/pools",
            vec![
                opt_c("poolid", STR, Check::Format(Format::PoolId)),
                opt_c("type", STR, Check::Enum(&["qemu", "lxc", "storage"])),
            ],
            Returns::Array,
        ),
        r(
            PoolCreate,
            "POST",
            "/pools",
            vec![POOLID, opt("comment", STR)],
            Returns::Null,
        ),
        r(PoolUpdate, "PUT", "/pools", pool_update(), Returns::Null),
        r(PoolDelete, "DELETE", "/pools", vec![POOLID], Returns::Null),
        r(
            PoolRead,
            "GET",
            "/pools/{poolid}",
            vec![
                POOLID,
                opt_c("type", STR, Check::Enum(&["qemu", "lxc", "storage"])),
            ],
            Returns::Object,
        ),
        r(
            PoolUpdateById,
            "PUT",
            "/pools/{poolid}",
            pool_update(),
            Returns::Null,
        ),
        r(
            PoolDeleteById,
            "DELETE",
            "/pools/{poolid}",
            vec![POOLID],
            Returns::Null,
        ),
        RouteDef {
            public: true,
            ..r(TicketGet, "GET", "/access/ticket", vec![], Returns::Null)
        },
        RouteDef {
            public: true,
            ..r(
                TicketPost,
                "POST",
                "/access/ticket",
                vec![
                    req("username", STR),
                    req("password", STR),
                    opt("new-format", BOOL),
                    opt("otp", STR),
                    opt("path", STR),
                    opt("privs", STR),
                    opt("realm", STR),
                    opt("tfa-challenge", STR),
                ],
                Returns::Object,
            )
        },
    ]
});

/// The privileges a route's schema asks for (its `permissions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    /// `user => 'world'`: no authentication at all.
    World,
    /// `user => 'all'`: any authenticated identity; the handler filters
    /// or checks more (create, task access).
    All,
    /// `check => ['perm', path, privs]`, with `any` for `'any', 1`.
    Check {
        path: &'static str,
        privs: &'static [&'static str],
        any: bool,
    },
    /// Compound checks (`and`/`or`, `userid-param`, `perm-modify`): the
    /// handler makes them.
    Compound,
}

const CONFIG_PRIVS: &[&str] = &[
    "VM.Config.Disk",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.HWType",
    "VM.Config.Options",
    "VM.Config.Cloudinit",
];

/// `permissions` of each route, as the 9.1 schema has them (the
/// conformance test compares).
pub fn permission(id: RouteId) -> Perm {
    use RouteId::*;
    let vm = |privs: &'static [&'static str]| Perm::Check {
        path: "/vms/{vmid}",
        privs,
        any: false,
    };
    let vm_any = |privs: &'static [&'static str]| Perm::Check {
        path: "/vms/{vmid}",
        privs,
        any: true,
    };
    match id {
        TicketGet | TicketPost => Perm::World,
        Version | ClusterResources | ClusterNextid | Nodes | NodeStorage | QemuList
        | QemuCreate | QemuIndex | TaskList | TaskStatus | TaskLog | TaskStop | Permissions
        | NodeNetwork => Perm::All,
        DownloadUrl | Clone | UserCreate | TokenCreate | AclPut => Perm::Compound,
        PoolIndex => Perm::All,
        PoolCreate | PoolUpdate | PoolDelete | PoolUpdateById | PoolDeleteById => Perm::Check {
            path: "/pool/{poolid}",
            privs: &["Pool.Allocate"],
            any: false,
        },
        PoolRead => Perm::Check {
            path: "/pool/{poolid}",
            privs: &["Pool.Audit"],
            any: false,
        },
        StorageContent => Perm::Check {
            path: "/storage/{storage}",
            privs: &["Datastore.Audit", "Datastore.AllocateSpace"],
            any: true,
        },
        NodeStatus => Perm::Check {
            path: "/nodes/{node}",
            privs: &["Sys.Audit"],
            any: false,
        },
        ClusterStatus => Perm::Check {
            path: "/",
            privs: &["Sys.Audit"],
            any: false,
        },
        RoleCreate => Perm::Check {
            path: "/access",
            privs: &["Sys.Modify"],
            any: false,
        },
        QemuDestroy | Template => vm(&["VM.Allocate"]),
        ConfigGet | Pending | StatusCurrent | CloudinitGet | CloudinitDump | SnapshotList => {
            vm(&["VM.Audit"])
        }
        SnapshotCreate | SnapshotDelete => vm(&["VM.Snapshot"]),
        SnapshotRollback => vm_any(&["VM.Snapshot", "VM.Snapshot.Rollback"]),
        ConfigPost | ConfigPut => vm_any(CONFIG_PRIVS),
        Start | Stop | Shutdown | Reboot => vm(&["VM.PowerMgmt"]),
        Resize => vm(&["VM.Config.Disk"]),
        Sendkey => vm(&["VM.Console"]),
        AgentNetwork | AgentOsinfo | AgentPing => {
            vm_any(&["VM.GuestAgent.Audit", "VM.GuestAgent.Unrestricted"])
        }
        AgentExec | AgentExecStatus => vm(&["VM.GuestAgent.Unrestricted"]),
        CloudinitPut => vm(&["VM.Config.Cloudinit"]),
    }
}

/// Every route the simulator serves.
pub fn routes() -> &'static [RouteDef] {
    &ROUTES
}

/// Path parameters captured by a match, by template name.
pub type Captured = Vec<(&'static str, String)>;

/// Matches `method path` (below `/api2/json`) against the table. `Err(true)`
/// means the path exists with another method.
pub fn find(method: &str, path: &str) -> Result<(&'static RouteDef, Captured), bool> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut path_known = false;
    for route in routes() {
        let template: Vec<&str> = route.path.trim_matches('/').split('/').collect();
        if template.len() != segments.len() {
            continue;
        }
        let mut captured = Vec::new();
        let matched = template.iter().zip(&segments).all(|(t, s)| {
            if let Some(name) = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                captured.push((name, (*s).to_owned()));
                !s.is_empty()
            } else {
                t == s
            }
        });
        if matched {
            if route.method == method {
                return Ok((route, captured));
            }
            path_known = true;
        }
    }
    Err(path_known)
}
