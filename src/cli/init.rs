//! `nixgold init`: writes a fleet file for what exists. With
//! `--from-cluster` it reads the live VM configs (read-only); without, it
//! writes a starter fleet from the flags, asking on a terminal for what is
//! missing.

use std::collections::BTreeSet;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::Args;

use super::{Failure, Output};
use crate::init::classic::Found;
use crate::init::render::{Format, render};
use crate::init::{Draft, Settings};

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Draft images and VMs from the cluster's templates and VMs.
    #[arg(long)]
    from_cluster: bool,
    /// Convert a Packer variable file (`nixos.auto.pkrvars.hcl`); an
    /// `http/configuration.nix` beside it becomes the image's raw Nix.
    #[arg(long, value_name = "FILE", conflicts_with = "from_cluster")]
    from_packer: Option<PathBuf>,
    /// Convert Terraform's `terraform.tfvars`, or a `terraform.tfstate` of
    /// the bpg or Telmate provider.
    #[arg(long, value_name = "FILE", conflicts_with = "from_cluster")]
    from_terraform: Option<PathBuf>,
    /// With --from-cluster: only this VMID; repeatable.
    #[arg(long, value_name = "N", requires = "from_cluster")]
    vmid: Vec<u32>,
    /// The fleet file to write (`.ncl`, or YAML with `.yaml`/`.yml`).
    #[arg(short = 'o', long, value_name = "FILE", default_value = "fleet.ncl")]
    output: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
    /// The fleet's name (stamped on everything it owns).
    #[arg(long, value_name = "NAME", default_value = "homelab")]
    name: String,
    /// Proxmox API endpoint [default: PROXMOX_VE_ENDPOINT, or asked].
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// The default node [asked on a terminal].
    #[arg(long, value_name = "NODE")]
    node: Option<String>,
    /// Storage for images' disks [asked on a terminal].
    #[arg(long, value_name = "STORAGE")]
    storage: Option<String>,
    /// Bridge for VMs' networks [asked on a terminal].
    #[arg(long, value_name = "BRIDGE")]
    bridge: Option<String>,
    /// `nixos.state_version` of drafted images (also the ISO channel).
    #[arg(long, value_name = "VERSION", default_value = "24.05")]
    state_version: String,
    /// Pin the installer ISO by URL (with --iso-sha256) instead of a channel.
    #[arg(long, value_name = "URL", requires = "iso_sha256")]
    iso_url: Option<String>,
    /// The ISO's sha256 (64 hex digits).
    #[arg(long, value_name = "HEX", requires = "iso_url")]
    iso_sha256: Option<String>,
    /// sha256 fingerprint of the API certificate, for `proxmox.tls`.
    #[arg(long, value_name = "HEX")]
    fingerprint: Option<String>,
}

impl InitArgs {
    pub fn output(&self) -> &Path {
        &self.output
    }
}

/// Asks for `what` on a terminal; without one, the flag is required.
fn ask(given: Option<String>, what: &str, flag: &str, default: &str) -> Result<String, Failure> {
    if let Some(v) = given {
        return Ok(v);
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Message(format!(
            "init needs the {what}\n  hint: pass {flag} (no terminal to ask on)"
        )));
    }
    eprint!("{what} [{default}]: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let line = line.trim();
    Ok(if line.is_empty() {
        default.to_owned()
    } else {
        line.to_owned()
    })
}

/// Flags first, then what the converted files say, then (endpoint) the
/// environment; what is still missing is asked for.
fn settings(a: &InitArgs, files: &[&Found]) -> Result<Settings, Failure> {
    let from = |f: fn(&Found) -> Option<String>| files.iter().find_map(|x| f(x));
    let endpoint = a
        .endpoint
        .clone()
        .or_else(|| from(|f| f.endpoint.clone()))
        .or_else(|| std::env::var("PROXMOX_VE_ENDPOINT").ok());
    let node = a.node.clone().or_else(|| from(|f| f.node.clone()));
    let storage = a.storage.clone().or_else(|| from(|f| f.storage.clone()));
    let bridge = a.bridge.clone().or_else(|| from(|f| f.bridge.clone()));
    let iso = a.iso_url.clone().zip(a.iso_sha256.clone());
    Ok(Settings {
        fleet: a.name.clone(),
        endpoint: ask(
            endpoint,
            "Proxmox API endpoint",
            "--endpoint URL",
            "https://pve:8006",
        )?,
        node: ask(node, "default node", "--node NODE", "pve")?,
        storage: ask(
            storage,
            "storage for disks",
            "--storage STORAGE",
            "local-lvm",
        )?,
        bridge: ask(bridge, "network bridge", "--bridge BRIDGE", "vmbr0")?,
        state_version: a.state_version.clone(),
        iso: iso.or_else(|| files.iter().find_map(|f| f.iso.clone())),
        fingerprint: a.fingerprint.clone(),
    })
}

