//! `nixgold init`: drafting a fleet file for what already exists.
//!
//! A draft is the fleet as a JSON value (keys in the schema's order) plus
//! what the user must know: values that were converted into a safe form,
//! and the `nixgold import` commands that take the existing resources over.
//! [`cluster`] drafts from live VM configs; [`render`] writes Nickel or
//! YAML. Secrets never enter a draft: a password is an env reference.

pub mod classic;
pub mod cluster;
pub mod render;
mod tfstate;

use serde_json::{Map, Value, json};

/// What every draft needs to know about the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub fleet: String,
    pub endpoint: String,
    /// The default node (first in `proxmox.nodes`).
    pub node: String,
    pub storage: String,
    pub bridge: String,
    pub state_version: String,
    /// Pin the installer ISO by URL and sha256; a channel otherwise.
    pub iso: Option<(String, String)>,
    /// `proxmox.tls.fingerprint` (sha256 of the API certificate).
    pub fingerprint: Option<String>,
}

/// A fleet to write, and what to tell the user about it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    pub fleet: Value,
    /// What was converted or needs a person (printed, and written as
    /// comments at the top of the file).
    pub notes: Vec<String>,
    /// Existing resources to take over: (address, VMID).
    pub imports: Vec<(String, u32)>,
}

/// The `fleet`, `proxmox` and `isos` part of a fleet, for `nodes`.
pub fn skeleton(s: &Settings, nodes: &[String]) -> Map<String, Value> {
    let mut proxmox = json!({
        "endpoint": s.endpoint,
        "nodes": nodes,
        "token": { "env": "PROXMOX_VE_API_TOKEN" },
    });
    if let Some(fp) = &s.fingerprint {
        proxmox["tls"] = json!({ "fingerprint": fp });
    }
    let iso = match &s.iso {
        Some((url, sha)) => json!({ "url": url, "checksum": format!("sha256:{sha}") }),
        None => json!({ "channel": format!("nixos-{}", s.state_version) }),
    };
    let mut m = Map::new();
    m.insert("fleet".into(), json!(s.fleet));
    m.insert("proxmox".into(), proxmox);
    m.insert("isos".into(), json!({ "nixos": iso }));
    m
}

/// An image entry with the fleet's defaults where the source says nothing.
pub fn image(s: &Settings, vmid_range: (u32, u32), hardware: Map<String, Value>) -> Value {
    let mut hw = Map::new();
    hw.insert("storage".into(), json!(s.storage));
    hw.insert("bridge".into(), json!(s.bridge));
    hw.extend(hardware);
    json!({
        "iso": "nixos",
        "vmid_range": { "first": vmid_range.0, "last": vmid_range.1 },
        "hardware": hw,
        "nixos": { "state_version": s.state_version },
    })
}

/// A fleet key from a VM or template name: letters, digits and `-`.
pub fn key(name: &str) -> String {
    let mut k: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    k = k.trim_matches('-').to_owned();
    if k.is_empty() {
        "unnamed".to_owned()
    } else {
        k
    }
}

/// A VM's `network` from its cloud-init settings as Proxmox stores them
/// (`ipconfig0`, `nameserver`, `searchdomain`): static, or DHCP.
pub fn cloud_init_network(
    ipconfig0: Option<&str>,
    nameserver: Option<&str>,
    searchdomain: Option<&str>,
) -> Map<String, Value> {
    let ip = ipconfig0.map(pve_api::property::IpConfig::parse);
    let mut n = Map::new();
    let Some(address) = ip
        .as_ref()
        .and_then(|c| c.ip.clone())
        .filter(|a| a != "dhcp")
    else {
        n.insert("dhcp".into(), json!(true));
        return n;
    };
    n.insert("ip".into(), json!(address));
    if let Some(gw) = ip.and_then(|c| c.gw) {
        n.insert("gateway".into(), json!(gw));
    }
    if let Some(dns) = nameserver.filter(|d| !d.trim().is_empty()) {
        let list: Vec<&str> = dns
            .split([' ', ',', ';'])
            .filter(|d| !d.is_empty())
            .collect();
        n.insert("dns".into(), json!(list));
    }
    if let Some(sd) = searchdomain.filter(|d| !d.is_empty()) {
        n.insert("search_domain".into(), json!(sd));
    }
    n
}

