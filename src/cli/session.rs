//! What every command that talks to a cluster starts with: load and
//! validate the fleet, pin what is unpinned (refused under `--locked`),
//! build the desired graph, connect (or start the embedded simulator with
//! `--sim`), take or report the apply lock, collect live state.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pve_api::Client;

use super::{Failure, Output};
use crate::apply_lock::{self, HeldLock, LockState};
use crate::connect::{self, Embedded};
use crate::desired::{self, DesiredGraph};
use crate::doctor;
use crate::fleet::LoadedFleet;
use crate::live::{self, LiveState};
use crate::pin::{self, Resolver};
use crate::plan::{self, Plan, PlanOptions};

pub struct Connection {
    pub client: Client,
    /// Keeps the embedded simulator alive while connected.
    embedded: Option<Embedded>,
}

impl Connection {
    /// With `--sim`: the port the embedded simulator's guests answer SSH on
    /// at static build addresses.
    pub fn sim_guest_port(&self) -> Option<u16> {
        self.embedded.as_ref().map(|e| e.guest_ssh_port)
    }
}

pub struct Session {
    pub loaded: LoadedFleet,
    pub lock_path: PathBuf,
    pub desired: DesiredGraph,
    pub conn: Connection,
    pub live: LiveState,
    /// The apply lock, when the command took it ([`LockUse::Take`]).
    pub apply_lock: Option<HeldLock>,
}

/// What a command does with the fleet's apply lock.
#[derive(Debug, Clone, Copy)]
pub enum LockUse {
    /// Read it and say who holds it (`plan`, `drift`, `output`).
    Report,
    /// Take it before reading live state (`apply`, `rollback`), waiting up
    /// to `wait` for another holder.
    Take {
        command: &'static str,
        wait: Duration,
    },
}

/// Load, pin, build, connect, (lock), collect.
pub async fn session(
    fleet: &Path,
    lock_path: &Path,
    locked: bool,
    sim: bool,
    lock_use: LockUse,
    out: &Output,
) -> Result<Session, Failure> {
    let (loaded, lock) = super::load_checked(fleet, lock_path)?;
    let mut pinned = lock.clone();
    let resolver = Resolver::for_run(sim);
    for (name, iso) in &loaded.fleet.isos {
        let current = pinned
            .isos
            .get(name)
            .is_some_and(|p| p.source == iso.source());
        if iso.pinned_by_fleet() || current {
            continue;
        }
        if locked {
            return Err(Failure::Message(format!(
                "iso `{name}` is not pinned in {}, but --locked was given\n  hint: run without --locked to pin it, and commit the lockfile",
                lock_path.display()
            )));
        }
        out.info(&format!("pinning iso `{name}` ({})…", iso.source()));
        let pin = pin::resolve(&resolver, name, iso)
            .await
            .map_err(Failure::from)?;
        out.info(&format!("  {} sha256 {}", pin.url, pin.sha256));
        pinned.isos.insert(name.clone(), pin);
    }
    let desired = desired::build(&loaded.fleet, &pinned)?;
    let conn = connect(&loaded, &desired, sim, out).await?;
    if let LockUse::Take { .. } = lock_use {
        // The privileges doctor checks, before the lock or anything else
        // is written.
        let needs = doctor::privileges(&loaded.fleet, &desired);
        let missing = doctor::missing(&conn.client, &needs).await?;
        if !missing.is_empty() {
            let text = doctor::missing_text(conn.client.auth_id(), &needs, &missing);
            return Err(Failure::Message(format!("{text}\nnothing was changed")));
        }
    }
    let apply_lock = lock_or_report(&conn.client, &loaded.fleet.fleet, lock_use, out).await?;
    let live = match live::collect(
        &conn.client,
        &desired,
        &loaded.fleet.fleet,
        live::READ_CONCURRENCY,
    )
    .await
    {
        Ok(live) => live,
        Err(e) => {
            release(apply_lock, out).await;
            return Err(Failure::from(e));
        }
    };
    tracing::info!("live state: {} API calls", live.calls);
    Ok(Session {
        loaded,
        lock_path: lock_path.to_owned(),
        desired,
        conn,
        live,
        apply_lock,
    })
}

