//! What an apply leaves in the lockfile: generations enter it once built
//! (or found built and stamped), retired templates leave it. A build
//! result that cannot be recorded is an error, never a silent skip: the
//! template would exist with nothing pointing at it.

use crate::apply::{Outcome, Report};
use crate::build::BuildResult;
use crate::desired::{DesiredGraph, DesiredNode};
use crate::ids::{NodeName, Sha256, Vmid};
use crate::lock::{Generation, Lockfile, TemplateReplica};
use crate::plan::{Plan, Work};

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

/// Applies `report`'s outcome to `lock` (the plan's lockfile): retired
/// templates are forgotten, built and adopted generations recorded.
/// Returns the results recorded.
pub fn record_outcome<'a>(
    lock: &mut Lockfile,
    plan: &'a Plan,
    report: &'a Report,
    desired: &DesiredGraph,
) -> Result<Vec<&'a BuildResult>, RecordError> {
    for change in &plan.changes {
        let Work::DestroyTemplate {
            image,
            generation,
            node,
            ..
        } = &change.work
        else {
            continue;
        };
        let done = report
            .changes
            .iter()
            .any(|r| r.address == change.address && r.outcome == Outcome::Done);
        if done {
            lock.forget_replica(image, *generation, node);
        }
    }
    let built: Vec<&BuildResult> = plan
        .adopted
        .iter()
        .chain(report.changes.iter().filter_map(|c| c.built.as_ref()))
        .collect();
    for r in &built {
        record_build(lock, r, replicas_of(desired, &r.image, r.generation))?;
    }
    Ok(built)
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
