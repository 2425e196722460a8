//! The canonical comparison of config values: Proxmox spells a value
//! otherwise than nixgold writes it (MACs, key order, tag order and case,
//! sizes), and a freshly applied fleet must plan empty.

use pve_api::property::{IpConfig, Net, agent_enabled, decode_sshkeys, normalise_tags};

/// The value Proxmox takes for a key a config does not have
/// (qemu-server `PVE/QemuServer.pm` `$confdesc` defaults): a VM created by
/// hand often lacks them, and adopting it must not rewrite them.
fn pve_default(key: &str) -> Option<&'static str> {
    match key {
        "sockets" | "cores" => Some("1"),
        "onboot" | "agent" => Some("0"),
        _ => None,
    }
}

/// Compares one key canonically; returns the live value when it differs.
pub(super) fn differs(key: &str, want: &str, have: Option<&str>) -> bool {
    let Some(have) = have.or_else(|| pve_default(key)) else {
        return true;
    };
    match key {
        "net0" => {
            let (w, h) = (Net::parse(want), Net::parse(have));
            w.model != h.model
                || w.bridge() != h.bridge()
                || w.options.get("tag") != h.options.get("tag")
        }
        "ipconfig0" => IpConfig::parse(want) != IpConfig::parse(have),
        "sshkeys" => decode_sshkeys(want) != decode_sshkeys(have),
        "tags" => normalise_tags([want]) != normalise_tags([have]),
        "nameserver" => {
            let split = |s: &str| {
                s.split([' ', ',', ';'])
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            };
            split(want) != split(have)
        }
        "memory" => {
            let mib = |s: &str| {
                s.split(',')
                    .find_map(|p| {
                        p.strip_prefix("current=")
                            .or((!p.contains('=')).then_some(p))
                    })
                    .and_then(|v| v.parse::<u64>().ok())
            };
            mib(want) != mib(have)
        }
        "agent" => agent_enabled(want) != agent_enabled(have),
        "description" => want.trim_end() != have.trim_end(),
        _ => want != have,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_comparison_ignores_spelling() {
        assert!(!differs(
            "net0",
            "virtio,bridge=vmbr0",
            Some("virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=0")
        ));
        assert!(differs(
            "net0",
            "virtio,bridge=vmbr1",
            Some("virtio=BC:24:11:00:00:01,bridge=vmbr0")
        ));
        assert!(!differs("memory", "2048", Some("current=2048")));
        assert!(!differs("tags", "nixgold;prod", Some("prod;nixgold")));
        assert!(!differs(
            "ipconfig0",
            "ip=10.0.0.5/24,gw=10.0.0.1",
            Some("gw=10.0.0.1,ip=10.0.0.5/24")
        ));
        assert!(!differs("agent", "1", Some("enabled=1")));
        assert!(!differs("description", "x", Some("x\n")));
        // Absent keys are Proxmox's defaults.
        assert!(!differs("sockets", "1", None));
        assert!(differs("sockets", "2", None));
        assert!(differs("name", "web", None));
    }
}
