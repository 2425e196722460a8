//! Validated identifiers and small value types shared by the pipeline.
//!
//! Each type checks its invariant while deserialising or parsing, so an
//! invalid VMID, node name, checksum or size cannot exist past the fleet
//! loader. Nothing here does I/O.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a value could not become one of the identifier types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is invalid: {reason}")]
pub struct IdError {
    what: &'static str,
    value: String,
    reason: &'static str,
}

macro_rules! serde_via_str {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                raw.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A Proxmox VM id: 100 ..= 999_999_999, as the API's `pve-vmid` format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Vmid(u32);

impl Vmid {
    pub const MIN: u32 = 100;
    pub const MAX: u32 = 999_999_999;

    pub fn new(raw: u64) -> Result<Self, IdError> {
        if (u64::from(Self::MIN)..=u64::from(Self::MAX)).contains(&raw) {
            Ok(Vmid(raw as u32))
        } else {
            Err(IdError {
                what: "VMID",
                value: raw.to_string(),
                reason: "Proxmox accepts 100 to 999999999",
            })
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Vmid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Vmid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vmid::new(u64::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// An inclusive range of VMIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmidRange {
    pub first: Vmid,
    pub last: Vmid,
}

impl VmidRange {
    pub fn contains(&self, id: Vmid) -> bool {
        self.first <= id && id <= self.last
    }

    pub fn overlaps(&self, other: &VmidRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    /// Ids in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = Vmid> {
        self.iter_from(self.first)
    }

    /// Ids from `from` on (or from the first, when `from` is below it), in
    /// ascending order.
    pub fn iter_from(&self, from: Vmid) -> impl Iterator<Item = Vmid> {
        (from.0.max(self.first.0)..=self.last.0).map(Vmid)
    }
}

impl fmt::Display for VmidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.first, self.last)
    }
}

/// A Proxmox node name (`pve-node` format: a DNS label).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(String);

impl NodeName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A node name is used where the API takes `&str` (`client.start(&node, …)`).
impl std::ops::Deref for NodeName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if is_dns_label(s) {
            Ok(NodeName(s.to_owned()))
        } else {
            Err(IdError {
                what: "node name",
                value: s.to_owned(),
                reason: "a node name is letters, digits and -, not starting or ending with -",
            })
        }
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
serde_via_str!(NodeName);

/// True for `[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?`: what Proxmox
/// accepts for VM and node names (and what a host name label must be).
pub fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A SHA-256 digest, printed as lower-case hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Sha256(bytes)
    }

    pub fn digest(data: &[u8]) -> Self {
        use sha2::Digest;
        Sha256(sha2::Sha256::digest(data).into())
    }
}

impl FromStr for Sha256 {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let err = |reason| IdError {
            what: "sha256",
            value: s.to_owned(),
            reason,
        };
        let hex: String = s.chars().filter(|c| *c != ':').collect();
        if hex.len() != 64 {
            return Err(err("a SHA-256 digest is 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| err("a SHA-256 digest is 64 hex digits"))?;
        }
        Ok(Sha256(out))
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
serde_via_str!(Sha256);

/// A disk size as the fleet writes it (`30G`), kept in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskSize {
    mib: u64,
}

impl DiskSize {
    pub fn mib(self) -> u64 {
        self.mib
    }
}

const SIZE_UNITS: &[(char, u64)] = &[('M', 1), ('G', 1024), ('T', 1024 * 1024)];

/// Parses `<whole number><unit>` into base units (`units` ascending).
fn parse_scaled(s: &str, units: &[(char, u64)], err: impl Fn() -> IdError) -> Result<u64, IdError> {
    let unit = s.chars().last().ok_or_else(&err)?;
    let factor = units.iter().find(|(u, _)| *u == unit).ok_or_else(&err)?.1;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| err())?;
    n.checked_mul(factor).ok_or_else(err)
}

/// Prints `value` in the largest unit that divides it exactly.
fn format_scaled(f: &mut fmt::Formatter<'_>, value: u64, units: &[(char, u64)]) -> fmt::Result {
    let (unit, factor) = units
        .iter()
        .rev()
        .find(|(_, factor)| value > 0 && value.is_multiple_of(*factor))
        .unwrap_or(&units[0]);
    write!(f, "{}{unit}", value / factor)
}

impl FromStr for DiskSize {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let err = || IdError {
            what: "disk size",
            value: s.to_owned(),
            reason: "write a whole number with a unit M, G or T, e.g. 30G",
        };
        match parse_scaled(s, SIZE_UNITS, err)? {
            0 => Err(err()),
            mib => Ok(DiskSize { mib }),
        }
    }
}

