//! Property-string formats of the QEMU config keys that the simulator
//! validates field by field, the way pve-common's `parse_property_string`
//! and `check_object` do before any handler runs: `ipconfigN`
//! (qemu-server `QemuServer/Network.pm`, `$ipconfig_fmt`), `netN`
//! (`$net_fmt`), `memory` (`QemuServer/Memory.pm`, `$memory_fmt`) and
//! `boot` (`QemuServer.pm`, `$boot_fmt` with `verify_bootdev`).
//!
//! A failure is the text pve-common puts in the 400's `errors` map:
//! `invalid format - format error\n<key>.<field>: <reason>\n`, or
//! `invalid format - <reason>\n` when the string itself does not parse.
//! Checks that need the VM's config (a boot device that does not exist)
//! belong to the handlers, not here.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The property-string formats validated here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QmFormat {
    IpConfig,
    Net,
    Memory,
    Boot,
}

/// What a field holds; the checks and messages are pve-common's.
#[derive(Clone, Copy)]
enum FieldKind {
    Int {
        min: i64,
        max: Option<i64>,
    },
    Number,
    Bool,
    Enum(&'static [&'static str]),
    /// A named format: `Err` is the validator's die message.
    Named(fn(&str) -> Result<(), String>),
}

#[derive(Clone, Copy)]
struct Field {
    name: &'static str,
    kind: FieldKind,
    default_key: bool,
    /// The field this one needs (`gw` requires `ip`).
    requires: Option<&'static str>,
}

const fn field(name: &'static str, kind: FieldKind) -> Field {
    Field {
        name,
        kind,
        default_key: false,
        requires: None,
    }
}

/// NIC models: `$nic_model_list` in qemu-server `QemuServer/Network.pm`.
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

fn ipv4_config(v: &str) -> Result<(), String> {
    (matches!(v, "dhcp" | "manual") || cidr::<Ipv4Addr>(v, 32))
        .then_some(())
        .ok_or_else(|| "value does not look like a valid ipv4 network configuration".into())
}

fn ipv6_config(v: &str) -> Result<(), String> {
    (matches!(v, "auto" | "dhcp" | "manual") || cidr::<Ipv6Addr>(v, 128))
        .then_some(())
        .ok_or_else(|| "value does not look like a valid ipv6 network configuration".into())
}

/// `pve_verify_cidrv4`/`v6`: an address and a prefix above 7.
fn cidr<A: std::str::FromStr>(v: &str, max: u32) -> bool {
    v.split_once('/').is_some_and(|(addr, prefix)| {
        addr.parse::<A>().is_ok() && prefix.parse::<u32>().is_ok_and(|p| p > 7 && p <= max)
    })
}

fn ipv4(v: &str) -> Result<(), String> {
    v.parse::<Ipv4Addr>()
        .map(drop)
        .map_err(|_| "value does not look like a valid IPv4 address".into())
}

fn ipv6(v: &str) -> Result<(), String> {
    v.parse::<Ipv6Addr>()
        .map(drop)
        .map_err(|_| "value does not look like a valid IPv6 address".into())
}

fn mac(v: &str) -> Result<(), String> {
    let parts: Vec<&str> = v.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then_some(())
        .ok_or_else(|| format!("value '{v}' does not look like a valid MAC address"))
}

fn bridge(v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 15
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    ok.then_some(())
        .ok_or_else(|| format!("value '{v}' does not look like a valid bridge name"))
}

fn trunks(v: &str) -> Result<(), String> {
    let ok = v.split(';').all(|range| {
        let mut ends = range.splitn(2, '-');
        ends.all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    });
    ok.then_some(())
        .ok_or_else(|| "value does not match the regex pattern".into())
}

fn legacy_boot(v: &str) -> Result<(), String> {
    let ok = (1..=4).contains(&v.len()) && v.bytes().all(|b| b"acdn".contains(&b));
    ok.then_some(())
        .ok_or_else(|| "value does not match the regex pattern".into())
}

/// `verify_bootdev` over `pve-qm-bootdev-list`: drives (not efidisk or
/// tpmstate), `netN`, `usbN`, `hostpciN`.
fn boot_devices(v: &str) -> Result<(), String> {
    for dev in crate::params::split_list(v) {
        let bootable = ["ide", "sata", "scsi", "virtio", "net", "usb", "hostpci"]
            .iter()
            .any(|base| {
                dev.strip_prefix(base)
                    .filter(|i| !(i.len() > 1 && i.starts_with('0')))
                    .and_then(|i| i.parse::<u32>().ok())
                    .zip(crate::params::index_range(base))
                    .is_some_and(|(i, range)| range.contains(&i))
            });
        if !bootable {
            return Err(format!("invalid boot device '{dev}'"));
        }
    }
    Ok(())
}

