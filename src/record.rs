//! What an apply leaves in the lockfile: generations enter it once built
//! (or found built and stamped), retired templates leave it, adoptions
//! whose stamp apply wrote leave `[adopt]` — each as it happens, so the
//! lockfile never points at a template that is gone. A build result holds
//! only checked values (VMID, node, checksums), so it can always be
//! recorded; a lockfile that cannot be written fails the change instead of
//! being skipped.

use std::path::Path;

use crate::apply::Ledger;
use crate::build::BuildResult;
use crate::desired::{DesiredGraph, DesiredNode};
use crate::lock::{Generation, Lockfile, TemplateReplica};
use crate::plan::{Change, Work};

/// The lockfile as apply moves it: each build is recorded (and the file
/// written) the moment it finishes, each retired template forgotten the
/// moment it is gone — before any change that depends on them starts.
pub struct LockLedger<'a> {
    lock: Lockfile,
    path: &'a Path,
    locked: bool,
    desired: &'a DesiredGraph,
    /// What was recorded, in order.
    pub recorded: Vec<BuildResult>,
}

impl<'a> LockLedger<'a> {
    /// A ledger over `lock` (the plan's lockfile), written to `path`;
    /// under `locked` any change to the file is an error.
    pub fn new(lock: Lockfile, path: &'a Path, locked: bool, desired: &'a DesiredGraph) -> Self {
        LockLedger {
            lock,
            path,
            locked,
            desired,
            recorded: Vec::new(),
        }
    }

    fn write(&self) -> Result<(), String> {
        self.lock
            .write(self.path, self.locked)
            .map(|_| ())
            .map_err(|e| with_causes(&e))
    }
}

impl Ledger for LockLedger<'_> {
    fn built(&mut self, r: &BuildResult) -> Result<(), String> {
        let replicas = replicas_of(self.desired, &r.image, r.generation);
        record_build(&mut self.lock, r, replicas);
        self.write()?;
        self.recorded.push(r.clone());
        Ok(())
    }

    fn done(&mut self, change: &Change) -> Result<(), String> {
        match &change.work {
            Work::DestroyTemplate {
                image,
                generation,
                node,
                ..
            } => self.lock.forget_replica(image, *generation, node),
            Work::UpdateVm(w) if w.adopt => {
                crate::plan::adopt::settle(&mut self.lock, &[change.address.to_string().as_str()])
            }
            _ => return Ok(()),
        }
        self.write()
    }
}

/// An error and its causes, on one line each.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    text
}

/// Nodes that must hold a replica of `image`'s generation `generation`.
fn replicas_of(desired: &DesiredGraph, image: &str, generation: u32) -> usize {
    desired
        .graph
        .node_weights()
        .filter(|n| matches!(n, DesiredNode::Template(t) if t.image == image && t.generation.number() == generation))
        .count()
}

/// Records one built replica of a generation.
pub fn record_build(lock: &mut Lockfile, r: &BuildResult, replicas: usize) {
    lock.record_generation(
        &r.image,
        Generation {
            number: r.generation,
            input_hash: r.input_hash,
            iso_sha256: Some(r.iso_sha256),
            built_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            nixos_version: r.nixos_version.clone(),
            system_path: r.system_path.clone(),
            templates: vec![TemplateReplica {
                node: r.node.clone(),
                vmid: r.vmid,
            }],
            imported: false,
        },
        replicas,
    );
}
