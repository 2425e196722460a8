//! How nixgold reaches a cluster: the fleet's `proxmox` section, overridden
//! by the ecosystem's environment variables, or — with `--sim` — an
//! in-process simulator whose state lives under `.nixgold/sim/`, so a fleet
//! can be planned and applied with no cluster at all.
//!
//! Secrets are read here, at run time, from the references in the fleet or
//! the environment; they go straight into the client's `Secret` wrappers.

use std::path::{Path, PathBuf};

use pve_api::{Client, ClientOptions, Credentials, Secret, Tls};
use pve_sim::cluster::{NodeSpec, StorageSpec};
use pve_sim::{
    ClusterSpec, Credentials as SimCredentials, RemoteFile, ServerHandle, SimOptions, Simulator,
};

use crate::fleet::{Fleet, SecretRef};
use crate::lock::Lockfile;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{what}: {reason}\n  hint: {hint}")]
    Setting {
        what: String,
        reason: String,
        hint: String,
    },
    #[error("cannot connect: {0}")]
    Client(#[from] pve_api::ApiError),
    #[error("cannot start the embedded simulator: {0}")]
    Sim(String),
}

fn setting(what: &str, reason: impl Into<String>, hint: &str) -> ConnectError {
    ConnectError::Setting {
        what: what.to_owned(),
        reason: reason.into(),
        hint: hint.to_owned(),
    }
}

