//! The checks of `validate` that NixOS itself decides: a fleet whose
//! rendered configuration NixOS would reject, that runs on a NixOS release
//! nixgold has not audited, or whose installed system the build could
//! never reach again, is refused before any VM is created.
//!
//! What NixOS rejects is not re-implemented here: the rendered
//! configuration is evaluated against the same facts read from nixpkgs
//! that the simulator's guest uses (pve-sim `nixos::facts`, each naming the
//! nixpkgs file of its rule; see docs/nixos.md).

use pve_sim::nixos::{self, System};

use super::Problems;
use crate::fleet::{BuildAddress, Fleet, Image, ImageNetwork, Iso};

/// The oldest NixOS release nixgold supports (docs/nixos.md).
pub const OLDEST_RELEASE: (u32, u32) = (24, 5);

pub(super) fn check(fleet: &Fleet, out: &mut Problems) {
    for (name, iso) in &fleet.isos {
        check_release(name, iso, out);
    }
    for (name, image) in &fleet.images {
        let extra = &image.nixos.extra_config;
        if !extra.trim().is_empty()
            && !crate::nixos::check_nix(&format!("{{\n{extra}\n}}")).is_empty()
        {
            continue; // reported as a syntax error already
        }
        match nixos::evaluate(&crate::nixos::configuration_nix(name, image)) {
            Ok(system) => check_build_needs(name, image, &system, out),
            Err(e) => rejected(name, image, &e, out),
        }
    }
}

/// `nixos-YY.MM` in a channel name or an ISO file name.
fn release(text: &str) -> Option<(u32, u32)> {
    let at = text.find("nixos-")? + "nixos-".len();
    let rest = text[at..].trim_start_matches("minimal-");
    let (yy, rest) = rest.split_once('.')?;
    let mm: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((yy.parse().ok()?, mm.parse().ok()?))
}

fn check_release(name: &str, iso: &Iso, out: &mut Problems) {
    let (field, text) = match iso {
        Iso::Channel { channel, .. } => ("channel", channel.as_str()),
        Iso::Url { url, .. } => ("url", url.rsplit('/').next().unwrap_or(url)),
    };
    let Some((yy, mm)) = release(text) else {
        return; // nixos-unstable, or a file name without a release
    };
    if (yy, mm) < OLDEST_RELEASE {
        out.push(
            format!("isos.{name}.{field}"),
            format!(
                "NixOS {yy}.{mm:02} is older than the releases nixgold supports ({}.{:02} and later, audited in docs/nixos.md): older releases are end of life and unaudited, and those before 23.05 lack services.openssh.settings (nixos/modules/services/networking/ssh/sshd.nix), which the rendered configuration sets",
                OLDEST_RELEASE.0, OLDEST_RELEASE.1
            ),
            "use a supported channel, e.g. `nixos-24.11` or `nixos-25.05`",
        );
    }
}

/// NixOS would fail `nixos-install` on the rendered configuration.
fn rejected(name: &str, image: &Image, e: &nixos::NixError, out: &mut Problems) {
    // Whose definition is it: the user's raw Nix, or the fleet's fields?
    let mut plain = image.clone();
    plain.nixos.extra_config.clear();
    let field = if nixos::evaluate(&crate::nixos::configuration_nix(name, &plain)).is_ok() {
        format!("images.{name}.nixos.extra_config")
    } else {
        format!("images.{name}.nixos")
    };
    let message = e
        .text
        .trim_start_matches("error:")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    out.push(
        field,
        format!("NixOS would reject the image ({}): {message}", e.rule),
        "fix what NixOS names; to override an option nixgold renders, use `lib.mkForce` in extra_config",
    );
}

/// The build verifies and seals the installed system over SSH as root with
/// its key in /root/.ssh/authorized_keys, and a static build address comes
/// back through the guest agent: what `extra_config` may not take away.
fn check_build_needs(name: &str, image: &Image, system: &System, out: &mut Problems) {
    let field = format!("images.{name}.nixos.extra_config");
    let sshd = system
        .units
        .iter()
        .any(|u| u.name == "sshd" || u.name == "sshd.socket");
    if image.nixos.openssh.enable && !sshd {
        out.push(
            &field,
            "it removes the sshd unit (systemd.services.sshd.enable), but the build verifies and seals the installed system over SSH",
            "keep sshd in the image; switch it off in clones after deployment if you must",
        );
    }
    if nixos::literal(
        &crate::nixos::configuration_nix(name, image),
        "services.openssh.authorizedKeysInHomedir",
    ) == Some(nixos::eval::Value::Bool(false))
    {
        out.push(
            &field,
            "services.openssh.authorizedKeysInHomedir = false makes sshd ignore /root/.ssh/authorized_keys (nixos/modules/services/networking/ssh/sshd.nix), where the build puts its key",
            "remove it from extra_config (clones get their keys from cloud-init in the user's home)",
        );
    }
    let static_build = matches!(image.build.address, BuildAddress::Static { .. });
    if static_build
        && image.nixos.guest_agent
        && !system.units.iter().any(|u| u.name == "qemu-guest-agent")
    {
        out.push(
            &field,
            "it removes the qemu-guest-agent unit, but a static build address is put back after the reboot through the guest agent",
            "keep the guest agent, or use build.address.call_home",
        );
    }
    if let ImageNetwork::Static { address, .. } = &image.nixos.network
        && !static_build
        && !image.nixos.guest_agent
    {
        out.push(
            format!("images.{name}.nixos.network"),
            format!(
                "after the reboot the installed system is at its static address {} (networking.useDHCP = false), not at the DHCP lease the installer called home from, and without the guest agent nixgold cannot ask where it went",
                address.addr()
            ),
            "enable nixos.guest_agent, or build on a static build address (build.address.static)",
        );
    }
    let no_network = matches!(image.nixos.network, ImageNetwork::Dhcp { dhcp: false });
    if no_network && !image.nixos.cloud_init && !static_build {
        out.push(
            format!("images.{name}.nixos.network"),
            "after the reboot the installed system configures no network (networking.useDHCP = false, no static address, no cloud-init to fall back to DHCP), so the build can never reach it again",
            "use `network: { dhcp: true }`, a static image network, or a static build address (build.address.static)",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_are_read_from_channels_and_iso_names() {
        assert_eq!(release("nixos-24.05"), Some((24, 5)));
        assert_eq!(
            release("nixos-minimal-23.11.7870.205fd4226592-x86_64-linux.iso"),
            Some((23, 11))
        );
        assert_eq!(release("nixos-unstable"), None);
        assert!(
            (23, 11) < OLDEST_RELEASE && (24, 5) >= OLDEST_RELEASE && (25, 11) > OLDEST_RELEASE
        );
    }
}
