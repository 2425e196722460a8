//! Proxmox property strings (`virtio=BC:24:11:…,bridge=vmbr0`,
//! `tank:vm-100-disk-0,size=32G`, `ip=10.0.0.5/24,gw=10.0.0.1`, …) parsed
//! into their parts and rendered in one canonical form, so two spellings of
//! the same value compare equal: default key first, other keys sorted,
//! booleans as 0/1, MACs upper-case, sizes in their largest exact unit.

use std::collections::BTreeMap;
use std::fmt;

/// A parsed property string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PropertyString {
    /// The default key's value (written first, without `key=`).
    pub head: Option<String>,
    pub pairs: BTreeMap<String, String>,
}

impl PropertyString {
    /// Parses `value` whose default key is `default_key`.
    pub fn parse(value: &str, default_key: &str) -> Self {
        let mut ps = PropertyString::default();
        for (i, part) in value.split(',').enumerate().filter(|(_, p)| !p.is_empty()) {
            match part.split_once('=') {
                Some((k, v)) if k == default_key => ps.head = Some(v.to_owned()),
                Some((k, v)) => {
                    ps.pairs.insert(k.to_owned(), normalise(k, v));
                }
                None if i == 0 => ps.head = Some(part.to_owned()),
                None => {
                    ps.pairs.insert(part.to_owned(), String::new());
                }
            }
        }
        ps
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.get(key).map(String::as_str)
    }

    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        self.pairs.insert(key.to_owned(), normalise(key, &value));
    }
}

impl fmt::Display for PropertyString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            if !std::mem::take(&mut first) {
                f.write_str(",")
            } else {
                Ok(())
            }
        };
        if let Some(h) = &self.head {
            sep(f)?;
            f.write_str(h)?;
        }
        for (k, v) in &self.pairs {
            sep(f)?;
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// Booleans as 0/1, MACs upper-case, sizes canonical.
fn normalise(key: &str, value: &str) -> String {
    const BOOLS: &[&str] = &[
        "firewall",
        "link_down",
        "backup",
        "iothread",
        "replicate",
        "ro",
        "shared",
        "snapshot",
        "ssd",
        "enabled",
        "fstrim_cloned_disks",
        "freeze-fs",
        "pre-enrolled-keys",
    ];
    if BOOLS.contains(&key) {
        return match value.to_ascii_lowercase().as_str() {
            "1" | "on" | "yes" | "true" => "1".to_owned(),
            "0" | "off" | "no" | "false" => "0".to_owned(),
            _ => value.to_owned(),
        };
    }
    if key == "macaddr" || NIC_MODELS.contains(&key) {
        return value.to_ascii_uppercase();
    }
    if key == "size" {
        return parse_size(value)
            .map(format_size)
            .unwrap_or_else(|| value.to_owned());
    }
    value.to_owned()
}

pub const NIC_MODELS: &[&str] = &[
    "e1000",
    "e1000-82540em",
    "e1000-82544gc",
    "e1000-82545em",
    "e1000e",
    "i82551",
    "i82557b",
    "i82559er",
    "ne2k_isa",
    "ne2k_pci",
    "pcnet",
    "rtl8139",
    "virtio",
    "vmxnet3",
];

/// A `netN` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Net {
    pub model: String,
    pub mac: Option<String>,
    /// bridge, firewall, tag, mtu, …
    pub options: BTreeMap<String, String>,
}

impl Net {
    pub fn parse(value: &str) -> Self {
        let mut ps = PropertyString::parse(value, "model");
        let mut model = ps.head.take().unwrap_or_default();
        let mut mac = ps.pairs.remove("macaddr");
        if let Some(m) = NIC_MODELS.iter().find(|m| ps.pairs.contains_key(**m)) {
            mac = ps.pairs.remove(*m);
            model = (*m).to_owned();
        }
        Net {
            model,
            mac: mac.map(|m| m.to_ascii_uppercase()),
            options: ps.pairs,
        }
    }

    pub fn bridge(&self) -> Option<&str> {
        self.options.get("bridge").map(String::as_str)
    }
}

impl fmt::Display for Net {
    /// Canonical: `model=MAC` (or `model`), then the options sorted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head = match &self.mac {
            Some(mac) => format!("{}={mac}", self.model),
            None => self.model.clone(),
        };
        let ps = PropertyString {
            head: Some(head),
            pairs: self.options.clone(),
        };
        ps.fmt(f)
    }
}

/// A drive value (`scsiN`, `ideN`, `efidisk0`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    pub file: String,
    pub options: BTreeMap<String, String>,
}

impl Drive {
    pub fn parse(value: &str) -> Self {
        let ps = PropertyString::parse(value, "file");
        Drive {
            file: ps.head.unwrap_or_default(),
            options: ps.pairs,
        }
    }

    pub fn is_cdrom(&self) -> bool {
        self.options.get("media").is_some_and(|m| m == "cdrom")
    }

    pub fn is_cloudinit(&self) -> bool {
        self.file.contains("cloudinit")
    }

    /// The size in bytes, from `size=`.
    pub fn size(&self) -> Option<u64> {
        self.options.get("size").and_then(|s| parse_size(s))
    }

    /// The storage id of the volume (`tank` of `tank:vm-100-disk-0`).
    pub fn storage(&self) -> Option<&str> {
        self.file.split_once(':').map(|(s, _)| s)
    }
}

impl fmt::Display for Drive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        PropertyString {
            head: Some(self.file.clone()),
            pairs: self.options.clone(),
        }
        .fmt(f)
    }
}

