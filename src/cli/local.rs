//! The commands that read no cluster: `validate`, `graph` (the desired
//! graph), `render` and `lock`.

use std::path::Path;

use super::{Failure, GraphFormat, Output, load_checked};
use crate::desired::{self, DesiredGraph};
use crate::fleet::LoadedFleet;
use crate::lock::Lockfile;
use crate::nixos;

/// `validate`: the fleet file's contracts and semantic checks.
pub(super) fn validate(path: &Path, lock: &Path, out: &Output) -> Result<u8, Failure> {
    let (loaded, _lock) = load_checked(path, lock)?;
    let f = &loaded.fleet;
    if out.json {
        println!(
            "{:#}",
            serde_json::json!({
                "ok": true,
                "fleet": f.fleet,
                "isos": f.isos.len(),
                "images": f.images.len(),
                "vms": f.vms.len(),
            })
        );
    } else if !out.quiet {
        println!(
            "{}: fleet `{}` is valid ({} ISO{}, {} image{}, {} VM{})",
            loaded.path.display(),
            f.fleet,
            f.isos.len(),
            plural(f.isos.len()),
            f.images.len(),
            plural(f.images.len()),
            f.vms.len(),
            plural(f.vms.len())
        );
    }
    warn_insecure(&loaded, out);
    Ok(0)
}

/// `graph`: the desired graph as DOT, text or JSON.
pub(super) fn graph(
    path: &Path,
    lock: &Path,
    format: GraphFormat,
    out: &Output,
) -> Result<u8, Failure> {
    let (loaded, lock) = load_checked(path, lock)?;
    let desired = desired::build(&loaded.fleet, &lock)?;
    note_lock_drift(&desired, &lock, out);
    if out.json {
        println!("{:#}", graph_json(&desired));
    } else {
        match format {
            GraphFormat::Dot => print!("{}", desired.to_dot()),
            GraphFormat::Text => print!("{}", desired.to_text()),
        }
    }
    Ok(0)
}

/// `render`: an image's configuration.nix and install script.
pub(super) fn render(path: &Path, lock: &Path, image: &str, out: &Output) -> Result<u8, Failure> {
    let (loaded, _lock) = load_checked(path, lock)?;
    let Some(spec) = loaded.fleet.images.get(image) else {
        let known: Vec<&str> = loaded.fleet.images.keys().map(String::as_str).collect();
        return Err(Failure::Message(format!(
            "image `{image}` is not in {}\n  hint: images in this fleet: {}",
            loaded.path.display(),
            if known.is_empty() {
                "(none)".to_owned()
            } else {
                known.join(", ")
            }
        )));
    };
    let configuration = nixos::configuration_nix(image, spec);
    let script = nixos::install_script(image, spec);
    if out.json {
        println!(
            "{:#}",
            serde_json::json!({ "image": image, "configuration_nix": configuration, "install_script": script })
        );
    } else {
        println!(
            "# ===== configuration.nix =====\n{configuration}\n# ===== install.sh =====\n{script}"
        );
    }
    Ok(0)
}

/// `lock`: bring the lockfile up to date with the fleet (VMID allocations).
pub(super) fn lock(path: &Path, lock: &Path, locked: bool, out: &Output) -> Result<u8, Failure> {
    let (loaded, current) = load_checked(path, lock)?;
    let desired = desired::build(&loaded.fleet, &current)?;
    let changed = desired.lock.write(lock, locked)?;
    let unresolved = unresolved_isos(&desired);
    if out.json {
        println!(
            "{:#}",
            serde_json::json!({ "ok": true, "changed": changed, "lockfile": lock, "unpinned_isos": unresolved })
        );
    } else {
        out.info(&format!(
            "{}: {}",
            lock.display(),
            if changed { "updated" } else { "up to date" }
        ));
        for iso in unresolved {
            out.info(&format!("note: {iso} is not pinned yet"));
        }
    }
    Ok(0)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn warn_insecure(loaded: &LoadedFleet, out: &Output) {
    if loaded.fleet.proxmox.tls.insecure {
        out.info(
            "warning: proxmox.tls.insecure is set: the Proxmox certificate will NOT be verified",
        );
    }
}

fn unresolved_isos(desired: &DesiredGraph) -> Vec<String> {
    let mut names: Vec<String> = desired
        .graph
        .node_weights()
        .filter_map(|n| match n {
            desired::DesiredNode::Iso(iso) => match &iso.pin {
                desired::IsoPinState::Unresolved { source } => {
                    Some(format!("iso.{} ({source})", iso.name))
                }
                desired::IsoPinState::Pinned { .. } => None,
            },
            _ => None,
        })
        .collect();
    names.dedup();
    names
}

fn note_lock_drift(desired: &DesiredGraph, lock: &Lockfile, out: &Output) {
    if desired.lock.vmids != lock.vmids {
        out.info("note: VMIDs marked (allocated) are not in the lockfile yet; `nixgold lock` records them");
    }
}

fn graph_json(desired: &DesiredGraph) -> serde_json::Value {
    let g = &desired.graph;
    let nodes: Vec<serde_json::Value> = g
        .node_indices()
        .map(|i| {
            let mut v = serde_json::to_value(&g[i]).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("address".into(), g[i].address().into());
            }
            v
        })
        .collect();
    let edges: Vec<serde_json::Value> = g
        .edge_indices()
        .filter_map(|e| g.edge_endpoints(e))
        .map(|(a, b)| serde_json::json!({ "from": g[a].address(), "to": g[b].address() }))
        .collect();
    serde_json::json!({ "nodes": nodes, "edges": edges })
}
