//! Building one generation of an image on one node: what Packer does, as
//! steps of apply (DESIGN §7), each with its own deadline
//! (`build.timeouts`, all capped by `build.timeout`):
//!
//! 1. create the build VM (ISO as CD-ROM, disk first in the boot order,
//!    OVMF without pre-enrolled keys or SeaBIOS);
//! 2. start it;
//! 3. access: wait `boot_wait`, type the access sequence with `sendkey`
//!    (`sudo -i`; then either a per-build call-home to nixgold that carries
//!    the VM's address and installs a per-build ephemeral SSH key, or a
//!    static address and the key), retyped until the VM answers; SSH in
//!    (host key pinned on first contact);
//! 4. upload and run the install script, streaming its output;
//! 5. reboot into the installed system (a static address is put back
//!    through the guest agent, for that boot only) and SSH in again;
//! 6. verify (`nixos-version`, the system path, the services asked for);
//! 7. seal (machine-id, host keys, cloud-init state, the build key);
//! 8. power off;
//! 9. cloud-init drive in place of the ISO → `POST …/template` → the final
//!    stamp, which carries the generation's inputs and results so an
//!    interrupted apply can pick them up.
//!
//! A failed build destroys its VM unless `keep_failed_build` is set.
//!
//! This module holds the pure build work the planner uses (what a build
//! needs and leaves, the build VM's config, the stamps, the verify and seal
//! commands); the keymap (`keymap`), the call-home listener
//! (`call_home`), the SSH client (`ssh`) and the step machine
//! (`steps`) are its own modules.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fleet::{Bios, StepTimeouts};
use crate::stamp::Stamp;

mod call_home;
mod keymap;
mod ssh;
mod steps;

pub use call_home::{CallHome, advertise_address, parse_call_home_body};
pub use keymap::{call_home_line, keys_for, type_text};
pub use ssh::Ssh;
pub use steps::{BuildEvent, Observer, run};

/// Everything a build needs, decided by the planner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildWork {
    pub image: String,
    pub generation: u32,
    pub node: String,
    pub vmid: u32,
    /// `local:iso/…` of the pinned ISO on this node.
    pub iso_volid: String,
    pub iso_sha256: String,
    pub input_hash: String,
    /// Config of the build VM (create parameters, without description).
    pub vm_config: BTreeMap<String, String>,
    pub storage: String,
    pub configuration_nix: String,
    pub install_script: String,
    /// Services `systemctl is-active` must report.
    pub services: Vec<String>,
    pub boot_wait_ms: u64,
    /// Deadline of the whole build.
    pub timeout_secs: u64,
    pub timeouts: StepTimeouts,
    pub key_interval_ms: u64,
    pub access: Access,
    /// The image runs qemu-guest-agent: after the reboot nixgold asks it
    /// for the installed system's address.
    pub guest_agent: bool,
    pub fleet: String,
}

/// How nixgold reaches the build VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// The installer posts its address to a per-build listener: where it
    /// binds, and the address the VM is told.
    CallHome {
        listen: String,
        advertise: Option<String>,
    },
    /// A fixed address (`a.b.c.d/len`) typed into the installer and set
    /// again through the guest agent after the reboot.
    Static {
        address: String,
        gateway: Option<String>,
        ssh_port: u16,
    },
}

impl Access {
    /// The same access for a build on the embedded simulator, whose guests
    /// live on this machine: the call-home listener binds loopback, and a
    /// static build address `a.b.c.d/len` becomes `127.b.c.d/8` at the
    /// simulator's guest SSH port.
    pub fn localise(&mut self, guest_port: u16) {
        match self {
            Access::CallHome { listen, advertise } => {
                *listen = "127.0.0.1:0".to_owned();
                *advertise = Some("127.0.0.1".to_owned());
            }
            Access::Static {
                address,
                gateway,
                ssh_port,
            } => {
                let host = address.split('/').next().unwrap_or_default();
                let octets: Vec<&str> = host.split('.').skip(1).collect();
                *address = format!("127.{}/8", octets.join("."));
                *gateway = None;
                *ssh_port = guest_port;
            }
        }
    }
}

/// What a build leaves for the lockfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildResult {
    pub image: String,
    pub generation: u32,
    pub node: String,
    pub vmid: u32,
    pub input_hash: String,
    pub iso_sha256: String,
    pub nixos_version: String,
    pub system_path: String,
}