fn fields(format: QmFormat) -> Vec<Field> {
    use FieldKind::*;
    match format {
        QmFormat::IpConfig => vec![
            field("ip", Named(ipv4_config)),
            Field {
                requires: Some("ip"),
                ..field("gw", Named(ipv4))
            },
            field("ip6", Named(ipv6_config)),
            Field {
                requires: Some("ip6"),
                ..field("gw6", Named(ipv6))
            },
        ],
        QmFormat::Net => vec![
            Field {
                default_key: true,
                ..field("model", Enum(NIC_MODELS))
            },
            field("macaddr", Named(mac)),
            field("bridge", Named(bridge)),
            field(
                "queues",
                Int {
                    min: 0,
                    max: Some(64),
                },
            ),
            field("rate", Number),
            field(
                "tag",
                Int {
                    min: 1,
                    max: Some(4094),
                },
            ),
            field("trunks", Named(trunks)),
            field("firewall", Bool),
            field("link_down", Bool),
            field(
                "mtu",
                Int {
                    min: 1,
                    max: Some(65520),
                },
            ),
            field("host-tunnel", Bool),
        ],
        QmFormat::Memory => vec![Field {
            default_key: true,
            ..field("current", Int { min: 16, max: None })
        }],
        QmFormat::Boot => vec![
            Field {
                default_key: true,
                ..field("legacy", Named(legacy_boot))
            },
            field("order", Named(boot_devices)),
        ],
    }
}

/// Splits `value` into fields like `parse_property_string`; a NIC model
/// used as a key (`virtio=MAC`) names the model and the MAC at once.
fn split(
    format: QmFormat,
    schema: &[Field],
    value: &str,
) -> Result<BTreeMap<&'static str, String>, String> {
    let mut out: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut insert = |k: &'static str, v: &str| match out.insert(k, v.to_owned()) {
        Some(_) => Err(format!(
            "duplicate key in comma-separated list property: {k}"
        )),
        None => Ok(()),
    };
    for part in value.split(',').filter(|p| !p.trim().is_empty()) {
        match part.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => {
                if format == QmFormat::Net
                    && let Some(model) = NIC_MODELS.iter().find(|m| **m == k)
                {
                    insert("model", model)?;
                    insert("macaddr", v)?;
                    continue;
                }
                let f = schema
                    .iter()
                    .find(|f| f.name == k)
                    .ok_or_else(|| format!("invalid key in comma-separated list property: {k}"))?;
                insert(f.name, v)?;
            }
            None => {
                let f = schema.iter().find(|f| f.default_key).ok_or(
                    "value without key, but schema does not define a default key".to_owned(),
                )?;
                insert(f.name, part)?;
            }
            Some(_) => return Err("missing key in comma-separated list property".to_owned()),
        }
    }
    Ok(out)
}

fn check_field(kind: FieldKind, v: &str) -> Result<(), String> {
    match kind {
        FieldKind::Int { min, max } => {
            let n: i64 = v
                .parse()
                .map_err(|_| format!("type check ('integer') failed - got '{v}'"))?;
            if n < min {
                return Err(format!("value must have a minimum value of {min}"));
            }
            match max {
                Some(max) if n > max => Err(format!("value must have a maximum value of {max}")),
                _ => Ok(()),
            }
        }
        FieldKind::Number => v
            .parse::<f64>()
            .ok()
            .filter(|n| *n >= 0.0)
            .map(drop)
            .ok_or_else(|| format!("type check ('number') failed - got '{v}'")),
        FieldKind::Bool => {
            let known = ["1", "0", "on", "off", "yes", "no", "true", "false"];
            known
                .contains(&v.to_ascii_lowercase().as_str())
                .then_some(())
                .ok_or_else(|| format!("type check ('boolean') failed - got '{v}'"))
        }
        FieldKind::Enum(values) => values.contains(&v).then_some(()).ok_or_else(|| {
            format!(
                "value '{v}' does not have a value in the enumeration '{}'",
                values.join(", ")
            )
        }),
        FieldKind::Named(check) => check(v).map_err(|e| format!("invalid format - {e}\n")),
    }
}

/// Validates `value` of config key `key`; `Err` is the `errors` entry.
pub fn check(format: QmFormat, key: &str, value: &str) -> Result<(), String> {
    let schema = fields(format);
    let given = split(format, &schema, value).map_err(|e| format!("invalid format - {e}\n"))?;
    let mut errors: BTreeMap<String, String> = BTreeMap::new();
    for (name, v) in &given {
        let f = schema
            .iter()
            .find(|f| f.name == *name)
            .expect("split only yields schema fields");
        if let Some(req) = f.requires
            && !given.contains_key(req)
        {
            errors.insert(
                format!("{key}.{req}"),
                format!("missing property required by '{key}.{name}'"),
            );
        }
        if let Err(e) = check_field(f.kind, v) {
            errors.insert(format!("{key}.{name}"), e);
        }
    }
    if errors.is_empty() {
        return Ok(());
    }
    let mut text = String::from("invalid format - format error\n");
    for (path, e) in errors {
        text.push_str(&format!("{path}: {}\n", e.trim_end()));
    }
    Err(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_nic_model_key_into_model_and_mac() {
        let schema = fields(QmFormat::Net);
        let got = split(
            QmFormat::Net,
            &schema,
            "virtio=BC:24:11:00:00:01,bridge=vmbr0",
        )
        .unwrap();
        assert_eq!(got["model"], "virtio");
        assert_eq!(got["macaddr"], "BC:24:11:00:00:01");
        assert!(check(QmFormat::Net, "net0", "virtio=BC:24:11:00:00:01,virtio=x").is_err());
    }
}
