//! A VM's configuration file, the way qemu-server keeps it: sorted
//! `key: value` lines under `#`-comment description lines, a `[PENDING]`
//! section, and the hidden `[special:cloudinit]` section. The digest the
//! API reports is the SHA-1 of exactly this text.
//!
//! Also the canonical forms the server writes: NIC and drive property
//! strings (default key first, the rest sorted, booleans as 0/1), tag
//! lists (lower-cased, deduplicated, sorted, `;`-joined) and generated MACs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha1::{Digest, Sha1};

/// Config keys whose schema type is integer: read back as JSON numbers.
const INT_KEYS: &[&str] = &[
    "balloon",
    "cores",
    "cpuunits",
    "migrate_speed",
    "shares",
    "smp",
    "sockets",
    "vcpus",
];
/// Config keys whose schema type is boolean: read back as 0/1 numbers.
const BOOL_KEYS: &[&str] = &[
    "acpi",
    "allow-ksm",
    "autostart",
    "ciupgrade",
    "freeze",
    "keephugepages",
    "kvm",
    "localtime",
    "numa",
    "onboot",
    "protection",
    "reboot",
    "tablet",
    "tdf",
    "template",
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Applied values, description included.
    pub values: BTreeMap<String, String>,
    /// `[PENDING]` values, applied at the next cold start.
    #[serde(default)]
    pub pending: BTreeMap<String, String>,
    #[serde(default)]
    pub pending_delete: BTreeSet<String>,
    /// What the current cloud-init image was built from.
    #[serde(default)]
    pub cloudinit: BTreeMap<String, String>,
    /// Snapshots by name: the `[name]` sections of the file.
    #[serde(default)]
    pub snapshots: BTreeMap<String, Snapshot>,
}

/// A snapshot: the config as it was, when, and the snapshot before it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub values: BTreeMap<String, String>,
    pub snaptime: u64,
    pub description: String,
    pub parent: Option<String>,
    pub vmstate: bool,
}

impl VmConfig {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn lock(&self) -> Option<&str> {
        self.get("lock")
    }

    pub fn is_template(&self) -> bool {
        self.get("template") == Some("1")
    }

    /// The config file text the digest is computed from.
    pub fn file_text(&self) -> String {
        let mut out = String::new();
        if let Some(desc) = self.values.get("description") {
            for line in desc.lines() {
                let _ = writeln!(out, "#{}", escape_description(line));
            }
        }
        for (k, v) in &self.values {
            if k != "description" {
                let _ = writeln!(out, "{k}: {v}");
            }
        }
        if !self.pending.is_empty() || !self.pending_delete.is_empty() {
            out.push_str("\n[PENDING]\n");
            if !self.pending_delete.is_empty() {
                let keys: Vec<&str> = self.pending_delete.iter().map(String::as_str).collect();
                let _ = writeln!(out, "delete: {}", keys.join(","));
            }
            for (k, v) in &self.pending {
                let _ = writeln!(out, "{k}: {v}");
            }
        }
        for (name, snap) in &self.snapshots {
            let _ = writeln!(out, "\n[{name}]");
            if let Some(parent) = &snap.parent {
                let _ = writeln!(out, "parent: {parent}");
            }
            let _ = writeln!(out, "snaptime: {}", snap.snaptime);
            for (k, v) in &snap.values {
                let _ = writeln!(out, "{k}: {v}");
            }
        }
        if !self.cloudinit.is_empty() {
            out.push_str("\n[special:cloudinit]\n");
            for (k, v) in &self.cloudinit {
                let _ = writeln!(out, "{k}: {v}");
            }
        }
        out
    }

