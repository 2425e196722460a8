//! `show`: a saved plan (`show PLANFILE`), or the managed state the
//! lockfile records (`show`), as text or — with `--json` — in the shape of
//! `terraform show -json` (a plan as in [`crate::plan_json`]; the state as
//! `values.root_module.resources[]`). Reads files only: it never connects
//! to the cluster.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

use super::{Failure, Global, Output};
use crate::lock::Lockfile;
use crate::plan::saved::SavedPlan;

/// `show [PATH]`: a saved plan, or the state of a fleet (its lockfile).
pub(super) fn dispatch(g: &Global, path: Option<&Path>, out: &Output) -> Result<u8, Failure> {
    let path = path.or(g.fleet.as_deref());
    match path.map(|p| (p, SavedPlan::read(p).is_some())) {
        Some((plan, true)) => saved_plan(plan, out),
        Some((fleet, false)) => state(&g.lock_for(fleet, out), out),
        None => match &g.lock {
            Some(lock) => state(lock, out),
            None => Err(Failure::Message(
                "no saved plan, fleet file or lockfile given\n  hint: nixgold show PLANFILE, nixgold show FLEET, or --lock FILE".into(),
            )),
        },
    }
}

/// Prints the saved plan at `path`.
pub fn saved_plan(path: &Path, out: &Output) -> Result<u8, Failure> {
    let Some(saved) = SavedPlan::read(path) else {
        return Err(Failure::Message(format!(
            "{} is not a plan saved by `nixgold plan --out`",
            path.display()
        )));
    };
    let saved = saved?;
    if out.json {
        let mut value = crate::plan_json::plan_json(&saved.plan);
        value["nixgold"]["saved"] = json!({
            "fleet_path": saved.fleet_path,
            "lock_path": saved.lock_path,
            "target": saved.target,
        });
        println!("{value:#}");
    } else {
        print!(
            "{}",
            crate::render::plan_text(&saved.plan, out.color_stdout)
        );
        if let Some(target) = &saved.target {
            println!(
                "\nSaved for {target}; apply it with `{}`.",
                target.apply_command(path)
            );
        }
    }
    Ok(0)
}

/// Prints the managed state recorded in the lockfile at `lock_path`.
pub fn state(lock_path: &Path, out: &Output) -> Result<u8, Failure> {
    if !lock_path.exists() {
        return Err(Failure::Message(format!(
            "no lockfile at {}: nothing is managed yet\n  hint: `nixgold show PLANFILE` shows a saved plan; `--lock FILE` (or --sim) picks another lockfile",
            lock_path.display()
        )));
    }
    let lock = Lockfile::read(lock_path)?;
    if out.json {
        let value = json!({
            "format_version": crate::plan_json::FORMAT_VERSION,
            "nixgold_version": env!("CARGO_PKG_VERSION"),
            "fleet": lock.fleet,
            "values": { "root_module": { "resources": resources(&lock) } },
        });
        println!("{value:#}");
    } else {
        print!("{}", state_text(&lock, lock_path));
    }
    Ok(0)
}

fn resource(address: String, kind: &str, name: &str, values: Value) -> Value {
    json!({ "address": address, "mode": "managed", "type": format!("nixgold_{kind}"), "name": name, "values": values })
}

fn resources(lock: &Lockfile) -> Vec<Value> {
    let isos = lock.isos.iter().map(|(name, pin)| {
        let values = json!({ "source": pin.source, "url": pin.url, "sha256": pin.sha256, "nixpkgs_revision": pin.nixpkgs_revision, "resolved_at": pin.resolved_at });
        resource(format!("iso.{name}"), "iso", name, values)
    });
    let images = lock.images.iter().map(|(name, image)| {
        let generations: Vec<Value> = image
            .generations
            .iter()
            .map(|g| json!({ "number": g.number, "input_hash": g.input_hash, "iso_sha256": g.iso_sha256, "built_at": g.built_at, "nixos_version": g.nixos_version, "system_path": g.system_path, "imported": g.imported, "templates": g.templates.iter().map(|t| json!({ "node": t.node, "vmid": t.vmid })).collect::<Vec<_>>() }))
            .collect();
        let values = json!({ "current": image.current, "hold": image.hold, "generations": generations });
        resource(format!("image.{name}"), "image", name, values)
    });
    let vms = lock.vmids.iter().map(|(address, vmid)| {
        let name = address.strip_prefix("vm.").unwrap_or(address);
        resource(address.clone(), "vm", name, json!({ "vmid": vmid }))
    });
    isos.chain(images).chain(vms).collect()
}

fn state_text(lock: &Lockfile, path: &Path) -> String {
    let mut out = format!("# state of fleet `{}` ({})\n", lock.fleet, path.display());
    for (name, pin) in &lock.isos {
        let _ = writeln!(
            out,
            "\niso.{name}:\n  url    = {}\n  sha256 = {}",
            pin.url, pin.sha256
        );
    }
    for (name, image) in &lock.images {
        let held = if image.hold.is_some() {
            " (held by `nixgold rollback`; `nixgold release` ends it)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "\nimage.{name}: current generation {}{held}",
            image.current
        );
        for g in &image.generations {
            let templates: Vec<String> = g
                .templates
                .iter()
                .map(|t| format!("{} on {}", t.vmid, t.node))
                .collect();
            let _ = writeln!(
                out,
                "  generation {}: NixOS {}, built {}, template {}",
                g.number,
                g.nixos_version,
                g.built_at,
                templates.join(", ")
            );
        }
    }
    if !lock.vmids.is_empty() {
        out.push('\n');
    }
    for (address, vmid) in &lock.vmids {
        let _ = writeln!(out, "{address}: VMID {vmid}");
    }
    out
}
