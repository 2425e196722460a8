//! Drafting a fleet from live VM configs (`init --from-cluster`): an image
//! for every template, a VM for every VM, with the values the plan
//! compares taken from the config so that importing them plans only the
//! stamp and tags.

use std::collections::{BTreeMap, BTreeSet};

use pve_api::property::{Drive, Net, agent_enabled, decode_sshkeys, format_size};
use serde_json::{Map, Value, json};

use super::{Draft, Settings, cloud_init_network, image, key, password_env, skeleton};
use crate::live::LiveVm;

/// Drafts the fleet for `vms` (with their configs). VMs stamped by nixgold
/// are left out: some fleet already owns them.
pub fn draft(s: &Settings, vms: &BTreeMap<u32, LiveVm>) -> Draft {
    let mut draft = Draft::default();
    let mut nodes: Vec<String> = vec![s.node.clone()];
    let taken: BTreeSet<u32> = vms.keys().copied().collect();
    let mut images = Map::new();
    let mut image_of: BTreeMap<u32, String> = BTreeMap::new();
    for vm in vms.values().filter(|v| v.template) {
        let Some(values) = unowned(vm, &mut draft) else {
            continue;
        };
        let name = unique(
            &images,
            &key(vm.name.as_deref().unwrap_or("image")),
            vm.vmid.get(),
        );
        let last = (vm.vmid.get() + 1..=vm.vmid.get() + 9)
            .take_while(|id| !taken.contains(id))
            .last()
            .unwrap_or(vm.vmid.get());
        let mut entry = image(s, (vm.vmid.get(), last), hardware(values));
        if vm.node.as_str() != s.node {
            entry["build_node"] = json!(vm.node);
        }
        if !values.get("agent").is_some_and(|a| agent_enabled(a)) {
            entry["nixos"]["guest_agent"] = json!(false);
        }
        if crate::import::clone_layout(values).is_err() {
            draft.notes.push(format!(
                "image.{name}: template {} cannot be cloned by nixgold as it is (see `nixgold import`); remove its import to have nixgold build the image",
                vm.vmid.get()
            ));
        }
        add_node(&mut nodes, &vm.node);
        draft.imports.push((format!("image.{name}"), vm.vmid.get()));
        image_of.insert(vm.vmid.get(), name.clone());
        images.insert(name, entry);
    }
    let mut out_vms = Map::new();
    for vm in vms.values().filter(|v| !v.template) {
        let Some(values) = unowned(vm, &mut draft) else {
            continue;
        };
        let name = unique(
            &out_vms,
            &key(vm.name.as_deref().unwrap_or("vm")),
            vm.vmid.get(),
        );
        let Some((entry, note)) = vm_entry(s, vm, values, &name, &image_of, &images) else {
            draft.notes.push(format!(
                "VMID {} (`{name}`) is left out: there is no template in the draft to clone it from; add its image by hand",
                vm.vmid.get()
            ));
            continue;
        };
        draft.notes.extend(note);
        add_node(&mut nodes, &vm.node);
        draft.imports.push((format!("vm.{name}"), vm.vmid.get()));
        out_vms.insert(name, entry);
    }
    let mut fleet = skeleton(s, &nodes);
    fleet.insert("images".into(), Value::Object(images));
    fleet.insert("vms".into(), Value::Object(out_vms));
    draft.fleet = Value::Object(fleet);
    draft
}

/// The config of a VM no fleet owns yet; a stamped one is noted and skipped.
fn unowned<'a>(vm: &'a LiveVm, draft: &mut Draft) -> Option<&'a BTreeMap<String, String>> {
    if let Some(stamp) = vm.stamp() {
        draft.notes.push(format!(
            "VMID {} is left out: it is {} of fleet `{}` already",
            vm.vmid, stamp.resource, stamp.fleet
        ));
        return None;
    }
    vm.config.as_ref().map(|c| &c.values)
}

fn add_node(nodes: &mut Vec<String>, node: &str) {
    if !nodes.iter().any(|n| n == node) {
        nodes.push(node.to_owned());
    }
}

fn unique(taken: &Map<String, Value>, key: &str, vmid: u32) -> String {
    if taken.contains_key(key) {
        format!("{key}-{vmid}")
    } else {
        key.to_owned()
    }
}

/// `cores`, `memory`, `disk`, `storage`, `bridge`, `vlan` of a template.
fn hardware(values: &BTreeMap<String, String>) -> Map<String, Value> {
    let mut hw = Map::new();
    let int = |k: &str| values.get(k).and_then(|v| v.parse::<u64>().ok());
    hw.insert("cores".into(), json!(int("cores").unwrap_or(1)));
    if let Some(sockets) = int("sockets") {
        hw.insert("sockets".into(), json!(sockets));
    }
    if let Some(memory) = memory(values) {
        hw.insert("memory".into(), json!(memory));
    }
    if let Some(disk) = values.get("scsi0").map(|d| Drive::parse(d)) {
        if let Some(size) = disk.size() {
            hw.insert("disk".into(), json!(format_size(size)));
        }
        if let Some(storage) = disk.storage() {
            hw.insert("storage".into(), json!(storage));
        }
    }
    if let Some(net) = values.get("net0").map(|n| Net::parse(n)) {
        if let Some(bridge) = net.bridge() {
            hw.insert("bridge".into(), json!(bridge));
        }
        if let Some(tag) = net.options.get("tag").and_then(|t| t.parse::<u16>().ok()) {
            hw.insert("vlan".into(), json!(tag));
        }
    }
    hw
}