/// Reads a secret from its reference; relative files start at `base`. The
/// value is registered for redaction ([`crate::redact`]).
pub fn read_secret(reference: &SecretRef, base: &Path, what: &str) -> Result<Secret, ConnectError> {
    let value = match reference {
        SecretRef::Env { env } => match env_or_file(env) {
            Some(value) => value.map_err(|e| setting(what, e, "check the credential file"))?,
            None => return Err(unset(env, what)),
        },
        SecretRef::File { file } => {
            let path = base.join(file);
            std::fs::read_to_string(&path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                .map_err(|e| {
                    setting(
                        what,
                        format!("cannot read {}: {e}", path.display()),
                        "check the file reference",
                    )
                })?
        }
    };
    crate::redact::register(&value);
    Ok(Secret::new(value))
}

/// The value of environment variable `name`, or else the contents of the
/// file `NAME_FILE` names (the convention systemd credentials are used
/// with: `Environment=NAME_FILE=%d/NAME`), without the final newline.
/// `None` when neither is set.
pub fn env_or_file(name: &str) -> Option<Result<String, String>> {
    if let Ok(value) = std::env::var(name) {
        return Some(Ok(value));
    }
    let path = std::env::var_os(format!("{name}_FILE"))?;
    Some(
        std::fs::read_to_string(&path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|e| {
                format!(
                    "cannot read {} ({name}_FILE): {e}",
                    Path::new(&path).display()
                )
            }),
    )
}

/// Registers the credentials in the environment nixgold reads
/// (`redact::CREDENTIAL_ENV`, or their `_FILE`s) for redaction.
pub fn register_environment() {
    for name in crate::redact::CREDENTIAL_ENV {
        if let Some(Ok(value)) = env_or_file(name) {
            crate::redact::register(&value);
        }
    }
}

/// "environment variable X is not set" — naming X only when it looks like a
/// variable name (upper case, digits, `_`): anything else is more likely
/// the secret itself, written where the name belongs.
fn unset(env: &str, what: &str) -> ConnectError {
    let conventional = env
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if conventional {
        return setting(
            what,
            format!("environment variable {env} is not set"),
            &format!("export {env}=…"),
        );
    }
    setting(
        what,
        "the environment variable it names is not set (the name is not shown: it does not look like a variable name — is it the secret itself?)",
        "write the NAME of the variable that holds the secret, e.g. { env = \"PROXMOX_VE_API_TOKEN\" }, and export that variable",
    )
}

/// Registers the value of every secret reference in the fleet that can be
/// read now, so no message can print one ([`crate::redact`]).
pub fn register_secrets(fleet: &Fleet, base: &Path) {
    let references = [&fleet.proxmox.token, &fleet.proxmox.password]
        .into_iter()
        .chain(fleet.vms.values().map(|vm| &vm.password))
        .flatten();
    for reference in references {
        let _ = read_secret(reference, base, "secret");
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes"))
}

/// Where `--sim` keeps the embedded simulator's state (and lockfile).
pub fn sim_dir() -> PathBuf {
    std::env::var_os("NIXGOLD_SIM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".nixgold/sim"))
}

/// The Proxmox API endpoint of a real cluster: `PROXMOX_VE_ENDPOINT`, or
/// the fleet's `proxmox.endpoint`.
pub fn endpoint(fleet: &Fleet) -> String {
    std::env::var("PROXMOX_VE_ENDPOINT").unwrap_or_else(|_| fleet.proxmox.endpoint.clone())
}

/// Client options for a real cluster, from the fleet and the environment
/// (`PROXMOX_VE_ENDPOINT`, `PROXMOX_VE_API_TOKEN`, `PROXMOX_VE_USERNAME`,
/// `PROXMOX_VE_PASSWORD`, `PROXMOX_VE_INSECURE`).
pub fn client_options(fleet: &Fleet, base: &Path) -> Result<ClientOptions, ConnectError> {
    let px = &fleet.proxmox;
    let endpoint = endpoint(fleet);
    let token_variable = env_or_file("PROXMOX_VE_API_TOKEN")
        .transpose()
        .map_err(|e| setting("PROXMOX_VE_API_TOKEN_FILE", e, "check the credential file"))?;
    let credentials = if let Some(token) = token_variable {
        crate::redact::register(&token);
        Credentials::token(&token)
            .map_err(|e| setting("PROXMOX_VE_API_TOKEN", e, "write user@realm!tokenid=secret"))?
    } else if let Some(token) = &px.token {
        let secret = read_secret(token, base, "proxmox.token")?;
        Credentials::token(secret.expose()).map_err(|e| {
            setting(
                "proxmox.token",
                e,
                "the secret must be user@realm!tokenid=secret",
            )
        })?
    } else {
        let username = std::env::var("PROXMOX_VE_USERNAME")
            .ok()
            .or_else(|| px.username.clone())
            .ok_or_else(|| {
                setting(
                    "proxmox",
                    "no credentials",
                    "set proxmox.token (or PROXMOX_VE_API_TOKEN), or a username and password",
                )
            })?;
        let password = match std::env::var("PROXMOX_VE_PASSWORD") {
            Ok(p) => Secret::new(p),
            Err(_) => {
                let reference = px.password.as_ref().ok_or_else(|| {
                    setting(
                        "proxmox.password",
                        "missing",
                        "set it, or PROXMOX_VE_PASSWORD",
                    )
                })?;
                read_secret(reference, base, "proxmox.password")?
            }
        };
        Credentials::Password { username, password }
    };
    let tls = match (&px.tls.fingerprint, &px.tls.ca_file) {
        (Some(fp), _) => Tls::fingerprint(&fp.to_string())
            .map_err(|e| setting("proxmox.tls.fingerprint", e, "64 hex digits"))?,
        (None, Some(ca)) => Tls::CaFile(base.join(ca)),
        (None, None) if px.tls.insecure && px.tls.allow_insecure => Tls::Insecure,
        (None, None) if env_flag("PROXMOX_VE_INSECURE") => {
            if !px.tls.allow_insecure {
                return Err(setting(
                    "PROXMOX_VE_INSECURE",
                    "certificate verification would be turned off without the fleet's opt-in",
                    "pin the certificate with proxmox.tls.fingerprint, or set proxmox.tls.allow_insecure = true",
                ));
            }
            Tls::Insecure
        }
        (None, None) => Tls::System,
    };
    Ok(ClientOptions::new(endpoint, credentials, tls))
}

/// A running embedded simulator and a client for it.
pub struct Embedded {
    pub client: Client,
    pub handle: ServerHandle,
    pub sim: Simulator,
    /// Where its guests answer SSH at a static build address.
    pub guest_ssh_port: u16,
}

/// The token the embedded simulator accepts (it only listens on loopback).
const EMBEDDED_TOKEN: &str = "root@pam!nixgold=embedded-simulator";

/// The simulated cluster for a fleet: its nodes with `vmbr0`, the default
/// storages, and every storage the fleet names (shared ones as shared).
pub fn cluster_for(fleet: &Fleet) -> ClusterSpec {
    let mut spec = ClusterSpec::default();
    let template = spec.nodes[0].clone();
    spec.nodes = fleet
        .proxmox
        .nodes
        .iter()
        .map(|n| NodeSpec {
            name: n.to_string(),
            ..template.clone()
        })
        .collect();
    let mut bridges: Vec<String> = vec!["vmbr0".into()];
    bridges.extend(fleet.images.values().map(|i| i.hardware.bridge.clone()));
    bridges.sort();
    bridges.dedup();
    for node in &mut spec.nodes {
        node.bridges = bridges.clone();
    }
    let mut add = |id: &str, iso: bool| {
        if spec.storages.iter().any(|s| s.id == id) {
            return;
        }
        let shared = fleet.proxmox.is_shared(id);
        spec.storages.push(StorageSpec {
            id: id.to_owned(),
            plugin: match (iso, shared) {
                (true, true) => "cephfs",
                (true, false) => "dir",
                (false, true) => "rbd",
                (false, false) => "lvmthin",
            }
            .to_owned(),
            content: if iso {
                vec!["iso".into(), "vztmpl".into()]
            } else {
                vec!["images".into(), "rootdir".into()]
            },
            shared,
            capacity: 4 << 40,
            nodes: None,
            sparse: false,
        });
    };
    for iso in fleet.isos.values() {
        add(iso.storage(), true);
    }
    for image in fleet.images.values() {
        add(&image.hardware.storage, false);
    }
    for vm in fleet.vms.values() {
        if let Some(s) = &vm.storage {
            add(s, false);
        }
    }
    spec
}

/// Starts the embedded simulator for `fleet` with its state in `dir`.
/// Its "internet" serves exactly the ISOs the lockfile pins.
pub async fn embedded(
    fleet: &Fleet,
    lock: &Lockfile,
    dir: &Path,
) -> Result<Embedded, ConnectError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ConnectError::Sim(format!("{}: {e}", dir.display())))?;
    let fast =
        std::env::var("NIXGOLD_SIM_FAST").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    let mut opts = if fast {
        SimOptions::fast(std::time::Duration::from_millis(20))
    } else {
        SimOptions::default()
    };
    // Guests listen at static build addresses (loopback under --sim) on a
    // port that is free now, not 22.
    opts.guest_ssh_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ConnectError::Sim(e.to_string()))?;
    let guest_ssh_port = opts.guest_ssh_port;
    for pin in lock.isos.values() {
        opts.remote_files.insert(
            pin.url.clone(),
            RemoteFile {
                sha256: pin.sha256.to_string(),
                size: 1 << 30,
            },
        );
    }
    for iso in fleet.isos.values() {
        if let crate::fleet::Iso::Url {
            url,
            checksum: crate::fleet::Checksum::Sha256(sha),
            ..
        } = iso
        {
            opts.remote_files.insert(
                url.clone(),
                RemoteFile {
                    sha256: sha.to_string(),
                    size: 1 << 30,
                },
            );
        }
    }
    let state: PathBuf = dir.join("state.json");
    let creds = SimCredentials::token(EMBEDDED_TOKEN).map_err(ConnectError::Sim)?;
    let sim = Simulator::persistent(&state, cluster_for(fleet), opts, creds)
        .map_err(|e| ConnectError::Sim(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| ConnectError::Sim(e.to_string()))?;
    let handle = sim.serve(listener);
    let options = ClientOptions::new(
        handle.url(),
        Credentials::token(EMBEDDED_TOKEN).map_err(ConnectError::Sim)?,
        Tls::System,
    );
    let client = Client::new(options)?;
    Ok(Embedded {
        client,
        handle,
        sim,
        guest_ssh_port,
    })
}
