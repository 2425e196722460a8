//! Every option nixgold renders and every command a build runs must be
//! covered by the NixOS facts the simulated guest uses (pve-sim
//! `nixos::facts`, read from nixpkgs; audit in docs/nixos.md). When the
//! renderer or the build grows a new option or command, this fails until
//! the facts (and the audit) say what NixOS does with it.

mod common;

use nixgold::fleet::{Bios, Image, ImageNetwork, User};
use pve_sim::nixos::{self, facts::INSTALLER_PROGRAMS};

/// Every image of the example fleets, and the first one in every variant
/// the fleet can express.
fn variants() -> Vec<(String, Image)> {
    let mut out = Vec::new();
    for file in common::example_fleets() {
        let loaded = nixgold::fleet::load(&file).unwrap();
        for (name, image) in loaded.fleet.images {
            out.push((format!("{}: {name}", file.display()), image));
        }
    }
    let base = out[0].1.clone();
    for bios in [Bios::Ovmf, Bios::Seabios] {
        for network in [
            ImageNetwork::Dhcp { dhcp: true },
            ImageNetwork::Dhcp { dhcp: false },
            ImageNetwork::Static {
                interface: "ens18".into(),
                address: "192.168.1.250/24".parse().unwrap(),
                gateway: "192.168.1.1".parse().unwrap(),
                dns: vec!["1.1.1.1".parse().unwrap()],
            },
        ] {
            for (cloud_init, guest_agent) in [(true, true), (false, false), (true, false)] {
                let mut image = base.clone();
                image.hardware.bios = bios;
                image.nixos.network = network.clone();
                image.nixos.cloud_init = cloud_init;
                image.nixos.guest_agent = guest_agent;
                image.nixos.firewall.tcp_ports = vec![22, 443];
                image.nixos.firewall.udp_ports = vec![51820];
                for shell in ["bash", "zsh", "fish"] {
                    image.nixos.users.insert(
                        format!("u{shell}"),
                        User {
                            ssh_keys: vec!["ssh-ed25519 AAAAC3Nza k".into()],
                            groups: vec!["wheel".into()],
                            shell: shell.into(),
                        },
                    );
                }
                let name = format!("{bios:?}-{network:?}-ci{cloud_init}-ga{guest_agent}");
                out.push((name, image));
            }
        }
    }
    out
}

#[test]
fn every_rendered_option_is_a_recorded_fact_and_nixos_accepts_it() {
    for (name, image) in variants() {
        // What nixgold itself renders (the user's extra_config is theirs).
        let mut own = image.clone();
        own.nixos.extra_config.clear();
        let uncovered =
            nixos::uncovered(&nixgold::nixos::configuration_nix("golden", &own)).unwrap();
        assert!(
            uncovered.is_empty(),
            "{name}: the facts do not cover {uncovered:?}; add them (with their nixpkgs file) to pve-sim nixos::facts and docs/nixos.md"
        );
        let text = nixgold::nixos::configuration_nix("golden", &image);
        if let Err(e) = nixos::evaluate(&text) {
            panic!("{name}: NixOS would reject the rendered configuration:\n{e}\n{text}");
        }
    }
}

#[test]
fn every_command_a_build_runs_is_on_nixos_path() {
    for (name, image) in variants() {
        // In the installer: the typed access sequence, the install script.
        let installer = [
            nixgold::build::call_home_line("http://192.0.2.1:4242/t0k"),
            nixgold::build::static_address_line("192.168.1.50/24", Some("192.168.1.1")),
            nixgold::nixos::install_script("golden", &image),
        ];
        for program in installer.iter().flat_map(|s| nixos::script_programs(s)) {
            assert!(
                INSTALLER_PROGRAMS.contains(&program.as_str()),
                "{name}: the installer has no `{program}` in the facts (pve-sim nixos::facts::INSTALLER_PROGRAMS)"
            );
        }
        // In the installed system: verify, seal, the static address again.
        let system = nixos::evaluate(&nixgold::nixos::configuration_nix("golden", &image)).unwrap();
        let installed = [
            nixgold::build::VERIFY_VERSION.to_owned(),
            nixgold::build::VERIFY_SYSTEM.to_owned(),
            nixgold::build::VERIFY_SERVICES.to_owned(),
            nixgold::build::SEAL.to_owned(),
            nixgold::build::static_address_line("192.168.1.50/24", None),
        ];
        for program in installed.iter().flat_map(|s| nixos::script_programs(s)) {
            assert!(
                system.has_program(&program),
                "{name}: `{program}` is not on the installed system's PATH"
            );
        }
        // Verify asks only for units the image has.
        for service in nixgold::build::verified_services("golden", &image) {
            assert!(
                system.units.iter().any(|u| u.name == service),
                "{name}: verify checks {service}, which the image does not enable"
            );
        }
    }
}

#[test]
fn the_command_reader_finds_what_the_install_script_runs() {
    // The reader is not vacuous on the real install script.
    let (_, image) = variants().remove(0);
    let script = nixos::script_programs(&nixgold::nixos::install_script("golden", &image));
    for p in [
        "udevadm",
        "parted",
        "mkfs.fat",
        "nixos-generate-config",
        "nixos-install",
    ] {
        assert!(script.iter().any(|s| s == p), "{p} not found in {script:?}");
    }
}
