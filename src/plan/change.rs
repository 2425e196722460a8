//! The change types of a plan: what a change does (action, impact, field
//! diffs) and what apply must do for it (work).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::fleet::SecretRef;

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

/// What apply must do, completely decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Work {
    DownloadIso {
        node: String,
        storage: String,
        url: String,
        filename: String,
        sha256: String,
    },
    CreateVm(VmWork),
    UpdateVm(VmWork),
    ReplaceVm {
        old_node: String,
        new: VmWork,
    },
    DestroyVm {
        vmid: u32,
        node: String,
    },
    /// Remove a template of a generation beyond `rebuild.keep`.
    DestroyTemplate {
        image: String,
        generation: u32,
        vmid: u32,
        node: String,
        /// The build of this image in the same plan, which must succeed first.
        after: Option<String>,
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
    pub vmid: u32,
    pub node: String,
    pub name: String,
    pub template_vmid: u32,
    pub template_node: String,
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
    /// Addresses of changes this one waits for (ISO, template).
    pub after: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub address: String,
    pub action: Action,
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
