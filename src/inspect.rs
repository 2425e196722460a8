//! Drift inside the guest: what NixOS each VM of the fleet runs, read
//! through its guest agent, against what its generation installed (the
//! lockfile's `nixos_version` and `system_path`, recorded by the build's
//! verify step).
//!
//! Two layers. `agent/get-osinfo` needs only `VM.GuestAgent.Audit` and
//! gives the release (`VERSION_ID` of /etc/os-release, `24.05`): enough to
//! see a channel switch, not a `nixos-rebuild switch --upgrade` within the
//! release. Where the token also holds `VM.GuestAgent.Unrestricted`,
//! `agent/exec` of `nixos-version` and `readlink -f /run/current-system`
//! gives the build and the system path, which any rebuild changes. A VM
//! that cannot be looked into — no agent configured, stopped, a silent
//! agent, a token without `VM.GuestAgent.Audit` — is not inspectable, never
//! in sync.

use std::time::Duration;

use pve_api::{ApiError, Client};
use serde::Serialize;

use crate::live::LiveState;
use crate::lock::Lockfile;

/// How long one command in the guest may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// A VM of the fleet to look into, with what its generation installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub address: String,
    pub node: String,
    pub vmid: u32,
    /// `image.NAME generation N`, for the report.
    pub generation: String,
    pub nixos_version: String,
    pub system_path: String,
    /// Why it cannot be looked into without asking (stopped, no agent).
    pub skip: Option<String>,
}

/// What looking into one VM found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It runs what its generation installed; `by_release_only` when the
    /// token could not read the system path (layer 1 only).
    InSync {
        by_release_only: bool,
    },
    /// Its NixOS moved on by itself: what it runs, against what was installed.
    Moved(Moved),
    NotInspectable(String),
}

/// What a guest runs against what its generation installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Moved {
    /// `image.NAME generation N`.
    pub generation: String,
    /// The build (`24.05.5678.f00dfeed`), or only the release (`24.11`)
    /// when the token cannot run commands in the guest.
    pub running_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running_system: Option<String>,
    pub installed_version: String,
    pub installed_system: String,
}

impl Moved {
    pub fn detail(&self) -> String {
        let running = match &self.running_system {
            Some(path) => format!("{} ({path})", self.running_version),
            None => format!("{} (os-release)", self.running_version),
        };
        format!(
            "runs NixOS {running}; {} installed {} ({})",
            self.generation, self.installed_version, self.installed_system
        )
    }
}

/// The running or stopped VMs stamped by `fleet` whose generation the
/// lockfile knows, in VMID order.
pub fn targets(fleet: &str, live: &LiveState, lock: &Lockfile) -> Vec<Target> {
    let mut targets: Vec<Target> = live
        .vms
        .values()
        .filter_map(|vm| {
            let stamp = vm.stamp().filter(|s| s.fleet == fleet)?;
            let address = Some(&stamp.resource).filter(|r| r.starts_with("vm."))?;
            let image = stamp.image.as_ref()?;
            let number = stamp.generation?;
            let generation = lock
                .images
                .get(image)?
                .generations
                .iter()
                .find(|g| g.number == number)?;
            let agent = vm
                .config
                .as_ref()
                .and_then(|c| c.values.get("agent"))
                .is_some_and(|a| pve_api::property::agent_enabled(a));
            let skip = match (vm.running, agent) {
                (_, false) => Some("no guest agent configured (`agent` is off)".to_owned()),
                (Some(true), true) => None,
                _ => Some("the VM is not running".to_owned()),
            };
            Some(Target {
                address: address.clone(),
                node: vm.node.to_string(),
                vmid: vm.vmid.get(),
                generation: format!("image.{image} generation {number}"),
                nixos_version: generation.nixos_version.clone(),
                system_path: generation.system_path.clone(),
                skip,
            })
        })
        .collect();
    targets.sort_by_key(|t| t.vmid);
    targets
}

/// Looks into `target` through its guest agent.
pub async fn inspect(client: &Client, target: &Target) -> Outcome {
    if let Some(reason) = &target.skip {
        return Outcome::NotInspectable(reason.clone());
    }
    let osinfo = match client.agent_osinfo(&target.node, target.vmid).await {
        Ok(info) => info,
        Err(e) => return Outcome::NotInspectable(format!("get-osinfo: {}", first_line(&e))),
    };
    let installed = version_of(&target.nixos_version);
    let release = osinfo.version_id.as_deref().unwrap_or("(none)");
    let moved = |running_version: &str, running_system: Option<String>| {
        Outcome::Moved(Moved {
            generation: target.generation.clone(),
            running_version: running_version.to_owned(),
            running_system,
            installed_version: installed.to_owned(),
            installed_system: target.system_path.clone(),
        })
    };
    if release != release_of(installed) {
        return moved(release, None);
    }
    match read_system(client, target).await {
        Ok((version, path)) if version == installed && path == target.system_path => {
            Outcome::InSync {
                by_release_only: false,
            }
        }
        Ok((version, path)) => moved(&version, Some(path)),
        // Layer 2 needs VM.GuestAgent.Unrestricted; without it the release
        // is all that can be compared.
        Err(ApiError::Permission { .. } | ApiError::Auth { status: 403, .. }) => Outcome::InSync {
            by_release_only: true,
        },
        Err(e) => Outcome::NotInspectable(format!("agent/exec: {}", first_line(&e))),
    }
}

/// Layer 2: `nixos-version` and the system path, through `agent/exec`
/// (`VM.GuestAgent.Unrestricted`).
async fn read_system(client: &Client, target: &Target) -> Result<(String, String), ApiError> {
    let mut answers = Vec::new();
    for argv in [
        &["nixos-version"][..],
        &["readlink", "-f", "/run/current-system"][..],
    ] {
        let argv: Vec<String> = argv.iter().map(|a| (*a).to_owned()).collect();
        let exit = client
            .agent_run(&target.node, target.vmid, &argv, EXEC_TIMEOUT)
            .await?;
        if exit.code != 0 {
            return Err(ApiError::Server {
                status: 500,
                message: format!("`{}` exited {}", argv.join(" "), exit.code),
            });
        }
        answers.push(exit.out.trim().to_owned());
    }
    let path = answers.pop().unwrap_or_default();
    let version = answers.pop().unwrap_or_default();
    Ok((version_of(&version).to_owned(), path))
}

/// `24.05.4242.abcdef` of `nixos-version`'s `24.05.4242.abcdef (Uakari)`.
fn version_of(nixos_version: &str) -> &str {
    nixos_version.split_whitespace().next().unwrap_or_default()
}

/// `24.05` of `24.05.4242.abcdef`.
fn release_of(version: &str) -> &str {
    let end = version
        .match_indices('.')
        .nth(1)
        .map_or(version.len(), |(i, _)| i);
    &version[..end]
}

fn first_line(e: &ApiError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_releases_are_read_from_nixos_version() {
        assert_eq!(
            version_of("24.05.4242.abcdef (Uakari)"),
            "24.05.4242.abcdef"
        );
        assert_eq!(release_of("24.05.4242.abcdef"), "24.05");
        assert_eq!(release_of("24.05"), "24.05");
    }
}