/// An `ipconfigN` value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpConfig {
    pub ip: Option<String>,
    pub gw: Option<String>,
    pub ip6: Option<String>,
    pub gw6: Option<String>,
}

impl IpConfig {
    pub fn parse(value: &str) -> Self {
        let ps = PropertyString::parse(value, "ip");
        IpConfig {
            ip: ps.head.clone().or_else(|| ps.get("ip").map(str::to_owned)),
            gw: ps.get("gw").map(str::to_owned),
            ip6: ps.get("ip6").map(str::to_owned),
            gw6: ps.get("gw6").map(str::to_owned),
        }
    }
}

impl fmt::Display for IpConfig {
    /// Canonical order: ip, gw, ip6, gw6.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = [
            ("ip", &self.ip),
            ("gw", &self.gw),
            ("ip6", &self.ip6),
            ("gw6", &self.gw6),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
        f.write_str(&parts.join(","))
    }
}

/// `agent`: enabled or not (a bare `1` or `enabled=1,…`).
pub fn agent_enabled(value: &str) -> bool {
    let ps = PropertyString::parse(value, "enabled");
    ps.head
        .as_deref()
        .or(ps.get("enabled"))
        .is_some_and(|e| e == "1")
}

/// `boot: order=scsi0;ide2;net0` → the devices in order.
pub fn boot_order(value: &str) -> Vec<String> {
    PropertyString::parse(value, "legacy")
        .get("order")
        .map(|o| {
            o.split(';')
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Tags as Proxmox stores them: lower-cased, deduplicated, sorted, `;`.
pub fn normalise_tags<'a>(tags: impl IntoIterator<Item = &'a str>) -> String {
    let mut set: Vec<String> = tags
        .into_iter()
        .flat_map(|t| t.split([';', ',', ' ']))
        .filter(|t| !t.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    set.sort();
    set.dedup();
    set.join(";")
}

/// `sshkeys` as Proxmox expects it: URL-encoded with `%20` for space, all
/// but `[-a-zA-Z0-9_.!~*'()]` escaped (the value is then form-encoded once
/// more on the wire; that is the classic double-encoding, on purpose).
pub fn encode_sshkeys<'a>(keys: impl IntoIterator<Item = &'a str>) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'!')
        .remove(b'~')
        .remove(b'*')
        .remove(b'\'')
        .remove(b'(')
        .remove(b')');
    let joined: Vec<&str> = keys.into_iter().collect();
    percent_encoding::utf8_percent_encode(&(joined.join("\n") + "\n"), KEEP).to_string()
}

/// Decodes a stored `sshkeys` value into its key lines.
pub fn decode_sshkeys(value: &str) -> Vec<String> {
    percent_encoding::percent_decode_str(value)
        .decode_utf8_lossy()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Parses `32G`, `512M`, `4096K`, `1.5T` or bare bytes.
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

/// Bytes in the largest exact unit (`32G`, `4M`, `528K`).
pub fn format_size(bytes: u64) -> String {
    for (factor, unit) in [
        (1u64 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ] {
        if bytes >= factor && bytes.is_multiple_of(factor) {
            return format!("{}{unit}", bytes / factor);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_spellings_of_a_nic_compare_equal() {
        let a = Net::parse("virtio=bc:24:11:aa:bb:cc,bridge=vmbr0,firewall=1");
        let b = Net::parse("bridge=vmbr0,model=virtio,macaddr=BC:24:11:AA:BB:CC,firewall=on");
        assert_eq!(a, b);
        assert_eq!(
            a.to_string(),
            "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=1"
        );
        assert_eq!(a.bridge(), Some("vmbr0"));
    }

    #[test]
    fn drives_and_sizes_are_canonical() {
        let d = Drive::parse("file=tank:vm-100-disk-0,ssd=on,size=32768M,discard=on");
        assert_eq!(
            d.to_string(),
            "tank:vm-100-disk-0,discard=on,size=32G,ssd=1"
        );
        assert_eq!(d.size(), Some(32 << 30));
        assert_eq!(d.storage(), Some("tank"));
        assert!(Drive::parse("local:iso/x.iso,media=cdrom").is_cdrom());
        assert!(Drive::parse("tank:vm-100-cloudinit,media=cdrom").is_cloudinit());
    }

    #[test]
    fn ipconfig_agent_boot_and_tags() {
        let ip = IpConfig::parse("gw=10.0.0.1,ip=10.0.0.5/24");
        assert_eq!(ip.to_string(), "ip=10.0.0.5/24,gw=10.0.0.1");
        assert!(agent_enabled("1") && agent_enabled("enabled=1,fstrim_cloned_disks=1"));
        assert!(!agent_enabled("0") && !agent_enabled("enabled=0"));
        assert_eq!(
            boot_order("order=scsi0;ide2;net0"),
            ["scsi0", "ide2", "net0"]
        );
        assert_eq!(normalise_tags(["Web", "prod;web"]), "prod;web");
    }

    #[test]
    fn sshkeys_are_url_encoded_as_proxmox_validates_them() {
        let enc = encode_sshkeys(["ssh-ed25519 AAAA+/= me@host"]);
        assert_eq!(enc, "ssh-ed25519%20AAAA%2B%2F%3D%20me%40host%0A");
        assert!(
            enc.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-%_.!~*'()".contains(&b))
        );
        assert_eq!(decode_sshkeys(&enc), ["ssh-ed25519 AAAA+/= me@host"]);
    }
}