    pub fn digest(&self) -> String {
        let mut hasher = Sha1::new();
        hasher.update(self.file_text().as_bytes());
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The values the API shows: pending overlaid unless `current`.
    pub fn effective(&self, current: bool) -> BTreeMap<String, String> {
        let mut values = self.values.clone();
        if !current {
            for k in &self.pending_delete {
                values.remove(k);
            }
            values.extend(self.pending.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        values
    }

    /// `GET …/config` as Proxmox types it: integer and boolean keys are
    /// numbers, everything else (including `memory`, a property string
    /// since 8.1, and number keys like `cpulimit`) a string; `cipassword`
    /// masked; the description with trailing whitespace trimmed.
    pub fn to_api_json(&self, current: bool) -> Value {
        let mut map = Map::new();
        for (k, v) in self.effective(current) {
            let value = api_value(&k, &v);
            map.insert(k, value);
        }
        map.insert("digest".to_owned(), Value::String(self.digest()));
        Value::Object(map)
    }

    /// Disk keys (drives with a volume) in key order.
    pub fn drives(&self) -> impl Iterator<Item = (&String, &String)> {
        self.values.iter().filter(|(k, _)| is_drive_key(k))
    }
}

/// One stored value as the API shows it: qemu-server's `check_type` makes
/// integer and boolean keys numbers when it parses the file; `cipassword`
/// is masked; a description loses its trailing whitespace.
pub fn api_value(key: &str, v: &str) -> Value {
    if key == "cipassword" {
        Value::String("**********".to_owned())
    } else if key == "description" {
        Value::String(v.trim_end().to_owned())
    } else if INT_KEYS.contains(&key) || BOOL_KEYS.contains(&key) {
        v.parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(v.to_owned()))
    } else {
        Value::String(v.to_owned())
    }
}

fn escape_description(line: &str) -> String {
    line.chars()
        .map(|c| match c {
            '%' => "%25".to_owned(),
            c if c.is_control() => format!("%{:02X}", c as u32),
            c => c.to_string(),
        })
        .collect()
}

/// `ide0`, `scsi12`, `efidisk0`, … (keys whose value is a drive).
pub fn is_drive_key(key: &str) -> bool {
    ["ide", "sata", "scsi", "virtio", "efidisk", "tpmstate"]
        .iter()
        .any(|p| {
            key.strip_prefix(p)
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        })
}

pub fn is_net_key(key: &str) -> bool {
    key.strip_prefix("net")
        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}

/// A property string split into its default-key value and `k=v` pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyString {
    pub head: Option<String>,
    pub pairs: BTreeMap<String, String>,
}

impl PropertyString {
    /// Parses `value`; a bare first element is the default key's value.
    pub fn parse(value: &str, default_key: &str) -> Result<Self, String> {
        let mut head = None;
        let mut pairs = BTreeMap::new();
        for (i, part) in value.split(',').enumerate() {
            if part.is_empty() {
                continue;
            }
            match part.split_once('=') {
                Some((k, v)) if k == default_key => head = Some(v.to_owned()),
                Some((k, v)) => {
                    if pairs.insert(k.to_owned(), v.to_owned()).is_some() {
                        return Err(format!(
                            "duplicate key in comma-separated list property: {k}"
                        ));
                    }
                }
                None if i == 0 => head = Some(part.to_owned()),
                None => {
                    return Err(format!(
                        "value without key, but schema does not define a default key ({part})"
                    ));
                }
            }
        }
        Ok(PropertyString { head, pairs })
    }

    /// Canonical text: the default key's value first, the rest sorted.
    pub fn render(&self) -> String {
        let mut parts: Vec<String> = self.head.iter().cloned().collect();
        parts.extend(self.pairs.iter().map(|(k, v)| format!("{k}={v}")));
        parts.join(",")
    }
}

fn normalise_bool(v: &str) -> Option<&'static str> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "on" | "yes" | "true" => Some("1"),
        "0" | "off" | "no" | "false" => Some("0"),
        _ => None,
    }
}

use crate::formats::NIC_MODELS;