/// A client for the cluster the draft describes, with the credentials and
/// TLS checks every other command uses (`connect::client_options`).
fn client_for(s: &Settings) -> Result<pve_api::Client, Failure> {
    let invalid = |what: &str, e: String| Failure::Message(format!("init: {what}: {e}"));
    let fingerprint = match &s.fingerprint {
        Some(f) => Some(
            f.parse()
                .map_err(|e| invalid("--fingerprint", format!("{e}")))?,
        ),
        None => None,
    };
    let fleet = crate::fleet::Fleet {
        json_schema: None,
        fleet: s.fleet.clone(),
        proxmox: crate::fleet::Proxmox {
            endpoint: s.endpoint.clone(),
            nodes: vec![
                s.node
                    .parse()
                    .map_err(|e| invalid("--node", format!("{e}")))?,
            ],
            shared_storages: Vec::new(),
            token: Some(crate::fleet::SecretRef::Env {
                env: "PROXMOX_VE_API_TOKEN".into(),
            }),
            username: None,
            password: None,
            tls: crate::fleet::Tls {
                ca_file: None,
                fingerprint,
                insecure: false,
                allow_insecure: false,
            },
        },
        vm_vmid_range: None,
        rollout: None,
        task_timeout: "30m"
            .parse()
            .map_err(|e| invalid("task_timeout", format!("{e}")))?,
        isos: Default::default(),
        images: Default::default(),
        vms: Default::default(),
    };
    let options = crate::connect::client_options(&fleet, Path::new("."))?;
    Ok(pve_api::Client::new(options)?)
}

pub async fn cmd_init(a: &InitArgs, lock: &Path, out: &Output) -> Result<u8, Failure> {
    if a.output.exists() && !a.force {
        return Err(Failure::Message(format!(
            "{} exists\n  hint: choose another file with -o FILE, or pass --force to replace it",
            a.output.display()
        )));
    }
    let read = |path: &Option<PathBuf>, convert: fn(&Path) -> Result<Found, String>| {
        path.as_deref()
            .map(convert)
            .transpose()
            .map_err(Failure::Message)
    };
    let packer = read(&a.from_packer, crate::init::classic::packer)?;
    let terraform = read(&a.from_terraform, crate::init::classic::terraform)?;
    let s = settings(
        a,
        &packer.iter().chain(terraform.iter()).collect::<Vec<_>>(),
    )?;
    let draft = if packer.is_some() || terraform.is_some() {
        crate::init::classic(&s, packer, terraform)
    } else if a.from_cluster {
        let client = client_for(&s)?;
        let only: BTreeSet<u32> = a.vmid.iter().copied().collect();
        let vms =
            crate::live::read_with_configs(&client, (!only.is_empty()).then_some(&only)).await?;
        crate::init::cluster::draft(&s, &vms)
    } else {
        let mut fleet = crate::init::skeleton(&s, std::slice::from_ref(&s.node));
        let golden = crate::init::image(&s, (9000, 9009), serde_json::Map::new());
        fleet.insert("images".into(), serde_json::json!({ "golden": golden }));
        fleet.insert("vms".into(), serde_json::json!({}));
        Draft {
            fleet: serde_json::Value::Object(fleet),
            ..Draft::default()
        }
    };
    write_draft(&a.output, lock, &draft, out)
}

/// Writes the draft, checks it loads as a valid fleet, and says what next.
pub fn write_draft(path: &Path, lock: &Path, draft: &Draft, out: &Output) -> Result<u8, Failure> {
    let mut header = vec![format!(
        "Drafted by `nixgold init`; review it, then take over what exists with `nixgold import`."
    )];
    header.extend(draft.notes.iter().map(|n| format!("note: {n}")));
    let text = render(&draft.fleet, Format::for_path(path), &header);
    crate::files::write_atomic(path, &text, ".nixgold-init.")
        .map_err(|e| Failure::Message(format!("cannot write {}: {e}", path.display())))?;
    super::load_checked(path, lock).map_err(|e| match e {
        Failure::Message(m) => Failure::Message(format!(
            "{} was written but does not validate (a bug in init; please report it):\n{m}",
            path.display()
        )),
        other => other,
    })?;
    out.info(&format!("wrote {} (valid)", path.display()));
    for note in &draft.notes {
        out.info(&format!("note: {note}"));
    }
    for (address, vmid) in &draft.imports {
        println!("nixgold import {} {address} {vmid}", path.display());
    }
    Ok(0)
}
