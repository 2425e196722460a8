//! What NixOS does with the options nixgold renders, as data read from
//! nixpkgs' modules (NixOS 24.05 and the current release; the file each
//! fact comes from is named next to it and in docs/nixos.md).
//!
//! Three tables: [`OPTIONS`] (where an option is declared, its type and the
//! default that matters), [`PROVIDES`] (what a setting puts on `PATH` and
//! which systemd units it enables, with their `Type=` and
//! `RemainAfterExit=`), and [`ASSERTIONS`] (NixOS's own assertion text and
//! when it fires). Option paths use `<name>` for one attribute name of an
//! `attrsOf` option.

/// An option's type, as far as a literal definition can be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Bool,
    Str,
    /// `types.enum`.
    Enum(&'static [&'static str]),
    /// `types.listOf types.port`.
    Ports,
    /// `types.listOf` of strings.
    Strings,
    /// `types.listOf types.package`.
    Packages,
    /// A package (`pkgs.NAME`).
    Package,
    /// `types.lines`: definitions are concatenated.
    Lines,
    /// A string, or a submodule whose own options are listed separately
    /// (`networking.defaultGateway`'s `coercedTo str … (submodule …)`).
    StrOrSubmodule,
    /// Freeform settings: anything beneath the path is accepted.
    Freeform,
    /// A list of submodules (not checked value by value).
    Submodules,
}

