//! Addresses: what a change acts on, typed. Printed as the user writes
//! them (`vm.web`, `iso.nixos[pve]`, `image.golden[pve]`,
//! `image.golden[pve] generation 3`) and parsed back from saved plans.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The thing a change acts on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Address {
    /// An installer ISO's file on one node.
    Iso { name: String, node: String },
    /// The build of an image's next generation on one node.
    Image { name: String, node: String },
    /// One node's template of an existing generation (retired).
    Generation {
        image: String,
        node: String,
        number: u32,
    },
    /// A VM of the fleet.
    Vm { name: String },
}

impl Address {
    pub fn vm(name: &str) -> Self {
        Address::Vm {
            name: name.to_owned(),
        }
    }

    pub fn iso(name: &str, node: &str) -> Self {
        Address::Iso {
            name: name.to_owned(),
            node: node.to_owned(),
        }
    }

    pub fn image(name: &str, node: &str) -> Self {
        Address::Image {
            name: name.to_owned(),
            node: node.to_owned(),
        }
    }

    pub fn generation(image: &str, node: &str, number: u32) -> Self {
        Address::Generation {
            image: image.to_owned(),
            node: node.to_owned(),
            number,
        }
    }

    /// The kind of resource: `iso`, `image` or `vm`.
    pub fn kind(&self) -> &'static str {
        match self {
            Address::Iso { .. } => "iso",
            Address::Image { .. } | Address::Generation { .. } => "image",
            Address::Vm { .. } => "vm",
        }
    }

    /// The resource's name in the fleet.
    pub fn name(&self) -> &str {
        match self {
            Address::Iso { name, .. } | Address::Image { name, .. } | Address::Vm { name } => name,
            Address::Generation { image, .. } => image,
        }
    }

    /// The node of a per-node address.
    pub fn node(&self) -> Option<&str> {
        match self {
            Address::Iso { node, .. }
            | Address::Image { node, .. }
            | Address::Generation { node, .. } => Some(node),
            Address::Vm { .. } => None,
        }
    }

    /// The generation a retired template holds.
    pub fn generation_number(&self) -> Option<u32> {
        match self {
            Address::Generation { number, .. } => Some(*number),
            _ => None,
        }
    }

    /// The resource the address belongs to, as `--target` names it
    /// (`vm.NAME`, `iso.NAME`, `image.NAME`).
    pub fn resource(&self) -> String {
        format!("{}.{}", self.kind(), self.name())
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Iso { name, node } => write!(f, "iso.{name}[{node}]"),
            Address::Image { name, node } => write!(f, "image.{name}[{node}]"),
            Address::Generation {
                image,
                node,
                number,
            } => write!(f, "image.{image}[{node}] generation {number}"),
            Address::Vm { name } => write!(f, "vm.{name}"),
        }
    }
}

/// An address that is none of the four shapes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not an address (vm.NAME, iso.NAME[NODE], image.NAME[NODE] or image.NAME[NODE] generation N)"
)]
pub struct AddressError(String);

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || AddressError(s.to_owned());
        if let Some(name) = s.strip_prefix("vm.") {
            return Ok(Address::vm(name));
        }
        let (head, number) = match s.split_once(" generation ") {
            Some((head, n)) => (head, Some(n.parse::<u32>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let (resource, node) = head
            .strip_suffix(']')
            .and_then(|h| h.split_once('['))
            .ok_or_else(bad)?;
        match (resource.split_once('.'), number) {
            (Some(("iso", name)), None) => Ok(Address::iso(name, node)),
            (Some(("image", name)), None) => Ok(Address::image(name, node)),
            (Some(("image", name)), Some(n)) => Ok(Address::generation(name, node, n)),
            _ => Err(bad()),
        }
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_prints_and_parses_back() {
        for text in [
            "vm.web-01",
            "iso.nixos[pve]",
            "image.golden[pve2]",
            "image.golden[pve] generation 3",
        ] {
            let address: Address = text.parse().unwrap();
            assert_eq!(address.to_string(), text);
        }
        assert_eq!(
            "image.golden[pve] generation 3"
                .parse::<Address>()
                .unwrap()
                .resource(),
            "image.golden"
        );
    }

    #[test]
    fn addresses_split_into_kind_name_node_and_generation() {
        let a: Address = "image.golden[pve-2] generation 3".parse().unwrap();
        assert_eq!(
            (a.kind(), a.name(), a.node(), a.generation_number()),
            ("image", "golden", Some("pve-2"), Some(3))
        );
        let a = Address::vm("web-01");
        assert_eq!(
            (a.kind(), a.name(), a.node(), a.generation_number()),
            ("vm", "web-01", None, None)
        );
    }

    #[test]
    fn other_text_is_not_an_address() {
        for text in ["web", "iso.nixos", "image.g[pve] generation x", "disk.a[b]"] {
            assert!(text.parse::<Address>().is_err(), "{text}");
        }
    }
}
