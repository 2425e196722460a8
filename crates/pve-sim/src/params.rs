//! Parameter schemas of the routes the simulator serves, and their
//! validation with Proxmox's own messages (pve-common JSONSchema).
//!
//! The declarations are written by hand from the Proxmox VE API schema; the
//! conformance test (`tests/conformance.rs`) checks them against
//! `apidoc.json` so they cannot drift. Validation happens before any
//! handler runs, like `PVE::RESTHandler`: a failure is a 400 with an
//! `errors` map and nothing is changed.

use std::collections::BTreeMap;

/// The basic JSON Schema type of a parameter, as the API schema declares it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Integer {
        min: Option<i64>,
        max: Option<i64>,
    },
    Number {
        min: Option<f64>,
        max: Option<f64>,
    },
    Boolean,
    String,
    /// A list of strings: a repeated form key (joined with NUL on arrival,
    /// as pve-http-server does) or a JSON array.
    Array,
}

impl Kind {
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Integer { .. } => "integer",
            Kind::Number { .. } => "number",
            Kind::Boolean => "boolean",
            Kind::String => "string",
            Kind::Array => "array",
        }
    }
}

/// Extra checks on a string parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    None,
    Enum(&'static [&'static str]),
    /// An anchored pattern, checked by a small matcher per name.
    Pattern(Pattern),
    /// A named pve-common format.
    Format(Format),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    HttpUrl,
    DiskSize,
    ContentSize,
    /// `user@realm` (`pve-userid`).
    UserId,
    /// `user@realm` or `user@realm!token`.
    AuthId,
    /// A token name: `[A-Za-z][A-Za-z0-9.\-_]+`.
    TokenName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    PveNode,
    PveStorageId,
    DnsName,
    TagList,
    ConfigIdList,
    /// `pve-configid`: one id, at most 40 characters here (snapshot names).
    ConfigId,
    UrlEncoded,
    AddressList,
    PoolId,
    /// A QEMU property string checked field by field ([`crate::formats`]).
    Qm(crate::formats::QmFormat),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Param {
    /// The schema's name, `net[n]` for indexed keys.
    pub name: &'static str,
    pub kind: Kind,
    pub optional: bool,
    pub check: Check,
}

const fn p(name: &'static str, kind: Kind, optional: bool, check: Check) -> Param {
    Param {
        name,
        kind,
        optional,
        check,
    }
}

pub const INT: Kind = Kind::Integer {
    min: None,
    max: None,
};
pub const fn int(min: i64, max: Option<i64>) -> Kind {
    Kind::Integer {
        min: Some(min),
        max,
    }
}
pub const BOOL: Kind = Kind::Boolean;
pub const STR: Kind = Kind::String;
pub const ARRAY: Kind = Kind::Array;
pub const VMID: Kind = int(100, Some(999_999_999));

pub const fn req(name: &'static str, kind: Kind) -> Param {
    p(name, kind, false, Check::None)
}
pub const fn opt(name: &'static str, kind: Kind) -> Param {
    p(name, kind, true, Check::None)
}
pub const fn req_c(name: &'static str, kind: Kind, check: Check) -> Param {
    p(name, kind, false, check)
}
pub const fn opt_c(name: &'static str, kind: Kind, check: Check) -> Param {
    p(name, kind, true, check)
}

pub const NODE: Param = req_c("node", STR, Check::Format(Format::PveNode));

/// Index ranges of indexed config keys (`net[n]` → net0 … net31).
pub fn index_range(base: &str) -> Option<std::ops::RangeInclusive<u32>> {
    Some(match base {
        "ide" => 0..=3,
        "sata" => 0..=5,
        "scsi" => 0..=30,
        "virtio" => 0..=15,
        "net" | "ipconfig" => 0..=31,
        "serial" => 0..=3,
        "parallel" => 0..=2,
        "unused" => 0..=255,
        "hostpci" => 0..=15,
        "usb" => 0..=13,
        "numa" => 0..=7,
        "virtiofs" => 0..=9,
        _ => return None,
    })
}