/// The stamp of a build VM while it is being built.
pub fn building_stamp(w: &BuildWork) -> String {
    Stamp {
        fleet: w.fleet.clone(),
        resource: format!("image.{}", w.image),
        generation: Some(w.generation),
        building: true,
        inputs: Some(w.input_hash.clone()),
        ..Stamp::default()
    }
    .to_string()
}

/// The stamp of a finished template: enough to record it in the lockfile.
pub fn template_stamp(r: &BuildResult, fleet: &str) -> String {
    Stamp {
        fleet: fleet.to_owned(),
        resource: format!("image.{}", r.image),
        generation: Some(r.generation),
        inputs: Some(r.input_hash.clone()),
        iso: Some(r.iso_sha256.clone()),
        nixos: Some(r.nixos_version.clone()),
        system: Some(r.system_path.clone()),
        ..Stamp::default()
    }
    .to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Api(#[from] pve_api::ApiError),
    #[error("{step}: {reason}")]
    Step { step: String, reason: String },
    /// A step failed at, or ran past, its deadline (named by the hint).
    #[error("{} ({hint})", .cause.as_deref().map_or("did not finish in time".to_owned(), ToString::to_string))]
    Deadline {
        cause: Option<Box<BuildError>>,
        hint: String,
    },
}

pub(super) fn step_err(step: &str, reason: impl Into<String>) -> BuildError {
    BuildError::Step {
        step: step.to_owned(),
        reason: reason.into(),
    }
}

/// The build VM's create parameters.
pub fn build_vm_config(
    hw: &crate::fleet::Hardware,
    name: &str,
    iso_volid: &str,
) -> BTreeMap<String, String> {
    let gib = hw.disk.mib().div_ceil(1024);
    let mut c = BTreeMap::new();
    c.insert("name".into(), name.to_owned());
    c.insert("cores".into(), hw.cores.to_string());
    c.insert("sockets".into(), hw.sockets.to_string());
    c.insert("memory".into(), hw.memory.to_string());
    c.insert("cpu".into(), hw.cpu.clone());
    c.insert("machine".into(), hw.machine.clone());
    c.insert("scsihw".into(), hw.scsihw.clone());
    c.insert("ostype".into(), "l26".into());
    c.insert("agent".into(), "1".into());
    let mut net = format!("virtio,bridge={}", hw.bridge);
    if let Some(tag) = hw.vlan {
        net.push_str(&format!(",tag={tag}"));
    }
    c.insert("net0".into(), net);
    c.insert("scsi0".into(), format!("{}:{gib}", hw.storage));
    c.insert("ide2".into(), format!("{iso_volid},media=cdrom"));
    c.insert("boot".into(), "order=scsi0;ide2".into());
    match hw.bios {
        Bios::Ovmf => {
            c.insert("bios".into(), "ovmf".into());
            c.insert(
                "efidisk0".into(),
                format!("{}:1,efitype=4m,pre-enrolled-keys=0", hw.storage),
            );
        }
        Bios::Seabios => {
            c.insert("bios".into(), "seabios".into());
        }
    }
    c
}

/// The steps of a build, in order; each is a step of the apply executor
/// with its own deadline (`build.timeouts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Create,
    Start,
    Access,
    Install,
    Reboot,
    Verify,
    Seal,
    PowerOff,
    Template,
}

impl Step {
    pub const ALL: [Step; 9] = [
        Step::Create,
        Step::Start,
        Step::Access,
        Step::Install,
        Step::Reboot,
        Step::Verify,
        Step::Seal,
        Step::PowerOff,
        Step::Template,
    ];

    /// The step's key in `build.timeouts`.
    pub fn key(self) -> &'static str {
        match self {
            Step::Create => "create",
            Step::Start => "start",
            Step::Access => "access",
            Step::Install => "install",
            Step::Reboot => "reboot",
            Step::Verify => "verify",
            Step::Seal => "seal",
            Step::PowerOff => "power_off",
            Step::Template => "template",
        }
    }

    /// The step's position in a build, from 1 (shown as `N/9`).
    pub fn number(self) -> usize {
        Step::ALL
            .iter()
            .position(|s| *s == self)
            .map_or(0, |i| i + 1)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Step::Create => "create the build VM",
            Step::Start => "start it from the installer ISO",
            Step::Access => "get SSH access to the installer",
            Step::Install => "install NixOS",
            Step::Reboot => "reboot into the installed system",
            Step::Verify => "verify the installed system",
            Step::Seal => "seal (machine-id, host keys, cloud-init state, build key)",
            Step::PowerOff => "power off",
            Step::Template => "swap the ISO for a cloud-init drive, convert to a template",
        }
    }
}

