//! The simulated guest's NixOS: what `nixos-install` makes of a
//! configuration, decided by the facts table ([`facts`]) applied to the
//! configuration's literal definitions ([`eval`]).
//!
//! It fails the way NixOS fails (a definition of the wrong type, two
//! different values for an option that does not merge, a broken
//! assertion — each with the module system's own wording), and otherwise
//! yields the [`System`]: the programs on root's `PATH` and the units the
//! configuration enables. Nothing here is special-cased per option: a new
//! behaviour is a new row in the facts.

pub mod eval;
pub mod facts;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use eval::{Definition, Value};
use facts::{Cond, Exit, Lit, OptionFact, Start, Type, UnitKind};

/// An installed system, as far as the guest model needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct System {
    /// Programs in /run/current-system/sw/bin.
    pub programs: BTreeSet<String>,
    pub units: Vec<Unit>,
}

/// A unit the configuration enables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    pub name: String,
    pub kind: UnitKind,
    pub start: Start,
    pub exit: Exit,
}

/// What the VM looks like at boot, for the units that depend on it.
#[derive(Debug, Clone, Copy)]
pub struct Hardware {
    /// Proxmox `agent: 1`: the guest-agent virtio port exists.
    pub agent_port: bool,
    /// A cloud-init drive (NoCloud/ConfigDrive) is attached.
    pub cloud_init_drive: bool,
    /// Boot has finished: oneshot units have exited.
    pub settled: bool,
}

impl System {
    pub fn has_program(&self, program: &str) -> bool {
        self.programs.contains(program)
    }

    /// `systemctl is-active UNIT`'s answer after boot on `hw`.
    pub fn unit_state(&self, name: &str, hw: Hardware) -> &'static str {
        let name = name.strip_suffix(".service").unwrap_or(name);
        // A socket is named with its suffix (`sshd.socket`).
        let Some(unit) = self.units.iter().find(|u| u.name == name) else {
            return "inactive";
        };
        if unit.start == Start::GuestAgentPort && !hw.agent_port {
            return "inactive";
        }
        let code = match unit.exit {
            Exit::RecoverableWithoutDatasource if !hw.cloud_init_drive => 2,
            _ => 0,
        };
        match unit.kind {
            UnitKind::Daemon => "active",
            // systemd.service(5): a oneshot unit is "activating" until its
            // process exits.
            UnitKind::Oneshot { .. } if !hw.settled && unit.start == Start::Boot => "activating",
            UnitKind::Oneshot { .. } if code != 0 => "failed",
            UnitKind::Oneshot {
                remain_after_exit: true,
            } => "active",
            UnitKind::Oneshot {
                remain_after_exit: false,
            } => "inactive",
        }
    }
}

/// Why NixOS rejects a configuration: Nix's error text, and the nixpkgs
/// file whose rule it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixError {
    pub text: String,
    pub rule: &'static str,
}

impl std::fmt::Display for NixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Evaluates `configuration.nix` as `nixos-install` would: the system, or
/// Nix's error.
pub fn evaluate(text: &str) -> Result<System, NixError> {
    let defs = eval::definitions(text).map_err(|e| NixError {
        text: format!("error: {e}"),
        rule: "the Nix parser",
    })?;
    let config = Config { defs: &defs };
    config.check_types()?;
    config.check_conflicts()?;
    config.check_assertions()?;
    Ok(config.system())
}

/// The value `text` literally defines for `path` (dotted), if any: the
/// last definition, unless it is not a literal (`lib.mkForce …`).
pub fn literal(text: &str, path: &str) -> Option<Value> {
    let defs = eval::definitions(text).ok()?;
    defs.iter()
        .rev()
        .find(|d| d.path.join(".") == path)
        .map(|d| d.value.clone())
        .filter(|v| !matches!(v, Value::Other(_)))
}

/// Option paths defined in `text` that no fact covers (for tests that keep
/// the facts complete for what nixgold renders).
pub fn uncovered(text: &str) -> Result<Vec<String>, String> {
    Ok(eval::definitions(text)?
        .iter()
        .filter(|d| d.path != ["imports"] && fact_for(&d.path).is_none())
        .map(|d| d.path.join("."))
        .collect())
}

