//! VM snapshots as pve-guest-common's `AbstractConfig.pm` keeps them: a
//! `[name]` section per snapshot holding the config as it was, its
//! `snaptime` and its `parent`, and the VM's `parent` naming the snapshot
//! it runs on. The listing is qemu-server `API2/Qemu.pm` `snapshot_list`.
//! Disk contents are not modelled: a rollback restores the config.

use serde_json::{Value, json};

use crate::config::{Snapshot, VmConfig};
use crate::state::{State, now_ms};

/// `snapshot_list`: every snapshot, then `current` ("You are here!").
pub fn list(config: &VmConfig, running: bool) -> Value {
    let mut rows: Vec<Value> = config
        .snapshots
        .iter()
        .map(|(name, s)| {
            let mut row = json!({
                "name": name, "snaptime": s.snaptime, "vmstate": u8::from(s.vmstate),
                "description": s.description,
            });
            if let Some(parent) = &s.parent {
                row["parent"] = json!(parent);
            }
            row
        })
        .collect();
    let mut current = json!({
        "name": "current", "digest": config.digest(), "running": u8::from(running),
        "description": "You are here!",
    });
    if let Some(parent) = config.get("parent") {
        current["parent"] = json!(parent);
    }
    rows.push(current);
    Value::Array(rows)
}

fn vm_config(state: &mut State, vmid: u32) -> Result<&mut VmConfig, String> {
    state
        .vms
        .get_mut(&vmid)
        .map(|vm| &mut vm.config)
        .ok_or_else(|| format!("VM {vmid} vanished"))
}

/// `snapshot_create` (`__snapshot_prepare`): not of a template, a new
/// name, and every disk on storage that can snapshot (not plain LVM).
pub fn take(
    state: &mut State,
    vmid: u32,
    name: &str,
    description: &str,
    vmstate: bool,
) -> Result<Vec<String>, String> {
    let config = state
        .vms
        .get(&vmid)
        .map(|vm| vm.config.clone())
        .ok_or_else(|| format!("VM {vmid} vanished"))?;
    if config.is_template() {
        return Err("you can't take a snapshot if it's a template".to_owned());
    }
    if config.snapshots.contains_key(name) {
        return Err(format!("snapshot name '{name}' already used"));
    }
    let thick_lvm = config.drives().any(|(_, v)| {
        v.split(':')
            .next()
            .and_then(|id| state.spec.storage(id))
            .is_some_and(|s| s.plugin == "lvm")
    });
    if thick_lvm {
        return Err("snapshot feature is not available".to_owned());
    }
    let mut values = config.values.clone();
    let parent = values.remove("parent");
    values.remove("lock");
    let config = vm_config(state, vmid)?;
    config.snapshots.insert(
        name.to_owned(),
        Snapshot {
            values,
            snaptime: now_ms() / 1000,
            description: description.to_owned(),
            parent,
            vmstate,
        },
    );
    config.values.insert("parent".into(), name.to_owned());
    Ok(vec![])
}

/// `snapshot_delete`: children and the VM now descend from the deleted
/// snapshot's parent.
pub fn delete(state: &mut State, vmid: u32, name: &str) -> Result<Vec<String>, String> {
    let config = vm_config(state, vmid)?;
    if config.is_template() {
        return Err("you can't delete a snapshot if vm is a template".to_owned());
    }
    let gone = config
        .snapshots
        .remove(name)
        .ok_or_else(|| format!("snapshot '{name}' does not exist"))?;
    for snap in config.snapshots.values_mut() {
        if snap.parent.as_deref() == Some(name) {
            snap.parent = gone.parent.clone();
        }
    }
    if config.get("parent") == Some(name) {
        match gone.parent {
            Some(p) => config.values.insert("parent".into(), p),
            None => config.values.remove("parent"),
        };
    }
    Ok(vec![])
}

/// `snapshot_rollback`: the VM is stopped first
/// (`__snapshot_rollback_vm_stop`), gets the snapshot's config back (its
/// pending changes dropped) and runs on that snapshot.
pub fn rollback(state: &mut State, vmid: u32, name: &str) -> Result<Vec<String>, String> {
    let vm = state
        .vms
        .get_mut(&vmid)
        .ok_or_else(|| format!("VM {vmid} vanished"))?;
    if vm.config.is_template() {
        return Err("you can't rollback if vm is a template".to_owned());
    }
    let snap = vm
        .config
        .snapshots
        .get(name)
        .cloned()
        .ok_or_else(|| format!("snapshot '{name}' does not exist"))?;
    vm.running = false;
    vm.config.values = snap.values;
    vm.config.values.insert("parent".into(), name.to_owned());
    vm.config.pending.clear();
    vm.config.pending_delete.clear();
    Ok(vec![])
}