/// The environment variable a VM's password reference names.
pub fn password_env(vm_key: &str) -> String {
    format!("{}_PASSWORD", vm_key.to_ascii_uppercase().replace('-', "_"))
}

/// The image of a conversion: Packer's template, or only the name (or
/// VMID) of the template Terraform clones. Returns its key, its entry and
/// the ISO storage Packer used.
fn classic_image(
    s: &Settings,
    packer: Option<classic::Found>,
    template: Option<&str>,
    draft: &mut Draft,
) -> (String, Value, Option<String>) {
    let iso_storage = packer.as_ref().and_then(|p| p.iso_storage.clone());
    let (name, vmid, mut entry, state_version, extra) = match packer {
        Some(p) => {
            draft.notes.extend(p.notes);
            let (name, vmid, image) = p.image.unwrap_or_default();
            (name, vmid, image, p.state_version, p.extra_config)
        }
        None => {
            let template = template.unwrap_or_default();
            let by_vmid = template.parse::<u32>().ok();
            let name = if by_vmid.is_some() || template.is_empty() {
                "golden".to_owned()
            } else {
                key(template)
            };
            draft.notes.push(format!(
                "images.{name}: only its template is known; fill in its hardware and nixos settings (or convert its Packer files too)"
            ));
            (name, by_vmid, Map::new(), None, None)
        }
    };
    let first = vmid.unwrap_or(9000);
    let hardware = entry
        .remove("hardware")
        .and_then(|h| h.as_object().cloned())
        .unwrap_or_default();
    let mut image_entry = image(s, (first, first + 9), hardware);
    if let Some(v) = state_version {
        image_entry["nixos"]["state_version"] = json!(v);
    }
    if let Some(extra) = extra.filter(|e| !e.trim().is_empty()) {
        image_entry["nixos"]["extra_config"] = json!(extra);
    }
    if let Some(vmid) = vmid {
        draft.imports.push((format!("image.{name}"), vmid));
    }
    (name, image_entry, iso_storage)
}

/// The fleet for a converted Packer template and Terraform VMs.
pub fn classic(
    s: &Settings,
    packer: Option<classic::Found>,
    terraform: Option<classic::Found>,
) -> Draft {
    let mut draft = Draft::default();
    let tf = terraform.unwrap_or_default();
    let mut nodes = vec![s.node.clone()];
    let (name, image_entry, iso_storage) =
        classic_image(s, packer, tf.template.as_deref(), &mut draft);
    draft.notes.extend(tf.notes);
    let mut vms = Map::new();
    let mut allocate = false;
    for (key, id, mut vm) in tf.vms {
        vm.insert("image".into(), json!(name));
        let node = vm
            .remove("node")
            .and_then(|n| n.as_str().map(str::to_owned));
        if let Some(node) = node.filter(|n| *n != s.node) {
            if !nodes.contains(&node) {
                nodes.push(node.clone());
            }
            vm.insert("node".into(), json!(node));
        }
        match id {
            Some(id) => {
                vm.insert("vmid".into(), json!(id));
                draft.imports.push((format!("vm.{key}"), id));
            }
            None => allocate = true,
        }
        vms.insert(key, Value::Object(vm));
    }
    let mut fleet = skeleton(s, &nodes);
    if let Some(storage) = iso_storage {
        fleet["isos"]["nixos"]["storage"] = json!(storage);
    }
    if allocate {
        fleet.insert(
            "vm_vmid_range".into(),
            json!({ "first": 1000, "last": 1099 }),
        );
        draft.notes.push("some VMs had no VMID in the input: nixgold allocates from vm_vmid_range 1000-1099 and creates them new (no import)".into());
    }
    let mut images = Map::new();
    images.insert(name, image_entry);
    fleet.insert("images".into(), Value::Object(images));
    fleet.insert("vms".into(), Value::Object(vms));
    draft.fleet = Value::Object(fleet);
    draft
}