/// Canonical `netN`: `model=MAC` first (a MAC is generated when missing),
/// then the other keys sorted with booleans as 0/1.
pub fn canonical_net(value: &str, new_mac: impl FnOnce() -> String) -> Result<String, String> {
    let mut ps = PropertyString::parse(value, "model")?;
    // `virtio=AA:BB:…` names the model and the MAC at once.
    let mut model = ps.head.take();
    let mut mac = ps.pairs.remove("macaddr");
    if let Some(m) = NIC_MODELS.iter().find(|m| ps.pairs.contains_key(**m)) {
        mac = ps.pairs.remove(*m);
        model = Some((*m).to_owned());
    }
    let model = model.ok_or("property is missing and it is not optional (model)")?;
    if !NIC_MODELS.contains(&model.as_str()) {
        return Err(format!(
            "value '{model}' does not have a value in the enumeration '{}'",
            NIC_MODELS.join(", ")
        ));
    }
    for key in ["firewall", "link_down"] {
        if let Some(v) = ps.pairs.get_mut(key) {
            *v = normalise_bool(v)
                .ok_or(format!("invalid boolean value '{v}'"))?
                .to_owned();
        }
    }
    let mac = match mac {
        Some(m) if is_mac(&m) => m.to_ascii_uppercase(),
        Some(m) => {
            return Err(format!(
                "invalid format - value '{m}' does not look like a valid MAC address"
            ));
        }
        None => new_mac(),
    };
    ps.head = Some(format!("{model}={mac}"));
    Ok(ps.render())
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The MAC of a canonical `netN` value.
pub fn net_mac(value: &str) -> Option<String> {
    value
        .split(',')
        .next()?
        .split_once('=')
        .map(|(_, mac)| mac.to_owned())
}

/// Canonical drive: `file` first, the other keys sorted, booleans as 0/1.
pub fn canonical_drive(ps: &PropertyString) -> Result<String, String> {
    let mut ps = ps.clone();
    for key in [
        "backup",
        "iothread",
        "replicate",
        "ro",
        "shared",
        "snapshot",
        "ssd",
    ] {
        if let Some(v) = ps.pairs.get_mut(key) {
            *v = normalise_bool(v)
                .ok_or(format!("invalid boolean value '{v}'"))?
                .to_owned();
        }
    }
    Ok(ps.render())
}

/// Tags as Proxmox stores them: lower-cased, deduplicated, sorted, `;`.
pub fn normalise_tags(value: &str) -> String {
    let tags: BTreeSet<String> = crate::params::split_list(value)
        .map(str::to_ascii_lowercase)
        .collect();
    tags.into_iter().collect::<Vec<_>>().join(";")
}

/// Size in the largest exact unit, as Proxmox prints `size=` (32G, 4M, 528K).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (factor, unit) in UNITS {
        if bytes >= factor && bytes.is_multiple_of(factor) {
            return format!("{}{unit}", bytes / factor);
        }
    }
    bytes.to_string()
}

/// Parses `32G`, `512M`, `1.5T`, bare bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, factor) = match s.chars().last()? {
        'K' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: f64 = num.parse().ok()?;
    (n >= 0.0).then(|| (n * factor as f64).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets_are_canonical_and_keep_their_mac() {
        let mac = || "BC:24:11:00:00:01".to_owned();
        assert_eq!(
            canonical_net("bridge=vmbr0,model=virtio,firewall=on", mac).unwrap(),
            "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1"
        );
        assert_eq!(
            canonical_net("virtio=aa:bb:cc:dd:ee:ff,bridge=vmbr0", || unreachable!()).unwrap(),
            "virtio=AA:BB:CC:DD:EE:FF,bridge=vmbr0"
        );
        assert!(canonical_net("bridge=vmbr0", mac).is_err());
    }

    #[test]
    fn tags_are_lowercased_deduplicated_and_sorted() {
        assert_eq!(normalise_tags("Web,prod;web db"), "db;prod;web");
    }

    #[test]
    fn digest_changes_with_pending_values() {
        let mut c = VmConfig::default();
        c.values.insert("cores".into(), "2".into());
        let d1 = c.digest();
        c.pending.insert("memory".into(), "4096".into());
        assert_ne!(d1, c.digest());
        assert_eq!(c.to_api_json(false)["memory"], "4096");
        assert!(c.to_api_json(true).get("memory").is_none());
        assert_eq!(c.to_api_json(true)["cores"], 2);
    }

    #[test]
    fn sizes_print_in_the_largest_exact_unit() {
        assert_eq!(format_size(32 << 30), "32G");
        assert_eq!(format_size(4 << 20), "4M");
        assert_eq!(format_size(528 << 10), "528K");
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
    }
}
