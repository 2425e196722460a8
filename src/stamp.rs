//! The ownership stamp: the last `nixgold: key=value …` line of a VM's
//! description, written by the clone (VMs) or the build (templates) itself.
//!
//! It says which fleet and resource a VM is, and for a template which
//! generation it holds and what that generation was built from — enough to
//! record an interrupted build in the lockfile. This module only parses and
//! prints; what a stamp means is decided by the planner and the executor.
//!
//! The three shapes nixgold writes, in this key order:
//!
//! - a VM: `fleet resource image generation`;
//! - a template being built: `fleet resource generation state=building inputs`;
//! - a finished template: `fleet resource generation inputs iso nixos system`;
//! - a template taken over by `nixgold import`: `fleet resource generation
//!   imported=true` (its build inputs are unknown).

use std::fmt;

use crate::ids::Sha256;

const PREFIX: &str = "nixgold: ";

/// A parsed stamp. `fleet` and `resource` are always there (a line without
/// them is not a stamp); the rest depends on what the VM is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    pub fleet: String,
    /// The resource address: `vm.NAME` or `image.NAME`.
    pub resource: String,
    /// The image a VM was cloned from.
    pub image: Option<String>,
    pub generation: Option<u32>,
    /// A build VM whose build has not finished.
    pub building: bool,
    /// A template taken over by `nixgold import`, not built by nixgold.
    pub imported: bool,
    /// The generation's input hash (templates and build VMs).
    pub inputs: Option<Sha256>,
    /// The ISO's sha256 the template was installed from.
    pub iso: Option<Sha256>,
    /// `nixos-version` of the installed system.
    pub nixos: Option<String>,
    /// The installed system's store path.
    pub system: Option<String>,
}

impl Stamp {
    /// The stamp of a VM cloned from `image`'s generation `generation`.
    pub fn vm(fleet: &str, resource: &str, image: &str, generation: u32) -> Self {
        Stamp {
            fleet: fleet.to_owned(),
            resource: resource.to_owned(),
            image: Some(image.to_owned()),
            generation: Some(generation),
            ..Stamp::default()
        }
    }

    /// Reads the stamp line of a description (the last one, if several).
    pub fn parse(description: &str) -> Option<Stamp> {
        let line = description
            .lines()
            .rev()
            .map(str::trim_start)
            .find(|l| l.starts_with(PREFIX))?;
        let mut stamp = Stamp::default();
        let (mut fleet, mut resource) = (None, None);
        for (key, value) in line[PREFIX.len()..]
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
        {
            let value = value.to_owned();
            match key {
                "fleet" => fleet = Some(value),
                "resource" => resource = Some(value),
                "image" => stamp.image = Some(value),
                "generation" => stamp.generation = value.parse().ok(),
                "state" => stamp.building = value == "building",
                "imported" => stamp.imported = value == "true",
                "inputs" => stamp.inputs = value.parse().ok(),
                "iso" => stamp.iso = value.parse().ok(),
                "nixos" => stamp.nixos = Some(value.replace('_', " ")),
                "system" => stamp.system = Some(value),
                _ => {}
            }
        }
        stamp.fleet = fleet?;
        stamp.resource = resource?;
        Some(stamp)
    }

    /// Whether this stamp says fleet `fleet`'s resource `resource`.
    pub fn is(&self, fleet: &str, resource: &str) -> bool {
        self.fleet == fleet && self.resource == resource
    }

    /// The VM address of a VM's stamp (`vm.NAME`), `None` for templates.
    pub fn vm_address(&self) -> Option<&str> {
        self.resource.starts_with("vm.").then_some(&*self.resource)
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}fleet={} resource={}", self.fleet, self.resource)?;
        if let Some(image) = &self.image {
            write!(f, " image={image}")?;
        }
        if let Some(generation) = self.generation {
            write!(f, " generation={generation}")?;
        }
        if self.building {
            f.write_str(" state=building")?;
        }
        if self.imported {
            f.write_str(" imported=true")?;
        }
        let rest = [
            ("inputs", self.inputs.map(|s| s.to_string())),
            ("iso", self.iso.map(|s| s.to_string())),
            ("nixos", self.nixos.as_ref().map(|v| v.replace(' ', "_"))),
            ("system", self.system.clone()),
        ];
        for (key, value) in rest {
            if let Some(value) = value {
                write!(f, " {key}={value}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_stamp_round_trips_through_a_description() {
        let s = Stamp::vm("homelab", "vm.web", "golden", 3);
        assert_eq!(
            s.to_string(),
            "nixgold: fleet=homelab resource=vm.web image=golden generation=3"
        );
        let parsed = Stamp::parse(&format!("my notes\n\n{s}")).unwrap();
        assert_eq!(parsed, s);
        assert!(parsed.is("homelab", "vm.web"));
        assert_eq!(parsed.vm_address(), Some("vm.web"));
        assert!(Stamp::parse("just notes").is_none());
    }

    #[test]
    fn a_line_without_fleet_or_resource_is_not_a_stamp() {
        assert!(Stamp::parse("nixgold: resource=vm.web").is_none());
        assert!(Stamp::parse("nixgold: fleet=homelab").is_none());
    }

    #[test]
    fn template_stamps_keep_their_key_order_and_spaces() {
        let s = Stamp {
            fleet: "homelab".into(),
            resource: "image.golden".into(),
            generation: Some(2),
            inputs: Some(Sha256::digest(b"inputs")),
            iso: Some(Sha256::digest(b"iso")),
            nixos: Some("24.05.1 (Uakari)".into()),
            system: Some("/nix/store/x".into()),
            ..Stamp::default()
        };
        let text = s.to_string();
        assert_eq!(
            text,
            format!(
                "nixgold: fleet=homelab resource=image.golden generation=2 inputs={} iso={} nixos=24.05.1_(Uakari) system=/nix/store/x",
                Sha256::digest(b"inputs"),
                Sha256::digest(b"iso")
            )
        );
        assert_eq!(Stamp::parse(&text), Some(s));
        let building = format!(
            "nixgold: fleet=f resource=image.g generation=1 state=building inputs={}",
            Sha256::digest(b"inputs")
        );
        let parsed = Stamp::parse(&building).unwrap();
        assert!(parsed.building);
        assert_eq!(parsed.to_string(), building);
    }

    #[test]
    fn an_imported_template_stamp_round_trips() {
        let line = "nixgold: fleet=homelab resource=image.golden generation=1 imported=true";
        let parsed = Stamp::parse(line).unwrap();
        assert!(parsed.imported && !parsed.building);
        assert_eq!(parsed.to_string(), line);
    }
}
