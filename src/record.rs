//! What an apply leaves in the lockfile: generations enter it once built
//! (or found built and stamped), retired templates leave it — each as it
//! happens, so the lockfile never points at a template that is gone. A build
//! result that cannot be recorded is an error, never a silent skip: the
//! template would exist with nothing pointing at it.

use std::path::Path;

use crate::apply::Ledger;
use crate::build::BuildResult;
use crate::desired::{DesiredGraph, DesiredNode};
use crate::ids::{NodeName, Sha256, Vmid};
use crate::lock::{Generation, Lockfile, TemplateReplica};

/// A build result the lockfile cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "image.{image} generation {generation} (VMID {vmid} on {node}) was built but cannot be recorded: {reason}\n  hint: the template stays; fix the cause and run apply again, which records it from its stamp"
)]
pub struct RecordError {
    pub image: String,
    pub generation: u32,
    pub vmid: u32,
    pub node: String,
    pub reason: String,
}

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
        record_build(&mut self.lock, r, replicas).map_err(|e| e.to_string())?;
        self.write()?;
        self.recorded.push(r.clone());
        Ok(())
    }

    fn retired(&mut self, image: &str, generation: u32, node: &str) -> Result<(), String> {
        self.lock.forget_replica(image, generation, node);
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
pub fn record_build(
    lock: &mut Lockfile,
    r: &BuildResult,
    replicas: usize,
) -> Result<(), RecordError> {
    let error = |reason: String| RecordError {
        image: r.image.clone(),
        generation: r.generation,
        vmid: r.vmid,
        node: r.node.clone(),
        reason,
    };
    let hash = |what: &str, hex: &str| {
        hex.parse::<Sha256>()
            .map_err(|e| error(format!("its {what}: {e}")))
    };
    let input_hash = hash("input hash", &r.input_hash)?;
    let iso_sha256 = hash("ISO sha256", &r.iso_sha256)?;
    let node = r
        .node
        .parse::<NodeName>()
        .map_err(|e| error(e.to_string()))?;
    let vmid = Vmid::new(u64::from(r.vmid)).map_err(|e| error(e.to_string()))?;
    lock.record_generation(
        &r.image,
        Generation {
            number: r.generation,
            input_hash,
            iso_sha256,
            built_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            nixos_version: r.nixos_version.clone(),
            system_path: r.system_path.clone(),
            templates: vec![TemplateReplica { node, vmid }],
        },
        replicas,
    );
    Ok(())
}