impl fmt::Display for DiskSize {
    /// Largest exact unit, the way Proxmox prints `size=`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        format_scaled(f, self.mib, SIZE_UNITS)
    }
}
serde_via_str!(DiskSize);

/// A duration written `90s`, `10m`, `1h30m` or `500ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(std::time::Duration);

impl HumanDuration {
    pub fn get(self) -> std::time::Duration {
        self.0
    }
}

impl FromStr for HumanDuration {
    type Err = IdError;
    /// `90s`, `5m`, `1h30m`, `1h 30m`, `500ms`: whole numbers with the units
    /// the fleet schema allows (humantime, which does the arithmetic, would
    /// also take days, weeks and more).
    fn from_str(s: &str) -> Result<Self, IdError> {
        let err = || IdError {
            what: "duration",
            value: s.to_owned(),
            reason: "write whole numbers with a unit ms, s, m or h, e.g. 90s, 1h30m or 500ms",
        };
        let units_ok = s
            .split(|c: char| c.is_ascii_digit() || c == ' ')
            .filter(|unit| !unit.is_empty())
            .all(|unit| matches!(unit, "ms" | "s" | "m" | "h"));
        let duration = humantime::parse_duration(s).map_err(|_| err())?;
        if !units_ok || duration.is_zero() {
            return Err(err());
        }
        Ok(HumanDuration(duration))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}
serde_via_str!(HumanDuration);

/// `len` random hexadecimal digits: per-run tokens and lock IDs.
pub fn random_hex(len: usize) -> String {
    (0..len)
        .map(|_| format!("{:x}", rand::random::<u8>() % 16))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmid_accepts_only_the_proxmox_range() {
        assert!(Vmid::new(99).is_err());
        assert_eq!(Vmid::new(100).unwrap().get(), 100);
        assert_eq!(Vmid::new(999_999_999).unwrap().get(), 999_999_999);
        assert!(Vmid::new(1_000_000_000).is_err());
    }

    #[test]
    fn dns_labels_reject_underscores_dots_and_edge_hyphens() {
        assert!(is_dns_label("nixos-prod-01"));
        assert!(!is_dns_label("nixos_prod"));
        assert!(!is_dns_label("a.b"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a-"));
        assert!(!is_dns_label(&"a".repeat(64)));
    }

    #[test]
    fn disk_size_prints_in_the_largest_exact_unit() {
        let s: DiskSize = "2048M".parse().unwrap();
        assert_eq!(s.to_string(), "2G");
        assert_eq!("30G".parse::<DiskSize>().unwrap().mib(), 30 * 1024);
        assert!("0G".parse::<DiskSize>().is_err());
        assert!("30GB".parse::<DiskSize>().is_err());
        assert!("".parse::<DiskSize>().is_err());
    }

    #[test]
    fn durations_take_compound_forms_and_round_trip() {
        let parse = |s: &str| s.parse::<HumanDuration>().map(|d| d.get());
        assert_eq!(parse("120s").unwrap().as_secs(), 120);
        assert_eq!(parse("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse("1h 30m").unwrap().as_secs(), 5400);
        assert_eq!(parse("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse("1m30s").unwrap().as_secs(), 90);
        for bad in ["5d", "0s", "90", "1.5h", "", "m"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        for text in ["120s", "1h30m", "500ms", "90s"] {
            let d: HumanDuration = text.parse().unwrap();
            assert_eq!(d.to_string().parse::<HumanDuration>().unwrap(), d, "{text}");
        }
        assert_eq!("120s".parse::<HumanDuration>().unwrap().to_string(), "2m");
    }

    #[test]
    fn sha256_round_trips_hex_with_or_without_colons() {
        let hex = "ab".repeat(32);
        let with_colons = vec!["AB"; 32].join(":");
        assert_eq!(hex.parse::<Sha256>().unwrap().to_string(), hex);
        assert_eq!(with_colons.parse::<Sha256>().unwrap().to_string(), hex);
        assert!("abc".parse::<Sha256>().is_err());
    }

    #[test]
    fn ranges_overlap_inclusively() {
        let r = |a, b| VmidRange {
            first: Vmid::new(a).unwrap(),
            last: Vmid::new(b).unwrap(),
        };
        assert!(r(100, 200).overlaps(&r(200, 300)));
        assert!(!r(100, 199).overlaps(&r(200, 300)));
    }
}
