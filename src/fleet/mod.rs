//! The fleet file: what the user wrote, as typed Rust values.
//!
//! The shapes here mirror `schema/fleet.ncl` field for field. The Nickel
//! contract fills every default before the value reaches serde, so nothing
//! here carries a serde default: a field that is missing at this point is a
//! schema/model mismatch and fails loudly (`deny_unknown_fields` catches the
//! other direction). Loading lives in [`load`], cross-field checks in
//! [`validate`].

pub mod load;
mod schema_check;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::ids::{DiskSize, HumanDuration, NodeName, Sha256, Vmid, VmidRange};

pub use load::{FleetError, load, name_or_stem};

/// A loaded fleet file plus where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedFleet {
    pub path: PathBuf,
    pub fleet: Fleet,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// `$schema`, for editors; nixgold ignores it.
    #[serde(rename = "$schema")]
    pub json_schema: Option<String>,
    pub fleet: String,
    pub proxmox: Proxmox,
    pub vm_vmid_range: Option<VmidRange>,
    /// How long apply waits for one Proxmox task.
    pub task_timeout: HumanDuration,
    /// How VMs following new generations are replaced (all at once without).
    pub rollout: Option<Rollout>,
    pub isos: BTreeMap<String, Iso>,
    pub images: BTreeMap<String, Image>,
    pub vms: BTreeMap<String, Vm>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proxmox {
    pub endpoint: String,
    pub nodes: Vec<NodeName>,
    pub shared_storages: Vec<String>,
    pub token: Option<SecretRef>,
    pub username: Option<String>,
    pub password: Option<SecretRef>,
    pub tls: Tls,
}

impl Proxmox {
    /// The node used when a resource does not name one.
    pub fn default_node(&self) -> &NodeName {
        &self.nodes[0]
    }

