//! Resolving ISO pins for the lockfile.
//!
//! A channel ISO is pinned by asking `channels.nixos.org` for
//! `<channel>/latest-nixos-minimal-<arch>.iso` *without following* the
//! redirect: its `Location` is the versioned release URL, and the sibling
//! `.sha256` file (sha256sum format) gives the checksum. A `file:` checksum
//! URL is fetched and the line for the ISO's file name used. The Proxmox
//! node then downloads the pinned URL and verifies the checksum itself.
//!
//! With `--sim` nothing leaves the machine: the simulated resolver derives
//! a release URL marked `simulated` and a checksum from the channel name,
//! and the embedded simulator's "internet" serves exactly that file.

use sha2::Digest;

use crate::fleet::{Checksum, Iso};
use crate::ids::Sha256;
use crate::lock::IsoPin;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolver {
    /// Real HTTP; `channels` is the channel server's base URL.
    Http {
        channels: String,
    },
    Simulated,
}

impl Resolver {
    /// The simulated resolver with `--sim`, the real one otherwise.
    pub fn for_run(sim: bool) -> Self {
        if sim {
            Resolver::Simulated
        } else {
            Resolver::http()
        }
    }

    /// The real resolver; `NIXGOLD_CHANNELS_URL` overrides the server
    /// (a mirror, or a test server).
    pub fn http() -> Self {
        Resolver::Http {
            channels: std::env::var("NIXGOLD_CHANNELS_URL")
                .unwrap_or_else(|_| "https://channels.nixos.org".to_owned()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "isos.{iso}: cannot pin {what}: {reason}\n  hint: check the network, or pin it yourself with url + checksum = \"sha256:…\""
)]
pub struct PinError {
    iso: String,
    what: String,
    reason: String,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Resolves a channel's ISO over HTTP: the `latest-nixos-minimal-ARCH.iso`
/// redirect names the image, its `.sha256` file the checksum, and the
/// channel's `git-revision` (when it reads as one) the nixpkgs revision.
async fn resolve_channel(
    name: &str,
    iso: &Iso,
    channels: &str,
    channel: &str,
    arch: &str,
) -> Result<IsoPin, PinError> {
    let err = |what: &str, reason: String| PinError {
        iso: name.to_owned(),
        what: what.to_owned(),
        reason,
    };
    let http = http_client().map_err(|e| err(channel, e))?;
    let channels = channels.trim_end_matches('/');
    let latest = format!("{channels}/{channel}/latest-nixos-minimal-{arch}.iso");
    let resp = http
        .get(&latest)
        .send()
        .await
        .map_err(|e| err(&latest, e.to_string()))?;
    if !resp.status().is_redirection() {
        return Err(err(
            &latest,
            format!("expected a redirect, got {}", resp.status()),
        ));
    }
    let url = resp
        .headers()
        .get("location")
        .and_then(|l| l.to_str().ok())
        .ok_or_else(|| err(&latest, "the redirect has no Location".into()))?
        .to_owned();
    let sums = fetch(&http, &format!("{url}.sha256"))
        .await
        .map_err(|e| err(&url, e))?;
    let sha256 = checksum_for(&sums, &url).map_err(|e| err(&url, e))?;
    let revision = fetch(&http, &format!("{channels}/{channel}/git-revision"))
        .await
        .ok()
        .map(|r| r.trim().to_owned())
        .filter(|r| r.len() >= 7 && r.bytes().all(|b| b.is_ascii_hexdigit()));
    Ok(IsoPin {
        source: iso.source(),
        url,
        sha256,
        nixpkgs_revision: revision,
        resolved_at: now_rfc3339(),
    })
}

/// Resolves the pin of ISO `name`.
pub async fn resolve(resolver: &Resolver, name: &str, iso: &Iso) -> Result<IsoPin, PinError> {
    let err = |what: &str, reason: String| PinError {
        iso: name.to_owned(),
        what: what.to_owned(),
        reason,
    };
    match (resolver, iso) {
        (
            _,
            Iso::Url {
                checksum: Checksum::Sha256(_),
                ..
            },
        ) => {
            unreachable!("URL + sha256 ISOs are pinned by the fleet itself")
        }
        (Resolver::Simulated, Iso::Channel { channel, arch, .. }) => {
            let version = channel.trim_start_matches("nixos-");
            let url = format!(
                "https://releases.nixos.org/nixos/{version}/nixos-{version}.simulated/nixos-minimal-{version}.simulated-{arch}.iso"
            );
            Ok(simulated_pin(iso, url))
        }
        (Resolver::Simulated, Iso::Url { url, .. }) => Ok(simulated_pin(iso, url.clone())),
        (Resolver::Http { channels }, Iso::Channel { channel, arch, .. }) => {
            resolve_channel(name, iso, channels, channel, arch).await
        }
        (
            Resolver::Http { .. },
            Iso::Url {
                url,
                checksum: Checksum::File(sums_url),
                ..
            },
        ) => {
            let http = http_client().map_err(|e| err(url, e))?;
            let sums = fetch(&http, sums_url).await.map_err(|e| err(sums_url, e))?;
            let sha256 = checksum_for(&sums, url).map_err(|e| err(sums_url, e))?;
            Ok(IsoPin {
                source: iso.source(),
                url: url.clone(),
                sha256,
                nixpkgs_revision: None,
                resolved_at: now_rfc3339(),
            })
        }
    }
}

fn simulated_pin(iso: &Iso, url: String) -> IsoPin {
    let digest: [u8; 32] =
        sha2::Sha256::digest(format!("nixgold-simulated:{url}").as_bytes()).into();
    IsoPin {
        source: iso.source(),
        url,
        sha256: Sha256::from_bytes(digest),
        nixpkgs_revision: None,
        resolved_at: "simulated".to_owned(),
    }
}

fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<String, String> {
    let resp = http.get(url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    resp.text().await.map_err(|e| e.to_string())
}

/// The checksum for `url`'s file in a sha256sum-style text: `HASH  NAME`
/// lines, or a bare hash (old releases).
fn checksum_for(sums: &str, url: &str) -> Result<Sha256, String> {
    let file = url.rsplit('/').next().unwrap_or(url);
    let mut lines = sums.lines().filter(|l| !l.trim().is_empty());
    let chosen = {
        let all: Vec<&str> = lines.by_ref().collect();
        match all.as_slice() {
            [one] => *one,
            many => many
                .iter()
                .find(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .map(|n| n.trim_start_matches('*'))
                        == Some(file)
                })
                .copied()
                .ok_or_else(|| format!("no checksum line for {file}"))?,
        }
    };
    let mut parts = chosen.split_whitespace();
    let hash = parts.next().ok_or("empty checksum file")?;
    if let Some(name) = parts.next()
        && name.trim_start_matches('*') != file
    {
        return Err(format!("the checksum file names {name}, not {file}"));
    }
    hash.parse().map_err(|e: crate::ids::IdError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_files_in_both_forms() {
        let h = "ab".repeat(32);
        let url = "https://x/nixos-minimal-24.05.1-x86_64-linux.iso";
        assert_eq!(
            checksum_for(&format!("{h}  nixos-minimal-24.05.1-x86_64-linux.iso"), url)
                .unwrap()
                .to_string(),
            h
        );
        assert_eq!(checksum_for(&h, url).unwrap().to_string(), h);
        let many = format!(
            "{}  other.iso\n{h}  nixos-minimal-24.05.1-x86_64-linux.iso\n",
            "cd".repeat(32)
        );
        assert_eq!(checksum_for(&many, url).unwrap().to_string(), h);
        assert!(checksum_for(&format!("{h}  other.iso"), url).is_err());
    }
}