/// The programs a shell script runs: the first word of each command
/// (after `;`, `&&`, `||`, `|`, `$(`), without shell keywords, builtins,
/// variable assignments and the script's own functions.
pub fn script_programs(script: &str) -> Vec<String> {
    const SHELL: &[&str] = &[
        "if", "then", "else", "fi", "for", "in", "do", "done", "case", "esac", "return", "set",
        "local", "exit", "true", "false", "[", "{", "}", "echo", "printf",
    ];
    let functions: Vec<&str> = script
        .lines()
        .filter_map(|l| l.split_once("() {").map(|(f, _)| f.trim()))
        .collect();
    let mut out: Vec<String> = Vec::new();
    for line in script
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
    {
        // A function's body starts after `name() {`.
        let body = line.split_once("() {").map_or(line, |(_, b)| b);
        for part in body.replace("$(", "|").split(['|', ';', '&']) {
            let Some(word) = part.split_whitespace().next() else {
                continue;
            };
            let is_program = word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                && word.chars().any(|c| c.is_ascii_alphabetic())
                && !SHELL.contains(&word)
                && !functions.contains(&word);
            if is_program && !out.iter().any(|p| p == word) {
                out.push(word.to_owned());
            }
        }
    }
    out
}

/// The option fact declaring `path`, or else a freeform/submodule option
/// above it.
pub fn fact_for(path: &[String]) -> Option<&'static OptionFact> {
    let matching = |beneath: bool| {
        facts::OPTIONS.iter().find(|f| {
            let pattern: Vec<&str> = f.path.split('.').collect();
            let holds_options = matches!(
                f.ty,
                Type::Freeform | Type::StrOrSubmodule | Type::Submodules
            );
            (!beneath || holds_options) && matches_pattern(&pattern, path, beneath).is_some()
        })
    };
    matching(false).or_else(|| matching(true))
}

/// Whether `path` matches `pattern` (exactly, or anywhere beneath it when
/// `beneath`); the name `<name>` stood for, if any.
fn matches_pattern(pattern: &[&str], path: &[String], beneath: bool) -> Option<Option<String>> {
    if path.len() < pattern.len() || (!beneath && path.len() != pattern.len()) {
        return None;
    }
    let mut name = None;
    for (p, s) in pattern.iter().zip(path) {
        if *p == "<name>" {
            name = Some(s.clone());
        } else if p != s {
            return None;
        }
    }
    Some(name)
}

struct Config<'a> {
    defs: &'a [Definition],
}

/// Nix's way of printing an evaluation error (indented continuation lines).
fn nix_error(text: &str, rule: &'static str) -> NixError {
    let body = text.lines().collect::<Vec<_>>().join("\n       ");
    NixError {
        text: format!("error:\n       {body}"),
        rule,
    }
}