/// Finds the declaration that `name` (as sent) matches.
pub fn lookup<'a>(params: &'a [Param], name: &str) -> Option<&'a Param> {
    params.iter().find(|p| match p.name.strip_suffix("[n]") {
        Some(base) => name
            .strip_prefix(base)
            .filter(|idx| {
                !idx.is_empty()
                    && idx.bytes().all(|b| b.is_ascii_digit())
                    && !(idx.len() > 1 && idx.starts_with('0'))
            })
            .and_then(|idx| idx.parse::<u32>().ok())
            .is_some_and(|i| index_range(base).is_some_and(|r| r.contains(&i))),
        None => p.name == name,
    })
}

/// Validates `given` against `params`; returns Proxmox's `errors` map.
pub fn validate(params: &[Param], given: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut errors = BTreeMap::new();
    for (name, value) in given {
        match lookup(params, name) {
            None => {
                errors.insert(
                    name.clone(),
                    "property is not defined in schema and the schema does not allow additional properties".to_owned(),
                );
            }
            Some(param) => {
                if let Err(reason) = check_value(param, name, value) {
                    errors.insert(name.clone(), reason);
                }
            }
        }
    }
    for param in params
        .iter()
        .filter(|p| !p.optional && !p.name.ends_with("[n]"))
    {
        if !given.contains_key(param.name) {
            errors.insert(
                param.name.to_owned(),
                "property is missing and it is not optional".to_owned(),
            );
        }
    }
    errors
}

/// Parses `value` as `type_name` and checks it against `min`/`max`.
fn check_range<T>(
    value: &str,
    type_name: &str,
    min: Option<T>,
    max: Option<T>,
) -> Result<(), String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let n: T = value
        .trim()
        .parse()
        .map_err(|_| format!("type check ('{type_name}') failed - got '{value}'"))?;
    if let Some(min) = min
        && n < min
    {
        return Err(format!("value must have a minimum value of {min}"));
    }
    if let Some(max) = max
        && n > max
    {
        return Err(format!("value must have a maximum value of {max}"));
    }
    Ok(())
}

fn check_value(param: &Param, name: &str, value: &str) -> Result<(), String> {
    match param.kind {
        Kind::Integer { min, max } => check_range(value, "integer", min, max)?,
        Kind::Number { min, max } => check_range(value, "number", min, max)?,
        Kind::Boolean => {
            if !matches!(value, "0" | "1") {
                return Err(format!("type check ('boolean') failed - got '{value}'"));
            }
        }
        Kind::String | Kind::Array => {}
    }
    match param.check {
        Check::None => Ok(()),
        Check::Enum(values) => {
            if values.contains(&value) {
                Ok(())
            } else {
                Err(format!(
                    "value '{value}' does not have a value in the enumeration '{}'",
                    values.join(", ")
                ))
            }
        }
        Check::Pattern(pattern) => {
            if pattern_matches(pattern, value) {
                Ok(())
            } else {
                Err("value does not match the regex pattern".to_owned())
            }
        }
        Check::Format(format) => check_format(format, name, value),
    }
}

fn pattern_matches(pattern: Pattern, value: &str) -> bool {
    match pattern {
        Pattern::HttpUrl => value.starts_with("http://") || value.starts_with("https://"),
        // `\+?\d+(\.\d+)?[KMGT]?`
        Pattern::DiskSize => {
            let v = value.strip_prefix('+').unwrap_or(value);
            let v = v.strip_suffix(['K', 'M', 'G', 'T']).unwrap_or(v);
            let mut parts = v.splitn(2, '.');
            let whole = parts.next().unwrap_or("");
            let frac = parts.next();
            !whole.is_empty()
                && whole.bytes().all(|b| b.is_ascii_digit())
                && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
        }
        Pattern::UserId => is_userid(value),
        Pattern::AuthId => match value.split_once('!') {
            Some((user, token)) => is_userid(user) && is_token_name(token),
            None => is_userid(value),
        },
        Pattern::TokenName => is_token_name(value),
        // `\d+[MG]?`
        Pattern::ContentSize => {
            let v = value.strip_suffix(['M', 'G']).unwrap_or(value);
            !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())
        }
    }
}