fn memory(values: &BTreeMap<String, String>) -> Option<u64> {
    let config = pve_api::types::VmConfig {
        values: values.clone(),
        digest: String::new(),
    };
    config.memory_mib()
}

/// The template a linked clone's disk comes from (`base-9000-disk-0/…`).
fn base_vmid(volid: &str) -> Option<u32> {
    let at = volid.find("base-")? + 5;
    volid[at..].split('-').next()?.parse().ok()
}

/// A VM entry, and a note when its image had to be guessed.
fn vm_entry(
    s: &Settings,
    vm: &LiveVm,
    values: &BTreeMap<String, String>,
    name: &str,
    image_of: &BTreeMap<u32, String>,
    images: &Map<String, Value>,
) -> Option<(Value, Option<String>)> {
    let disk = values.get("scsi0").map(|d| Drive::parse(d));
    let base = disk.as_ref().and_then(|d| base_vmid(&d.file));
    let (image, note) = match base.and_then(|b| image_of.get(&b)) {
        Some(image) => (image.clone(), None),
        None => {
            let first = images.keys().next()?.clone();
            let note = (images.len() > 1).then(|| {
                format!("vm.{name}: its template is unknown (a full clone); the draft says image.{first}, check it")
            });
            (first, note)
        }
    };
    let mut e = Map::new();
    e.insert("image".into(), json!(image));
    e.insert("vmid".into(), json!(vm.vmid.get()));
    if vm.node.as_str() != s.node {
        e.insert("node".into(), json!(vm.node));
    }
    let linked = base.is_some();
    e.insert(
        "clone".into(),
        json!(if linked { "linked" } else { "full" }),
    );
    let int = |k: &str| values.get(k).and_then(|v| v.parse::<u64>().ok());
    e.insert("cores".into(), json!(int("cores").unwrap_or(1)));
    if let Some(m) = memory(values) {
        e.insert("memory".into(), json!(m));
    }
    if let Some(d) = &disk {
        if let Some(size) = d.size() {
            e.insert("disk".into(), json!(format_size(size)));
        }
        if let (false, Some(storage)) = (linked, d.storage()) {
            e.insert("storage".into(), json!(storage));
        }
    }
    e.insert("network".into(), network(values, &images[&image]));
    if let Some(user) = values.get("ciuser") {
        e.insert("user".into(), json!(user));
    }
    if let Some(keys) = values.get("sshkeys") {
        e.insert("ssh_keys".into(), json!(decode_sshkeys(keys)));
    }
    if values.contains_key("cipassword") {
        e.insert("password".into(), json!({ "env": password_env(name) }));
    }
    let tags: Vec<&str> = values
        .get("tags")
        .map(|t| {
            t.split([';', ',', ' '])
                .filter(|t| !t.is_empty() && *t != "nixgold" && !t.starts_with("nixgold."))
                .collect()
        })
        .unwrap_or_default();
    if !tags.is_empty() {
        e.insert("tags".into(), json!(tags));
    }
    if let Some(d) = values.get("description").filter(|d| !d.trim().is_empty()) {
        e.insert("description".into(), json!(d.trim_end()));
    }
    e.insert(
        "onboot".into(),
        json!(values.get("onboot").is_some_and(|v| v == "1")),
    );
    e.insert("start".into(), json!(vm.running.unwrap_or(false)));
    Some((Value::Object(e), note))
}

/// `network` from `ipconfig0`, `nameserver`, `searchdomain` and `net0`
/// (bridge and VLAN only where they differ from the image's).
fn network(values: &BTreeMap<String, String>, image: &Value) -> Value {
    let get = |k: &str| values.get(k).map(String::as_str);
    let mut n = cloud_init_network(get("ipconfig0"), get("nameserver"), get("searchdomain"));
    let net = values.get("net0").map(|v| Net::parse(v));
    let hw = &image["hardware"];
    if let Some(bridge) = net
        .as_ref()
        .and_then(Net::bridge)
        .filter(|b| hw["bridge"] != *b)
    {
        n.insert("bridge".into(), json!(bridge));
    }
    let tag = net
        .as_ref()
        .and_then(|n| n.options.get("tag"))
        .and_then(|t| t.parse::<u16>().ok());
    if let Some(tag) = tag.filter(|t| hw["vlan"] != *t) {
        n.insert("vlan".into(), json!(tag));
    }
    Value::Object(n)
}