impl Config<'_> {
    /// lib/modules.nix: "A definition for option `…' is not of type `…'".
    fn check_types(&self) -> Result<(), NixError> {
        for d in self.defs {
            let Some(fact) = fact_for(&d.path) else {
                continue;
            };
            let exact = fact.path.split('.').count() == d.path.len();
            if exact && !fits(fact.ty, &d.value) {
                return Err(nix_error(
                    &format!(
                        "A definition for option `{}' is not of type `{}'. Definition values:\n- In `{}': {}",
                        d.path.join("."),
                        fact.ty.description(),
                        d.module,
                        d.value
                    ),
                    "lib/modules.nix (mergeDefinitions)",
                ));
            }
        }
        Ok(())
    }

    /// lib/options.nix `mergeEqualOption`: options that do not merge must
    /// be defined with one value (at one priority).
    fn check_conflicts(&self) -> Result<(), NixError> {
        let mut by_path: BTreeMap<&[String], Vec<&Definition>> = BTreeMap::new();
        for d in self.defs {
            by_path.entry(&d.path).or_default().push(d);
        }
        for (path, defs) in by_path {
            let merges = fact_for(path).is_some_and(|f| f.ty.merges());
            let literal = defs.iter().all(|d| !matches!(d.value, Value::Other(_)));
            if merges || !literal || defs.iter().all(|d| d.value == defs[0].value) {
                continue;
            }
            let values: String = defs
                .iter()
                .map(|d| format!("\n- In `{}': {}", d.module, d.value))
                .collect();
            return Err(nix_error(
                &format!(
                    "The option `{}' has conflicting definition values:{values}\nUse `lib.mkForce value` or `lib.mkDefault value` to change the priority on any of these definitions.",
                    path.join(".")
                ),
                "lib/options.nix (mergeEqualOption)",
            ));
        }
        Ok(())
    }

    fn check_assertions(&self) -> Result<(), NixError> {
        let failed: Vec<(String, &'static str)> = facts::ASSERTIONS
            .iter()
            .flat_map(|a| {
                self.bindings(a.when)
                    .into_iter()
                    .filter(|name| a.when.iter().all(|c| self.holds(c, name.as_deref())))
                    .map(|name| (bind(a.message, name.as_deref()), a.file))
            })
            .collect();
        let Some((_, rule)) = failed.first() else {
            return Ok(());
        };
        let list: String = failed.iter().map(|(m, _)| format!("\n- {m}")).collect();
        Err(nix_error(&format!("Failed assertions:{list}"), rule))
    }

    /// The names `<name>` takes in `conds` (one `None` when none uses it).
    fn bindings(&self, conds: &[Cond]) -> Vec<Option<String>> {
        let pattern = conds.iter().find_map(|c| match c {
            Cond::Is(p, _) | Cond::IsNot(p, _) | Cond::Set(p) | Cond::Unset(p)
                if p.contains("<name>") =>
            {
                Some(*p)
            }
            _ => None,
        });
        let Some(pattern) = pattern else {
            return vec![None];
        };
        let pattern: Vec<&str> = pattern.split('.').collect();
        let names: BTreeSet<String> = self
            .defs
            .iter()
            .filter_map(|d| matches_pattern(&pattern, &d.path, false).flatten())
            .collect();
        names.into_iter().map(Some).collect()
    }

    fn holds(&self, cond: &Cond, name: Option<&str>) -> bool {
        match cond {
            Cond::Always => true,
            Cond::Is(p, lit) => self.value_is(&bind(p, name), *lit),
            Cond::IsNot(p, lit) => !self.value_is(&bind(p, name), *lit),
            Cond::Set(p) => self.is_set(&bind(p, name)),
            Cond::Unset(p) => !self.is_set(&bind(p, name)),
        }
    }

    fn value_is(&self, path: &str, lit: Lit) -> bool {
        let defined = self
            .defs
            .iter()
            .rev()
            .find(|d| d.path.join(".") == path && !matches!(d.value, Value::Other(_)));
        match (defined, lit) {
            (Some(d), Lit::Bool(b)) => d.value == Value::Bool(b),
            (Some(d), Lit::Package(p)) => d.value == Value::Package(p.to_owned()),
            (None, lit) => facts::OPTIONS
                .iter()
                .any(|f| f.path == path && f.default == Some(lit)),
        }
    }

    fn is_set(&self, path: &str) -> bool {
        let prefix: Vec<&str> = path.split('.').collect();
        self.defs.iter().any(|d| {
            d.path.len() >= prefix.len() && d.path.iter().zip(&prefix).all(|(a, b)| a == b)
        })
    }

    fn system(&self) -> System {
        let mut system = System::default();
        let provided = facts::PROVIDES
            .iter()
            .filter(|p| p.when.iter().all(|c| self.holds(c, None)));
        for p in provided {
            system
                .programs
                .extend(p.programs.iter().map(|s| (*s).to_owned()));
            system.units.extend(
                p.units
                    .iter()
                    .filter(|u| {
                        !self.value_is(
                            &format!("systemd.services.{}.enable", u.name),
                            Lit::Bool(false),
                        )
                    })
                    .map(|u| Unit {
                        name: u.name.to_owned(),
                        kind: u.kind,
                        start: u.start,
                        exit: u.exit,
                    }),
            );
        }
        // A package's program is taken to be its attribute name.
        for d in self
            .defs
            .iter()
            .filter(|d| d.path == ["environment", "systemPackages"])
        {
            if let Value::List(items) = &d.value {
                system.programs.extend(items.iter().filter_map(|i| match i {
                    Value::Package(p) => p.rsplit('.').next().map(str::to_owned),
                    _ => None,
                }));
            }
        }
        system
    }
}

