//! `nixgold init`: drafting a fleet file for what already exists.
//!
//! A draft is the fleet as a JSON value (keys in the schema's order) plus
//! what the user must know: values that were converted into a safe form,
//! and the `nixgold import` commands that take the existing resources over.
//! [`cluster`] drafts from live VM configs; [`render`] writes Nickel or
//! YAML. Secrets never enter a draft: a password is an env reference.

pub mod cluster;
pub mod render;

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

/// The environment variable a VM's password reference names.
pub fn password_env(vm_key: &str) -> String {
    format!("{}_PASSWORD", vm_key.to_ascii_uppercase().replace('-', "_"))
}