impl Type {
    /// How the module system names the type in its errors (lib/types.nix).
    pub fn description(self) -> String {
        match self {
            Type::Bool => "boolean".into(),
            Type::Str | Type::StrOrSubmodule => "string".into(),
            Type::Enum(values) => format!(
                "one of {}",
                values
                    .iter()
                    .map(|v| format!("{v:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Type::Ports => {
                "list of 16 bit unsigned integer; between 0 and 65535 (both inclusive)".into()
            }
            Type::Strings => "list of string".into(),
            Type::Packages => "list of package".into(),
            Type::Package => "package".into(),
            Type::Lines => "strings concatenated with \"\\n\"".into(),
            Type::Freeform | Type::Submodules => "attribute set".into(),
        }
    }

    /// Whether several definitions of an option of this type merge
    /// (lists and lines do) rather than having to be equal.
    pub fn merges(self) -> bool {
        matches!(
            self,
            Type::Ports
                | Type::Strings
                | Type::Packages
                | Type::Lines
                | Type::Freeform
                | Type::Submodules
        )
    }
}

/// A literal a condition compares with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lit {
    Bool(bool),
    Package(&'static str),
}

/// One declared option.
#[derive(Debug, Clone, Copy)]
pub struct OptionFact {
    pub path: &'static str,
    pub file: &'static str,
    pub ty: Type,
    /// The default, where a condition depends on it.
    pub default: Option<Lit>,
}

const fn opt(path: &'static str, file: &'static str, ty: Type) -> OptionFact {
    OptionFact {
        path,
        file,
        ty,
        default: None,
    }
}

const fn opt_default(path: &'static str, file: &'static str, ty: Type, default: Lit) -> OptionFact {
    OptionFact {
        path,
        file,
        ty,
        default: Some(default),
    }
}

const SSHD: &str = "nixos/modules/services/networking/ssh/sshd.nix";
const NETWORK: &str = "nixos/modules/tasks/network-interfaces.nix";
const FILESYSTEMS: &str = "nixos/modules/tasks/filesystems.nix";
const USERS: &str = "nixos/modules/config/users-groups.nix";
const CLOUD_INIT: &str = "nixos/modules/services/system/cloud-init.nix";
const GRUB: &str = "nixos/modules/system/boot/loader/grub/grub.nix";
const SYSTEMD_BOOT: &str = "nixos/modules/system/boot/loader/systemd-boot/systemd-boot.nix";
const FIREWALL: &str = "nixos/modules/services/networking/firewall.nix";

/// Every option nixgold renders (and a few `extra_config` commonly touches).
pub const OPTIONS: &[OptionFact] = &[
    opt_default("boot.loader.grub.enable", GRUB, Type::Bool, Lit::Bool(true)),
    opt("boot.loader.grub.device", GRUB, Type::Str),
    opt("boot.loader.grub.devices", GRUB, Type::Strings),
    opt("boot.loader.grub.mirroredBoots", GRUB, Type::Submodules),
    opt_default(
        "boot.loader.systemd-boot.enable",
        SYSTEMD_BOOT,
        Type::Bool,
        Lit::Bool(false),
    ),
    opt(
        "boot.loader.efi.canTouchEfiVariables",
        "nixos/modules/system/boot/loader/efi.nix",
        Type::Bool,
    ),
    opt(
        "boot.growPartition",
        "nixos/modules/system/boot/grow-partition.nix",
        Type::Bool,
    ),
    opt("fileSystems.<name>.device", FILESYSTEMS, Type::Str),
    opt("fileSystems.<name>.fsType", FILESYSTEMS, Type::Str),
    opt("fileSystems.<name>.options", FILESYSTEMS, Type::Strings),
    opt("fileSystems.<name>.autoResize", FILESYSTEMS, Type::Bool),
    opt_default(
        "networking.useNetworkd",
        NETWORK,
        Type::Bool,
        Lit::Bool(false),
    ),
    opt_default("networking.useDHCP", NETWORK, Type::Bool, Lit::Bool(true)),
    opt("networking.hostName", NETWORK, Type::Str),
    opt(
        "networking.interfaces.<name>.ipv4.addresses",
        NETWORK,
        Type::Submodules,
    ),
    opt("networking.defaultGateway", NETWORK, Type::StrOrSubmodule),
    opt("networking.defaultGateway.address", NETWORK, Type::Str),
    opt("networking.defaultGateway.interface", NETWORK, Type::Str),
    opt("networking.nameservers", NETWORK, Type::Strings),
    opt_default(
        "networking.firewall.enable",
        FIREWALL,
        Type::Bool,
        Lit::Bool(true),
    ),
    opt("networking.firewall.allowedTCPPorts", FIREWALL, Type::Ports),
    opt("networking.firewall.allowedUDPPorts", FIREWALL, Type::Ports),
    opt_default(
        "services.cloud-init.enable",
        CLOUD_INIT,
        Type::Bool,
        Lit::Bool(false),
    ),
    opt("services.cloud-init.network.enable", CLOUD_INIT, Type::Bool),
    opt("services.cloud-init.settings", CLOUD_INIT, Type::Freeform),
    opt(
        "environment.etc.<name>.text",
        "nixos/modules/system/etc/etc.nix",
        Type::Lines,
    ),
    opt(
        "security.sudo.extraConfig",
        "nixos/modules/security/sudo.nix",
        Type::Lines,
    ),
    opt("users.mutableUsers", USERS, Type::Bool),
    opt_default(
        "services.qemuGuest.enable",
        "nixos/modules/virtualisation/qemu-guest-agent.nix",
        Type::Bool,
        Lit::Bool(false),
    ),
    opt_default(
        "services.openssh.enable",
        SSHD,
        Type::Bool,
        Lit::Bool(false),
    ),
    opt(
        "services.openssh.settings.PasswordAuthentication",
        SSHD,
        Type::Bool,
    ),
    opt(
        "services.openssh.settings.PermitRootLogin",
        SSHD,
        Type::Enum(&[
            "yes",
            "without-password",
            "prohibit-password",
            "forced-commands-only",
            "no",
        ]),
    ),
    opt(
        "time.timeZone",
        "nixos/modules/config/locale.nix",
        Type::Str,
    ),
    opt(
        "i18n.defaultLocale",
        "nixos/modules/config/i18n.nix",
        Type::Str,
    ),
    opt("users.users.<name>.isNormalUser", USERS, Type::Bool),
    opt("users.users.<name>.extraGroups", USERS, Type::Strings),
    opt("users.users.<name>.shell", USERS, Type::Package),
    opt(
        "users.users.<name>.openssh.authorizedKeys.keys",
        SSHD,
        Type::Strings,
    ),
    opt_default(
        "programs.bash.enable",
        "nixos/modules/programs/bash/bash.nix",
        Type::Bool,
        Lit::Bool(true),
    ),
    opt_default(
        "programs.zsh.enable",
        "nixos/modules/programs/zsh/zsh.nix",
        Type::Bool,
        Lit::Bool(false),
    ),
    opt_default(
        "programs.fish.enable",
        "nixos/modules/programs/fish.nix",
        Type::Bool,
        Lit::Bool(false),
    ),
    opt(
        "environment.systemPackages",
        "nixos/modules/config/system-path.nix",
        Type::Packages,
    ),
    opt(
        "system.stateVersion",
        "nixos/modules/misc/version.nix",
        Type::Str,
    ),
    opt_default(
        "systemd.services.<name>.enable",
        "nixos/lib/systemd-unit-options.nix",
        Type::Bool,
        Lit::Bool(true),
    ),
];

/// A condition on the configuration. `Is` and `IsNot` use the option's
/// default when nothing defines it.
#[derive(Debug, Clone, Copy)]
pub enum Cond {
    Always,
    Is(&'static str, Lit),
    IsNot(&'static str, Lit),
    /// Something defines the path or an option beneath it.
    Set(&'static str),
    Unset(&'static str),
}

/// How a unit runs (its `serviceConfig.Type`, `RemainAfterExit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitKind {
    /// A daemon (`simple`, `notify`): active while it runs.
    Daemon,
    /// `Type=oneshot`: active afterwards only with `RemainAfterExit=yes`,
    /// failed when it exits with a status other than 0.
    Oneshot { remain_after_exit: bool },
}

/// What starts a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// `wantedBy = [ "sysinit.target" ]`, ordered before the network:
    /// finished before anyone can log in.
    Sysinit,
    /// `wantedBy = [ "multi-user.target" ]`.
    Boot,
    /// udev, once the VM has the `org.qemu.guest_agent.0` virtio port
    /// (Proxmox's `agent: 1`).
    GuestAgentPort,
}

/// How a unit's process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exit {
    Success,
    /// cloud-init's final stage: status 2 (a recoverable error, cloud-init
    /// ≥ 23.4) when it fell back to the `None` datasource, because
    /// cc_final_message warns "Used fallback datasource"
    /// (canonical/cloud-init: doc/rtd/explanation/failure_states.rst).
    RecoverableWithoutDatasource,
}

#[derive(Debug, Clone, Copy)]
pub struct UnitFact {
    pub name: &'static str,
    pub kind: UnitKind,
    pub start: Start,
    pub exit: Exit,
}

const fn daemon(name: &'static str, start: Start) -> UnitFact {
    UnitFact {
        name,
        kind: UnitKind::Daemon,
        start,
        exit: Exit::Success,
    }
}

const fn oneshot(name: &'static str, exit: Exit) -> UnitFact {
    UnitFact {
        name,
        kind: UnitKind::Oneshot {
            remain_after_exit: true,
        },
        start: Start::Boot,
        exit,
    }
}

/// What a setting puts on the installed system.
#[derive(Debug, Clone, Copy)]
pub struct Provides {
    /// Every condition must hold.
    pub when: &'static [Cond],
    pub file: &'static str,
    /// Programs in /run/current-system/sw/bin (root's `PATH`).
    pub programs: &'static [&'static str],
    pub units: &'static [UnitFact],
}

pub const PROVIDES: &[Provides] = &[
    Provides {
        when: &[Cond::Always],
        file: "nixos/modules/config/system-path.nix",
        // corePackages: bashInteractive, coreutils-full, findutils, gawk,
        // gnugrep, gnused, util-linux, … (the programs nixgold runs).
        programs: &[
            "bash", "sh", "cat", "chmod", "cp", "install", "ls", "mkdir", "readlink", "rm",
            "truncate", "sync", "grep", "awk", "sed", "find", "mount", "umount", "curl",
        ],
        units: &[],
    },
    Provides {
        when: &[Cond::Always],
        file: "nixos/modules/system/boot/systemd.nix",
        programs: &["systemctl", "journalctl", "reboot", "poweroff"],
        units: &[],
    },
    Provides {
        when: &[Cond::Always],
        file: "nixos/modules/installer/tools/tools.nix",
        programs: &["nixos-version", "nixos-rebuild"],
        units: &[],
    },
    Provides {
        when: &[Cond::Always],
        file: NETWORK,
        // iproute2 and nettools in environment.systemPackages.
        programs: &["ip", "hostname"],
        units: &[],
    },
    Provides {
        when: &[Cond::Is("networking.useNetworkd", Lit::Bool(true))],
        file: "nixos/modules/tasks/network-interfaces-systemd.nix",
        programs: &["networkctl"],
        units: &[daemon("systemd-networkd", Start::Boot)],
    },
    Provides {
        when: &[Cond::Is("networking.firewall.enable", Lit::Bool(true))],
        // Type = "oneshot", RemainAfterExit = true, before network-pre.target.
        file: "nixos/modules/services/networking/firewall-iptables.nix",
        programs: &[],
        units: &[UnitFact {
            name: "firewall",
            kind: UnitKind::Oneshot {
                remain_after_exit: true,
            },
            start: Start::Sysinit,
            exit: Exit::Success,
        }],
    },
    Provides {
        // `Type = "notify-reload"` (24.05: a plain daemon): active while it runs.
        when: &[
            Cond::Is("services.openssh.enable", Lit::Bool(true)),
            Cond::IsNot("services.openssh.startWhenNeeded", Lit::Bool(true)),
        ],
        file: SSHD,
        programs: &[],
        units: &[daemon("sshd", Start::Boot)],
    },
    Provides {
        // Socket activation: no sshd.service, a listening sshd.socket.
        when: &[
            Cond::Is("services.openssh.enable", Lit::Bool(true)),
            Cond::Is("services.openssh.startWhenNeeded", Lit::Bool(true)),
        ],
        file: SSHD,
        programs: &[],
        units: &[daemon("sshd.socket", Start::Boot)],
    },
    Provides {
        when: &[Cond::Is("services.qemuGuest.enable", Lit::Bool(true))],
        file: "nixos/modules/virtualisation/qemu-guest-agent.nix",
        programs: &[],
        units: &[daemon("qemu-guest-agent", Start::GuestAgentPort)],
    },
    Provides {
        // cloud-init is only on the `path` of its own units, never in
        // environment.systemPackages: `cloud-init` is not a command.
        when: &[Cond::Is("services.cloud-init.enable", Lit::Bool(true))],
        file: CLOUD_INIT,
        programs: &[],
        units: &[
            oneshot("cloud-init-local", Exit::Success),
            oneshot("cloud-init", Exit::Success),
            oneshot("cloud-config", Exit::Success),
            oneshot("cloud-final", Exit::RecoverableWithoutDatasource),
        ],
    },
];

/// A NixOS assertion: when every condition holds, `nixos-install` fails
/// with `message` (`<name>` bound from the first condition that has it).
#[derive(Debug, Clone, Copy)]
pub struct AssertionFact {
    pub file: &'static str,
    pub when: &'static [Cond],
    pub message: &'static str,
}

/// users-groups.nix's message for a login shell whose program module is off.
macro_rules! shell_message {
    ($shell:literal) => {
        concat!(
            "users.users.<name>.shell is set to ",
            $shell,
            ", but\n",
            "programs.",
            $shell,
            ".enable is not true. This will cause the ",
            $shell,
            "\n",
            "shell to lack the basic nix directories in its PATH and might make\n",
            "logging in as that user impossible. You can fix it with:\n",
            "programs.",
            $shell,
            ".enable = true;\n\n",
            "If you know what you're doing and you are fine with the behavior,\n",
            "set users.users.<name>.ignoreShellProgramCheck = true;\n",
            "instead."
        )
    };
}

pub const ASSERTIONS: &[AssertionFact] = &[
    AssertionFact {
        file: "nixos/modules/tasks/network-interfaces-systemd.nix",
        when: &[
            Cond::Is("networking.useNetworkd", Lit::Bool(true)),
            Cond::Set("networking.defaultGateway"),
            Cond::Unset("networking.defaultGateway.interface"),
        ],
        message: "networking.defaultGateway.interface is not optional when using networkd.",
    },
    AssertionFact {
        file: "nixos/modules/system/boot/stage-1.nix",
        when: &[Cond::Unset("fileSystems./")],
        message: "The ‘fileSystems’ option does not specify your root file system.",
    },
    AssertionFact {
        file: GRUB,
        when: &[
            Cond::Is("boot.loader.grub.enable", Lit::Bool(true)),
            Cond::IsNot("boot.loader.systemd-boot.enable", Lit::Bool(true)),
            Cond::Unset("boot.loader.grub.device"),
            Cond::Unset("boot.loader.grub.devices"),
            Cond::Unset("boot.loader.grub.mirroredBoots"),
        ],
        message: "You must set the option ‘boot.loader.grub.devices’ or 'boot.loader.grub.mirroredBoots' to make the system bootable.",
    },
    AssertionFact {
        file: USERS,
        when: &[
            Cond::Is("users.users.<name>.shell", Lit::Package("zsh")),
            Cond::IsNot("programs.zsh.enable", Lit::Bool(true)),
        ],
        message: shell_message!("zsh"),
    },
    AssertionFact {
        file: USERS,
        when: &[
            Cond::Is("users.users.<name>.shell", Lit::Package("fish")),
            Cond::IsNot("programs.fish.enable", Lit::Bool(true)),
        ],
        message: shell_message!("fish"),
    },
];

/// What the NixOS minimal installer ISO has on `PATH` for root
/// (nixos/modules/profiles/base.nix, installation-device.nix,
/// installer/tools/tools.nix, config/system-path.nix, and the
/// file-system tools of boot.supportedFilesystems).
pub const INSTALLER_PROGRAMS: &[&str] = &[
    "bash",
    "sh",
    "cat",
    "chmod",
    "cp",
    "install",
    "ls",
    "mkdir",
    "rm",
    "sync",
    "grep",
    "awk",
    "head",
    "seq",
    "sleep",
    "printf",
    "echo",
    "sed",
    "curl",
    "ip",
    "hostname",
    "sudo",
    "systemctl",
    "reboot",
    "poweroff",
    "udevadm",
    "lsblk",
    "wipefs",
    "mount",
    "umount",
    "parted",
    "sgdisk",
    "mkfs.fat",
    "mkfs.ext4",
    "mkfs.xfs",
    "mkfs.btrfs",
    "nixos-generate-config",
    "nixos-install",
    "nixos-version",
];

/// A NixOS release: its code name (nixpkgs lib/trivial.nix `codeName`,
/// which nixos/modules/misc/version.nix writes into /etc/os-release) and
/// the kernel series its default `boot.kernelPackages` follows
/// (pkgs/top-level/linux-kernels.nix `linuxPackages` on that branch; the
/// point release is not modelled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    pub release: &'static str,
    pub code_name: &'static str,
    pub kernel: &'static str,
}

pub const RELEASES: &[Release] = &[
    Release {
        release: "23.11",
        code_name: "Tapir",
        kernel: "6.1.0",
    },
    Release {
        release: "24.05",
        code_name: "Uakari",
        kernel: "6.6.0",
    },
    Release {
        release: "24.11",
        code_name: "Vicuña",
        kernel: "6.6.0",
    },
    Release {
        release: "25.05",
        code_name: "Warbler",
        kernel: "6.12.0",
    },
    Release {
        release: "25.11",
        code_name: "Xantusia",
        kernel: "6.12.0",
    },
];

/// The facts of `release` (`24.05`); an unknown release gets a neutral
/// entry rather than another release's name.
pub fn release(release: &str) -> Release {
    RELEASES
        .iter()
        .find(|r| r.release == release)
        .copied()
        .unwrap_or(Release {
            release: "unknown",
            code_name: "unknown",
            kernel: "unknown",
        })
}