impl Step {
    /// This step's deadline in `build.timeouts`.
    pub fn timeout(self, t: &StepTimeouts) -> Duration {
        match self {
            Step::Create => t.create,
            Step::Start => t.start,
            Step::Access => t.access,
            Step::Install => t.install,
            Step::Reboot => t.reboot,
            Step::Verify => t.verify,
            Step::Seal => t.seal,
            Step::PowerOff => t.power_off,
            Step::Template => t.template,
        }
        .get()
    }
}

/// The line typed (and, after the reboot, run through the guest agent)
/// that puts a static build address on the first Ethernet link.
/// Idempotent: `replace` instead of `add`.
pub fn static_address_line(address: &str, gateway: Option<&str>) -> String {
    let mut line =
        format!("d=$(ls /sys/class/net|grep -m1 ^en);ip l set $d up;ip a replace {address} dev $d");
    if let Some(gw) = gateway {
        line.push_str(&format!(";ip r replace default via {gw}"));
    }
    line.push('\n');
    line
}

/// What verify runs on the installed system: the NixOS version, the
/// system's store path, and the services' states (followed by their names).
pub const VERIFY_VERSION: &str = "nixos-version";
pub const VERIFY_SYSTEM: &str = "readlink -f /run/current-system";
pub const VERIFY_SERVICES: &str = "systemctl is-active";

/// The units verify asks `systemctl is-active` for, by what the image
/// enables: sshd (its socket, when extra_config makes sshd
/// socket-activated with `services.openssh.startWhenNeeded = true`,
/// nixos/modules/services/networking/ssh/sshd.nix), the guest agent,
/// cloud-init. cloud-init's stages after `cloud-init.service` are left
/// out: without a datasource (the build VM has none) cloud-final warns
/// "Used fallback datasource" and exits 2, which NixOS's unit (no
/// SuccessExitStatus) reports as failed on a healthy image (docs/nixos.md).
pub fn verified_services(name: &str, image: &crate::fleet::Image) -> Vec<String> {
    let nixos = &image.nixos;
    let socket = pve_sim::nixos::literal(
        &crate::nixos::configuration_nix(name, image),
        "services.openssh.startWhenNeeded",
    ) == Some(pve_sim::nixos::eval::Value::Bool(true));
    [
        (
            nixos.openssh.enable,
            if socket { "sshd.socket" } else { "sshd" },
        ),
        (nixos.guest_agent, "qemu-guest-agent"),
        (nixos.cloud_init, "cloud-init"),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .map(|(_, s)| s.to_owned())
    .collect()
}

/// What sealing runs on the installed system. cloud-init's state goes by
/// path (what `cloud-init clean --logs` removes, canonical/cloud-init:
/// cloudinit/cmd/clean.py `remove_artifacts`: its logs and
/// /var/lib/cloud): NixOS puts the `cloud-init` program only on the path of
/// its own units (nixos/modules/services/system/cloud-init.nix), and the
/// paths simply do not exist on an image without cloud-init.
pub const SEAL: &str = "truncate -s 0 /etc/machine-id && rm -f /etc/ssh/ssh_host_* && rm -rf /var/lib/cloud /var/log/cloud-init.log /var/log/cloud-init-output.log && rm -f /root/.ssh/authorized_keys";

/// Reads a finished template's stamp back into a result (an apply that was
/// interrupted after the build but before writing the lockfile).
pub fn result_from_stamp(stamp: &Stamp, node: &str, vmid: u32) -> Option<BuildResult> {
    if stamp.building {
        return None;
    }
    Some(BuildResult {
        image: stamp.resource.strip_prefix("image.")?.to_owned(),
        generation: stamp.generation?,
        node: node.to_owned(),
        vmid,
        input_hash: stamp.inputs.clone()?,
        iso_sha256: stamp.iso.clone()?,
        nixos_version: stamp.nixos.clone()?,
        system_path: stamp.system.clone()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_stamps_round_trip() {
        let r = BuildResult {
            image: "golden".into(),
            generation: 2,
            node: "pve".into(),
            vmid: 9401,
            input_hash: "abc".into(),
            iso_sha256: "def".into(),
            nixos_version: "24.05.1 (Uakari)".into(),
            system_path: "/nix/store/x-nixos-system".into(),
        };
        assert_eq!(
            Stamp::parse(&template_stamp(&r, "homelab"))
                .and_then(|s| result_from_stamp(&s, "pve", 9401)),
            Some(r)
        );
    }
}