/// Connects to the fleet's cluster, or with `--sim` starts the embedded
/// simulator.
pub async fn connect(
    loaded: &LoadedFleet,
    desired: &DesiredGraph,
    sim: bool,
    out: &Output,
) -> Result<Connection, Failure> {
    if sim {
        let embedded = connect::embedded(&loaded.fleet, &desired.lock, &connect::sim_dir())
            .await
            .map_err(Failure::from)?;
        out.info(&format!(
            "using the embedded Proxmox simulator (state in {})",
            connect::sim_dir().display()
        ));
        return Ok(Connection {
            client: embedded.client.clone(),
            embedded: Some(embedded),
        });
    }
    let base = loaded.path.parent().unwrap_or(Path::new("."));
    let options = connect::client_options(&loaded.fleet, base).map_err(Failure::from)?;
    if matches!(options.tls, pve_api::Tls::Insecure) {
        out.info("warning: TLS verification is OFF for the Proxmox API (proxmox.tls.insecure)");
    }
    Ok(Connection {
        client: Client::new(options).map_err(Failure::from)?,
        embedded: None,
    })
}

/// Takes the apply lock, or reports who holds it.
pub(super) async fn lock_or_report(
    client: &Client,
    fleet: &str,
    lock_use: LockUse,
    out: &Output,
) -> Result<Option<HeldLock>, Failure> {
    match lock_use {
        LockUse::Take { command, wait } => {
            let held = apply_lock::acquire(client, fleet, command, wait, |m| out.info(m)).await?;
            tracing::info!("took the apply lock: {}", held.holder().describe());
            Ok(Some(held))
        }
        LockUse::Report => {
            match apply_lock::read(client, fleet).await {
                Ok(LockState::Held(h)) => out.info(&format!(
                    "note: fleet `{fleet}` is being changed right now: locked by {}{}",
                    h.describe(),
                    if h.is_expired() { " (expired)" } else { "" }
                )),
                Ok(LockState::NotALock(_)) => out.info(&format!(
                    "note: the pool `{}` is not a nixgold lock; apply will refuse to run until it is renamed",
                    apply_lock::pool_id(fleet)
                )),
                Ok(LockState::Free) => {}
                Err(e) => tracing::info!("cannot read the apply lock: {e}"),
            }
            Ok(None)
        }
    }
}

/// Gives the apply lock back; a failure to do so is a warning (the lease
/// runs out on its own).
pub async fn release(lock: Option<HeldLock>, out: &Output) {
    if let Some(held) = lock
        && let Err(e) = held.release().await
    {
        out.info(&format!(
            "warning: could not release the apply lock (it expires by itself within {}): {e}",
            humantime::format_duration(apply_lock::LEASE)
        ));
    }
}

pub(super) fn compute(s: &Session, options: &PlanOptions) -> Result<Plan, Failure> {
    let lock_text = s.desired.lock.render();
    plan::plan(&s.loaded.fleet, &s.desired, &s.live, &lock_text, options).map_err(|errors| {
        Failure::Message(
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\nerror: "),
        )
    })
}

/// Loads the fleet and connects, for the commands that read no live
/// state (`rollback`, `force-unlock`).
pub(super) async fn connect_only(
    fleet: &Path,
    lock_path: &Path,
    sim: bool,
    out: &Output,
) -> Result<(LoadedFleet, Connection), Failure> {
    let (loaded, lock) = super::load_checked(fleet, lock_path)?;
    let desired = desired::build(&loaded.fleet, &lock)?;
    let conn = connect(&loaded, &desired, sim, out).await?;
    Ok((loaded, conn))
}
