//! The change types of a plan: what a change does (action, impact, field
//! diffs) and what apply must do for it (work).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::address::Address;
use crate::fleet::SecretRef;
use crate::ids::{NodeName, Sha256, Vmid};

/// The kind of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    Replace,
    Destroy,
}

impl Action {
    pub fn symbol(self) -> &'static str {
        match self {
            Action::Create => "+",
            Action::Update => "~",
            Action::Replace => "-/+",
            Action::Destroy => "-",
        }
    }

    pub fn is_destructive(self) -> bool {
        matches!(self, Action::Replace | Action::Destroy)
    }
}

/// What a change does to a running system, worst first when combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Impact {
    None,
    Hotplug,
    NeedsReboot,
    /// Shut down and started by apply (`restart_on_change`).
    Restart,
    Replace,
    DataLoss,
}

impl Impact {
    pub fn describe(self) -> &'static str {
        match self {
            Impact::None => "no impact",
            Impact::Hotplug => "applied live",
            Impact::NeedsReboot => "needs a reboot to take effect",
            Impact::Restart => "the VM is shut down and started to apply it",
            Impact::Replace => "replaces the VM",
            Impact::DataLoss => "destroys data",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldDiff {
    pub field: String,
    pub before: Option<String>,
    pub after: Option<String>,
    /// Rendered as `(sensitive)`; the value is never in the plan.
    pub sensitive: bool,
}

/// What kind of work a change is: a label for people (render and `graph
/// --plan` group by it), never a barrier — apply starts a change as soon as
/// the changes it depends on are done. Every edge of a plan goes from an
/// earlier phase to a later one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    DestroyVms,
    DownloadIsos,
    BuildGenerations,
    Vms,
    RetireGenerations,
}

impl Phase {
    /// 1-based, in the order the phases' changes can run.
    pub fn number(self) -> usize {
        self as usize + 1
    }

    pub fn describe(self) -> &'static str {
        match self {
            Phase::DestroyVms => "destroy VMs",
            Phase::DownloadIsos => "download ISOs",
            Phase::BuildGenerations => "build generations",
            Phase::Vms => "clone and configure VMs",
            Phase::RetireGenerations => "retire old generations",
        }
    }
}

impl Change {
    pub fn phase(&self) -> Phase {
        match &self.work {
            Work::DestroyVm { .. } => Phase::DestroyVms,
            Work::DownloadIso { .. } => Phase::DownloadIsos,
            Work::BuildTemplate { .. } => Phase::BuildGenerations,
            Work::CreateVm(_)
            | Work::UpdateVm(_)
            | Work::ReplaceVm { .. }
            | Work::AdoptTemplate { .. } => Phase::Vms,
            Work::DestroyTemplate { .. } => Phase::RetireGenerations,
        }
    }
}

/// What apply must do, completely decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Work {
    DownloadIso {
        node: NodeName,
        storage: String,
        url: String,
        filename: String,
        sha256: Sha256,
    },
    CreateVm(VmWork),
    UpdateVm(VmWork),
    ReplaceVm {
        old_node: NodeName,
        new: VmWork,
    },
    DestroyVm {
        vmid: Vmid,
        node: NodeName,
    },
    /// Remove a template of a generation beyond `rebuild.keep`.
    DestroyTemplate {
        image: String,
        generation: u32,
        vmid: Vmid,
        node: NodeName,
    },
    /// Write the stamp and tags into an imported template (its config
    /// otherwise stays as it is).
    AdoptTemplate {
        image: String,
        vmid: Vmid,
        node: NodeName,
        set: BTreeMap<String, String>,
        digest: String,
    },
    /// Build one generation of an image on one node.
    BuildTemplate {
        build: Box<crate::build::BuildWork>,
        /// A leftover build VM of an interrupted or failed build holds the
        /// VMID: destroy it first.
        cleanup_first: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmWork {
    pub vmid: Vmid,
    pub node: NodeName,
    pub name: String,
    pub template_vmid: Vmid,
    pub template_node: NodeName,
    pub full_clone: bool,
    /// Target storage of a full clone.
    pub storage: Option<String>,
    /// Config keys to write (all on create; the changed ones on update).
    pub set: BTreeMap<String, String>,
    /// The password reference to resolve at apply time, when it must be set.
    pub password: Option<SecretRef>,
    /// Grow `scsi0` to this size (`40G`).
    pub resize: Option<String>,
    pub start: bool,
    /// Shut down and start a running VM so its pending changes apply.
    #[serde(default)]
    pub restart: bool,
    /// The digest the update was planned against.
    pub digest: Option<String>,
    /// An update that adopts an imported VM: the write goes ahead on the
    /// unstamped VM the plan read (its digest guards it).
    #[serde(default)]
    pub adopt: bool,
}

/// A node of the plan's DAG: one change to one address, and the changes of
/// the same plan it waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub address: Address,
    pub action: Action,
    /// Changes of this plan that must be done before this one starts; a
    /// failed one skips this one.
    pub depends_on: Vec<Address>,
    pub fields: Vec<FieldDiff>,
    pub reason: String,
    pub impact: Impact,
    pub work: Work,
    /// Attributes an update leaves as they are, so that `plan --json` shows
    /// the whole resource before and after (terraform's `before`/`after`);
    /// the text plan shows only `fields`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unchanged: BTreeMap<String, String>,
}