/// `[^\s:/]+@[A-Za-z][A-Za-z0-9.\-_]+`.
fn is_userid(s: &str) -> bool {
    s.rsplit_once('@').is_some_and(|(name, realm)| {
        !name.is_empty()
            && !name.contains(|c: char| c.is_whitespace() || c == ':' || c == '/')
            && is_token_name(realm)
    })
}

/// `[A-Za-z][A-Za-z0-9.\-_]+` (realms and token names).
fn is_token_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b".-_".contains(c))
}

pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn check_format(format: Format, name: &str, value: &str) -> Result<(), String> {
    let ok = match format {
        Format::PveNode => is_dns_label(value),
        Format::PveStorageId | Format::PoolId => {
            let b = value.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphabetic()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
        }
        Format::DnsName => !value.is_empty() && value.split('.').all(is_dns_label),
        Format::TagList => split_list(value).all(|t| {
            let b = t.as_bytes();
            !b.is_empty()
                && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"_-+.".contains(c))
        }),
        Format::ConfigId => {
            value.len() <= 40
                && value
                    .as_bytes()
                    .first()
                    .is_some_and(u8::is_ascii_alphabetic)
                && value
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        }
        Format::ConfigIdList => split_list(value).all(|k| {
            !k.is_empty()
                && k.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        }),
        Format::UrlEncoded => value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-%_.!~*'()".contains(&c)),
        Format::AddressList => split_list(value).all(|a| a.parse::<std::net::IpAddr>().is_ok()),
        Format::Qm(format) => return crate::formats::check(format, name, value),
    };
    if ok {
        Ok(())
    } else {
        Err(match format {
            Format::UrlEncoded => format!(
                "invalid format - value '{value}' does not look like a valid url-encoded string"
            ),
            Format::TagList => format!("invalid format - invalid characters in tag list '{value}'"),
            Format::PveNode => {
                "invalid format - value does not look like a valid node name".to_owned()
            }
            _ => format!("invalid format - value '{value}' does not match the format"),
        })
    }
}

/// pve-common's list separators: `,`, `;`, whitespace (and NUL).
pub fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(|c: char| c == ',' || c == ';' || c == '\0' || c.is_whitespace())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn messages_are_proxmoxs() {
        let params = [
            NODE,
            req("vmid", VMID),
            opt("full", BOOL),
            opt("net[n]", STR),
        ];
        let errors = validate(
            &params,
            &map(&[
                ("vmid", "99"),
                ("full", "true"),
                ("bogus", "1"),
                ("net32", "x"),
            ]),
        );
        assert_eq!(errors["vmid"], "value must have a minimum value of 100");
        assert_eq!(errors["full"], "type check ('boolean') failed - got 'true'");
        assert!(errors["bogus"].starts_with("property is not defined in schema"));
        assert!(errors["net32"].starts_with("property is not defined in schema"));
        assert_eq!(errors["node"], "property is missing and it is not optional");
        assert!(
            validate(
                &params,
                &map(&[("node", "pve"), ("vmid", "100"), ("net31", "x")])
            )
            .is_empty()
        );
    }

    #[test]
    fn indexed_names_do_not_accept_leading_zeros() {
        let params = [opt("scsi[n]", STR)];
        assert!(lookup(&params, "scsi0").is_some());
        assert!(lookup(&params, "scsi30").is_some());
        assert!(lookup(&params, "scsi01").is_none());
        assert!(lookup(&params, "scsi").is_none());
    }

    #[test]
    fn disk_size_pattern() {
        for ok in ["10G", "+5G", "1.5T", "1024"] {
            assert!(pattern_matches(Pattern::DiskSize, ok), "{ok}");
        }
        for bad in ["G", "+", "1.G", "10GB", "-1G"] {
            assert!(!pattern_matches(Pattern::DiskSize, bad), "{bad}");
        }
    }
}
