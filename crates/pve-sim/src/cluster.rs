//! The simulated cluster's hardware: nodes, storages and bridges, plus VMs
//! that exist before anything else happens. Read from a JSON file given to
//! `nixgold sim serve --cluster`, or [`ClusterSpec::default`], which fits
//! the example fleets (node `pve`, `local` for ISOs, `tank` for disks,
//! bridge `vmbr0`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Datacenter-wide settings.
    #[serde(default)]
    pub cluster_name: Option<String>,
    pub nodes: Vec<NodeSpec>,
    pub storages: Vec<StorageSpec>,
    /// VMs and templates present from the start.
    #[serde(default)]
    pub vms: Vec<VmSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Bytes of RAM.
    #[serde(default = "default_memory")]
    pub memory: u64,
    #[serde(default = "default_bridges")]
    pub bridges: Vec<String>,
}

fn default_cpus() -> u32 {
    16
}
fn default_memory() -> u64 {
    64 << 30
}
fn default_bridges() -> Vec<String> {
    vec!["vmbr0".to_owned()]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSpec {
    pub id: String,
    /// Plugin type: dir, nfs, cephfs (file based) or lvmthin, zfspool, rbd, lvm.
    pub plugin: String,
    /// Content types: images, iso, vztmpl, backup, snippets, import, rootdir.
    pub content: Vec<String>,
    #[serde(default)]
    pub shared: bool,
    /// Capacity in bytes (per node for local storage).
    pub capacity: u64,
    /// Nodes that have this storage; all when absent.
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
    /// A zfspool's `sparse` option (pve-storage `ZFSPoolPlugin.pm`):
    /// volumes are created without a reservation (`zfs create -s`).
    #[serde(default)]
    pub sparse: bool,
}

impl StorageSpec {
    pub fn is_file_based(&self) -> bool {
        matches!(
            self.plugin.as_str(),
            "dir" | "nfs" | "cephfs" | "cifs" | "glusterfs"
        )
    }

    /// Thin storage over-commits: volumes take space as data is written.
    /// LVM-thin, RBD and files always; ZFS only when `sparse`; plain LVM
    /// and ZFS reserve the whole size.
    pub fn is_thin(&self) -> bool {
        match self.plugin.as_str() {
            "lvm" => false,
            "zfspool" => self.sparse,
            _ => true,
        }
    }

    /// Linked clones need copy-on-write: thin LVM, ZFS, RBD, or qcow2 files.
    pub fn supports_linked_clone(&self) -> bool {
        self.plugin != "lvm"
    }

    pub fn on_node(&self, node: &str) -> bool {
        self.nodes
            .as_ref()
            .is_none_or(|n| n.iter().any(|x| x == node))
    }

    pub fn has_content(&self, content: &str) -> bool {
        self.content.iter().any(|c| c == content)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub vmid: u32,
    pub node: String,
    /// Config keys as they would be sent to create (`name`, `memory`,
    /// `scsi0 = "tank:32"`, …); disks are allocated as on create.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub template: bool,
    #[serde(default)]
    pub running: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            cluster_name: None,
            nodes: vec![NodeSpec {
                name: "pve".to_owned(),
                cpus: default_cpus(),
                memory: default_memory(),
                bridges: default_bridges(),
            }],
            storages: vec![
                StorageSpec {
                    id: "local".to_owned(),
                    plugin: "dir".to_owned(),
                    content: ["iso", "vztmpl", "backup", "snippets", "import"]
                        .map(String::from)
                        .to_vec(),
                    shared: false,
                    capacity: 100 << 30,
                    nodes: None,
                    sparse: false,
                },
                StorageSpec {
                    id: "local-lvm".to_owned(),
                    plugin: "lvmthin".to_owned(),
                    content: ["images", "rootdir"].map(String::from).to_vec(),
                    shared: false,
                    capacity: 200 << 30,
                    nodes: None,
                    sparse: false,
                },
                StorageSpec {
                    id: "tank".to_owned(),
                    plugin: "zfspool".to_owned(),
                    content: ["images", "rootdir"].map(String::from).to_vec(),
                    shared: false,
                    capacity: 2 << 40,
                    nodes: None,
                    sparse: false,
                },
            ],
            vms: Vec::new(),
        }
    }
}

impl ClusterSpec {
    /// `count` nodes named `pve1`… with the default storages plus one shared
    /// Ceph pool; what the scale tests and benchmarks use.
    pub fn with_nodes(count: usize) -> Self {
        let mut spec = ClusterSpec::default();
        let template = spec.nodes[0].clone();
        spec.nodes = (1..=count)
            .map(|i| NodeSpec {
                name: format!("pve{i}"),
                ..template.clone()
            })
            .collect();
        spec.storages.push(StorageSpec {
            id: "ceph".to_owned(),
            plugin: "rbd".to_owned(),
            content: ["images", "rootdir"].map(String::from).to_vec(),
            shared: true,
            capacity: 100 << 40,
            nodes: None,
            sparse: false,
        });
        spec
    }

    pub fn storage(&self, id: &str) -> Option<&StorageSpec> {
        self.storages.iter().find(|s| s.id == id)
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }
}