fn bind(text: &str, name: Option<&str>) -> String {
    match name {
        Some(n) => text.replace("<name>", n),
        None => text.to_owned(),
    }
}

/// Whether a literal definition fits `ty` (non-literals are not judged).
fn fits(ty: Type, value: &Value) -> bool {
    let all = |items: &[Value], f: &dyn Fn(&Value) -> bool| {
        items.iter().all(|i| matches!(i, Value::Other(_)) || f(i))
    };
    match (ty, value) {
        (_, Value::Other(_)) => true,
        (Type::Bool, v) => matches!(v, Value::Bool(_)),
        (Type::Str | Type::StrOrSubmodule | Type::Lines, v) => matches!(v, Value::Str(_)),
        (Type::Enum(allowed), Value::Str(s)) => allowed.contains(&s.as_str()),
        (Type::Enum(_), _) => false,
        (Type::Package, v) => matches!(v, Value::Package(_)),
        (Type::Ports, Value::List(items)) => all(
            items,
            &|i| matches!(i, Value::Int(n) if (0..=65535).contains(n)),
        ),
        (Type::Strings, Value::List(items)) => all(items, &|i| matches!(i, Value::Str(_))),
        (Type::Packages, Value::List(items)) => all(items, &|i| matches!(i, Value::Package(_))),
        (Type::Submodules, Value::List(_)) => true,
        (Type::Ports | Type::Strings | Type::Packages | Type::Submodules, _) => false,
        (Type::Freeform, _) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration that passes every recorded assertion, plus `extra`.
    fn config(extra: &str) -> String {
        format!(
            "{{ pkgs, ... }}: {{\n  boot.loader.grub.device = \"/dev/sda\";\n  fileSystems.\"/\".device = \"/dev/disk/by-label/nixos\";\n  networking.useNetworkd = true;\n{extra}\n}}"
        )
    }

    const HW: Hardware = Hardware {
        agent_port: true,
        cloud_init_drive: false,
        settled: true,
    };

    #[test]
    fn the_command_reader_finds_what_a_script_runs() {
        let found = script_programs(
            "step() { printf '%s' x; }\nstep \"go\"\nDISK=\"$(lsblk -d | awk '{ print $1 }' | head -n 1)\"\nudevadm settle && mkfs.ext4 -q x\ncase \"$D\" in\n  *[0-9]) echo p ;;\nesac\n",
        );
        assert_eq!(found, ["lsblk", "awk", "head", "udevadm", "mkfs.ext4"]);
    }

    #[test]
    fn assertions_fail_with_nixos_s_own_text() {
        // nixos/modules/tasks/network-interfaces-systemd.nix
        let err = evaluate(&config("networking.defaultGateway = \"10.0.0.1\";")).unwrap_err();
        assert_eq!(
            err.rule,
            "nixos/modules/tasks/network-interfaces-systemd.nix"
        );
        assert_eq!(
            err.text,
            "error:\n       Failed assertions:\n       - networking.defaultGateway.interface is not optional when using networkd."
        );
        let fine =
            "networking.defaultGateway = { address = \"10.0.0.1\"; interface = \"ens18\"; };";
        assert!(evaluate(&config(fine)).is_ok());
        // The submodule's own options are typed too.
        let wrong = "networking.defaultGateway = { address = \"10.0.0.1\"; interface = 18; };";
        assert!(evaluate(&config(wrong)).unwrap_err().text.contains(
            "A definition for option `networking.defaultGateway.interface' is not of type `string'."
        ));
        // nixos/modules/config/users-groups.nix, bound to the user's name.
        let err = evaluate(&config("users.users.ops.shell = pkgs.zsh;"))
            .unwrap_err()
            .text;
        assert!(
            err.contains("- users.users.ops.shell is set to zsh, but\n       programs.zsh.enable is not true."),
            "{err}"
        );
        let fine = "users.users.ops.shell = pkgs.zsh; programs.zsh.enable = true;";
        assert!(evaluate(&config(fine)).is_ok());
        // grub.nix and stage-1.nix, both at once.
        let err = evaluate("{ ... }: { }").unwrap_err().text;
        assert!(
            err.contains("- The ‘fileSystems’ option does not specify your root file system.\n       - You must set the option ‘boot.loader.grub.devices’"),
            "{err}"
        );
        let efi = "{ ... }: { boot.loader.systemd-boot.enable = true; fileSystems.\"/\".device = \"x\"; }";
        assert!(evaluate(efi).is_ok(), "systemd-boot turns grub off");
    }

    #[test]
    fn conflicting_and_mistyped_definitions_fail_like_the_module_system() {
        let two = "{ ... }: { imports = [ ({ ... }: { services.openssh.enable = false; }) ]; services.openssh.enable = true; boot.loader.grub.device = \"/dev/sda\"; fileSystems.\"/\".device = \"x\"; }";
        let err = evaluate(two).unwrap_err().text;
        assert!(
            err.starts_with("error:\n       The option `services.openssh.enable' has conflicting definition values:\n       - In `/etc/nixos/configuration.nix:anon-1': false\n       - In `/etc/nixos/configuration.nix': true"),
            "{err}"
        );
        // Lists merge; mkForce is a priority, not a conflict.
        let merged = two
            .replace("services.openssh.enable = false;", "environment.systemPackages = [ pkgs.git ]; services.openssh.enable = lib.mkForce false;")
            .replace("services.openssh.enable = true;", "services.openssh.enable = true; environment.systemPackages = [ pkgs.vim ];");
        let system = evaluate(&merged).unwrap();
        assert!(system.has_program("git") && system.has_program("vim"));
        let err = evaluate(&config(
            "services.openssh.settings.PermitRootLogin = \"maybe\";",
        ))
        .unwrap_err()
        .text;
        assert!(
            err.contains("A definition for option `services.openssh.settings.PermitRootLogin' is not of type `one of \"yes\", \"without-password\", \"prohibit-password\", \"forced-commands-only\", \"no\"'."),
            "{err}"
        );
    }

    #[test]
    fn path_and_units_follow_the_configuration() {
        let system = evaluate(&config(
            "services.cloud-init.enable = true; services.qemuGuest.enable = true; services.openssh.enable = true;",
        ))
        .unwrap();
        // cloud-init.nix: on its units' path only.
        assert!(!system.has_program("cloud-init") && system.has_program("systemctl"));
        assert_eq!(system.unit_state("sshd", HW), "active");
        // Type=oneshot + RemainAfterExit=yes, exit 0: active (exited).
        assert_eq!(system.unit_state("cloud-init.service", HW), "active");
        // No datasource: "Used fallback datasource" makes the final stage exit 2.
        assert_eq!(system.unit_state("cloud-final", HW), "failed");
        let booting = Hardware {
            settled: false,
            ..HW
        };
        assert_eq!(system.unit_state("cloud-init", booting), "activating");
        assert_eq!(system.unit_state("sshd", booting), "active");
        // The firewall's oneshot runs before the network exists.
        assert_eq!(system.unit_state("firewall", booting), "active");
        let with_drive = Hardware {
            cloud_init_drive: true,
            ..HW
        };
        assert_eq!(system.unit_state("cloud-final", with_drive), "active");
        // qemu-guest-agent.nix: started by udev for the virtio port only.
        assert_eq!(system.unit_state("qemu-guest-agent", HW), "active");
        let no_port = Hardware {
            agent_port: false,
            ..HW
        };
        assert_eq!(system.unit_state("qemu-guest-agent", no_port), "inactive");
        assert_eq!(system.unit_state("nginx", HW), "inactive");
        // systemd.services.<name>.enable = false: the unit is not there.
        let off = evaluate(&config(
            "services.cloud-init.enable = true; systemd.services.cloud-init.enable = false;",
        ))
        .unwrap();
        assert_eq!(off.unit_state("cloud-init", HW), "inactive");
    }
}