    pub fn is_shared(&self, storage: &str) -> bool {
        self.shared_storages.iter().any(|s| s == storage)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub ca_file: Option<PathBuf>,
    pub fingerprint: Option<Sha256>,
    pub insecure: bool,
    pub allow_insecure: bool,
}

/// Where a secret is read at run time. The secret itself never enters the
/// fleet model.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum SecretRef {
    Env { env: String },
    File { file: PathBuf },
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretRef::Env { env } => write!(f, "env:{env}"),
            SecretRef::File { file } => write!(f, "file:{}", file.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Iso {
    Channel {
        channel: String,
        arch: String,
        storage: String,
    },
    Url {
        url: String,
        checksum: Checksum,
        storage: String,
    },
}

impl Iso {
    pub fn storage(&self) -> &str {
        match self {
            Iso::Channel { storage, .. } | Iso::Url { storage, .. } => storage,
        }
    }

    /// Where the pin comes from, as recorded in the lockfile.
    /// A URL with a literal sha256 is pinned by the fleet itself; channels
    /// and `file:` checksums are resolved into the lockfile.
    pub fn pinned_by_fleet(&self) -> bool {
        matches!(
            self,
            Iso::Url {
                checksum: Checksum::Sha256(_),
                ..
            }
        )
    }

    pub fn source(&self) -> String {
        match self {
            Iso::Channel { channel, arch, .. } => format!("channel:{channel}/{arch}"),
            Iso::Url { url, .. } => format!("url:{url}"),
        }
    }
}

/// An ISO checksum as written in the fleet: the digest itself, or a URL of
/// a sha256sum-style file (Packer's `file:` convention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    Sha256(Sha256),
    File(String),
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        if let Some(hex) = raw.strip_prefix("sha256:") {
            hex.parse()
                .map(Checksum::Sha256)
                .map_err(serde::de::Error::custom)
        } else if let Some(url) = raw.strip_prefix("file:") {
            Ok(Checksum::File(url.to_owned()))
        } else {
            Err(serde::de::Error::custom(format!(
                "checksum {raw:?} must start with sha256: or file:"
            )))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub iso: String,
    pub build_node: Option<NodeName>,
    pub vmid_range: VmidRange,
    pub hardware: Hardware,
    pub nixos: NixosConfig,
    pub build: Build,
    pub rebuild: Rebuild,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    pub cores: u32,
    pub sockets: u32,
    pub memory: u64,
    pub disk: DiskSize,
    pub storage: String,
    pub cpu: String,
    pub bridge: String,
    pub vlan: Option<u16>,
    pub bios: Bios,
    pub machine: String,
    pub scsihw: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bios {
    Ovmf,
    Seabios,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NixosConfig {
    pub state_version: String,
    pub timezone: String,
    pub locale: String,
    pub packages: Vec<String>,
    pub users: BTreeMap<String, User>,
    pub network: ImageNetwork,
    pub openssh: Openssh,
    pub guest_agent: bool,
    pub cloud_init: bool,
    pub firewall: Firewall,
    pub extra_config: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub ssh_keys: Vec<String>,
    pub groups: Vec<String>,
    pub shell: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum ImageNetwork {
    Dhcp {
        dhcp: bool,
    },
    Static {
        interface: String,
        address: Ipv4Net,
        gateway: Ipv4Addr,
        dns: Vec<Ipv4Addr>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Openssh {
    pub enable: bool,
    pub password_authentication: bool,
    pub permit_root_login: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Firewall {
    pub enable: bool,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    pub boot_wait: HumanDuration,
    pub timeout: HumanDuration,
    pub timeouts: StepTimeouts,
    pub key_interval_ms: u32,
    pub address: BuildAddress,
}

/// A deadline per build step (`build.timeouts`); carried into the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepTimeouts {
    pub create: HumanDuration,
    pub start: HumanDuration,
    pub access: HumanDuration,
    pub install: HumanDuration,
    pub reboot: HumanDuration,
    pub verify: HumanDuration,
    pub seal: HumanDuration,
    pub power_off: HumanDuration,
    pub template: HumanDuration,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum BuildAddress {
    CallHome { call_home: CallHome },
    Static { r#static: StaticBuildAddress },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallHome {
    pub listen: String,
    pub advertise: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticBuildAddress {
    pub address: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub ssh_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rebuild {
    pub every_days: Option<u32>,
    pub keep: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub image: String,
    pub vmid: Option<Vmid>,
    pub node: Option<NodeName>,
    pub cores: Option<u32>,
    pub memory: Option<u64>,
    pub disk: Option<DiskSize>,
    pub storage: Option<String>,
    pub clone: CloneMode,
    pub network: VmNetwork,
    pub user: Option<String>,
    pub ssh_keys: Vec<String>,
    pub password: Option<SecretRef>,
    pub tags: Vec<String>,
    pub onboot: bool,
    pub start: bool,
    pub description: String,
    pub on_new_generation: OnNewGeneration,
    pub prevent_destroy: bool,
    pub restart_on_change: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneMode {
    Full,
    Linked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNewGeneration {
    Keep,
    Replace,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum VmNetwork {
    Dhcp {
        dhcp: bool,
        bridge: Option<String>,
        vlan: Option<u16>,
    },
    Static {
        ip: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        dns: Vec<Ipv4Addr>,
        search_domain: Option<String>,
        bridge: Option<String>,
        vlan: Option<u16>,
    },
}

/// Nodes that need a template of `image`: where it is built, plus every node
/// that runs a clone of it when its storage is node-local.
pub fn image_nodes(fleet: &Fleet, image: &str) -> Vec<NodeName> {
    let Some(spec) = fleet.images.get(image) else {
        return Vec::new();
    };
    let build_node = spec
        .build_node
        .clone()
        .unwrap_or_else(|| fleet.proxmox.default_node().clone());
    let mut nodes = vec![build_node];
    if !fleet.proxmox.is_shared(&spec.hardware.storage) {
        for vm in fleet.vms.values().filter(|vm| vm.image == image) {
            let node = vm
                .node
                .clone()
                .unwrap_or_else(|| fleet.proxmox.default_node().clone());
            if !nodes.contains(&node) {
                nodes.push(node);
            }
        }
    }
    nodes.sort();
    nodes
}

/// `rollout`: batches and the health gates between them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub batch: BatchSize,
    pub pause: Option<HumanDuration>,
    pub gates: Gates,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum BatchSize {
    Count { count: u32 },
    Percent { percent: u8 },
}

impl BatchSize {
    /// VMs per batch when `total` VMs are replaced (at least one).
    pub fn of(self, total: usize) -> usize {
        match self {
            BatchSize::Count { count } => count as usize,
            BatchSize::Percent { percent } => (total * usize::from(percent)).div_ceil(100),
        }
        .max(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    pub agent: Option<AgentGate>,
    pub tcp: Option<TcpGate>,
    pub http: Option<HttpGate>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentGate {
    pub timeout: HumanDuration,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TcpGate {
    pub port: u16,
    pub timeout: HumanDuration,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpGate {
    pub port: u16,
    pub path: String,
    pub timeout: HumanDuration,
}
