//! `plan`, `apply` and `output`: the commands that talk to a cluster.
//!
//! All of them start the same way: load and validate the fleet, pin what is
//! unpinned (refused under `--locked`), build the desired graph, connect
//! (or start the embedded simulator with `--sim`), collect live state.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pve_api::Client;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Failure, Output};
use crate::apply::{self, ApplyOptions, Event, Outcome};
use crate::apply_lock::{self, HeldLock, LockState};
use crate::connect::{self, Embedded};
use crate::desired::{self, DesiredGraph};
use crate::doctor;
use crate::fleet::LoadedFleet;
use crate::live::{self, LiveState};
use crate::pin::{self, Resolver};
use crate::plan::{self, Plan, PlanOptions};
use crate::render;

/// Exit code of `plan --detailed-exitcode` when there are changes.
pub const EXIT_CHANGES: u8 = 2;

/// Where `--sim` keeps the embedded simulator's state (and lockfile).
pub fn sim_dir() -> PathBuf {
    std::env::var_os("NIXGOLD_SIM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".nixgold/sim"))
}

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

/// The embedded simulator's guests live on this machine: the call-home
/// listener binds loopback, and a static build address `a.b.c.d/len`
/// becomes `127.b.c.d/8` at the simulator's guest SSH port.
fn localise_builds(plan: &mut Plan, guest_port: u16) {
    for change in &mut plan.changes {
        let crate::plan::Work::BuildTemplate { build, .. } = &mut change.work else {
            continue;
        };
        match &mut build.access {
            crate::build::Access::CallHome { listen, advertise } => {
                *listen = "127.0.0.1:0".to_owned();
                *advertise = Some("127.0.0.1".to_owned());
            }
            crate::build::Access::Static {
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
    let live = match live::collect(&conn.client, &desired, &loaded.fleet.fleet, 8).await {
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
        let embedded = connect::embedded(&loaded.fleet, &desired.lock, &sim_dir())
            .await
            .map_err(Failure::from)?;
        out.info(&format!(
            "using the embedded Proxmox simulator (state in {})",
            sim_dir().display()
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
async fn lock_or_report(
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

fn compute(s: &Session, options: &PlanOptions) -> Result<Plan, Failure> {
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

/// A plan saved by `plan --out`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedPlan {
    pub format: String,
    pub fleet_path: PathBuf,
    pub lock_path: PathBuf,
    /// The lockfile text the plan goes with.
    pub lock_text: String,
    /// The options the plan was made with; apply re-derives the plan with
    /// them and refuses any change they do not give.
    #[serde(default)]
    pub options: PlanOptions,
    pub plan: Plan,
    /// The cluster and fleet the plan was made for (absent in plans saved
    /// before nixgold recorded it: those are refused).
    #[serde(default)]
    pub target: Option<super::target::PlanTarget>,
}

const SAVED_PLAN_FORMAT: &str = "nixgold-plan/1";

#[derive(Debug, Clone, Default)]
pub struct PlanArgs {
    pub out: Option<PathBuf>,
    pub detailed_exitcode: bool,
    pub options: PlanOptions,
}

pub fn print_plan(plan: &Plan, out: &Output) {
    if out.json {
        println!("{:#}", crate::plan_json::plan_json(plan));
    } else {
        print!("{}", render::plan_text(plan, out.color_stdout));
        if out.verbose > 0 {
            println!("(live state read with {} API calls)", plan.api_calls);
        }
    }
}

pub async fn cmd_plan(
    fleet: &Path,
    lock: &Path,
    locked: bool,
    sim: bool,
    args: &PlanArgs,
    out: &Output,
) -> Result<u8, Failure> {
    let s = session(fleet, lock, locked, sim, LockUse::Report, out).await?;
    let plan = compute(&s, &args.options)?;
    let changed = plan.lock.write(lock, locked)?;
    if changed {
        out.info(&format!(
            "{}: updated (VMID allocations, ISO pins)",
            lock.display()
        ));
    }
    print_plan(&plan, out);
    if let Some(path) = &args.out {
        let saved = SavedPlan {
            format: SAVED_PLAN_FORMAT.into(),
            fleet_path: s.loaded.path.clone(),
            lock_path: lock.to_owned(),
            lock_text: s.desired.lock.render(),
            options: args.options.clone(),
            plan: plan.clone(),
            target: Some(super::target::PlanTarget::current(sim, &s.loaded.fleet)),
        };
        let text = serde_json::to_string_pretty(&saved).expect("plans serialise");
        write_atomic(path, &text)
            .map_err(|e| Failure::Message(format!("cannot write {}: {e}", path.display())))?;
        let command = saved.target.as_ref().map(|t| t.apply_command(path));
        out.info(&format!(
            "saved the plan to {}; apply it with `{}`",
            path.display(),
            command.unwrap_or_default()
        ));
    }
    Ok(if args.detailed_exitcode && !plan.is_empty() {
        EXIT_CHANGES
    } else {
        0
    })
}

/// `doctor`: what the cluster must offer for the fleet, checked read-only.
/// Exit 0 when everything is there, 1 otherwise.
pub async fn cmd_doctor(fleet: &Path, lock: &Path, sim: bool, out: &Output) -> Result<u8, Failure> {
    let s = session(fleet, lock, false, sim, LockUse::Report, out).await.map_err(|e| match e {
        Failure::Message(m) => Failure::Message(format!(
            "cannot read the cluster: {m}\n  hint: check proxmox.endpoint, the token and proxmox.tls"
        )),
        other => other,
    })?;
    let client = &s.conn.client;
    let version = client.version().await?;
    let major: u32 = version
        .version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let mut checks = vec![doctor::Check {
        ok: true,
        what: format!("reached the API as {}", client.auth_id()),
    }];
    checks.push(doctor::Check {
        ok: major >= 8,
        what: format!("Proxmox VE {} (nixgold needs 8 or later)", version.version),
    });
    checks.extend(doctor::placement_checks(
        &s.loaded.fleet,
        &s.desired,
        &s.live,
    ));
    checks.extend(doctor::bridge_checks(client, &s.loaded.fleet, &s.desired).await?);
    let mut notes = Vec::new();
    match compute(&s, &PlanOptions::default()) {
        Ok(plan) => notes.extend(plan.notes),
        Err(Failure::Message(m)) => checks.push(doctor::Check { ok: false, what: m }),
        Err(other) => return Err(other),
    }
    let needs = doctor::privileges(&s.loaded.fleet, &s.desired);
    let missing = doctor::missing(client, &needs).await?;
    checks.push(doctor::Check {
        ok: missing.is_empty(),
        what: format!(
            "the token holds the privileges the fleet needs on {} paths",
            needs.len()
        ),
    });
    for c in &checks {
        println!("{} {}", if c.ok { "ok  " } else { "FAIL" }, c.what);
    }
    for n in &notes {
        println!("note {n}");
    }
    if !missing.is_empty() {
        println!(
            "\n{}",
            doctor::missing_text(client.auth_id(), &needs, &missing)
        );
    }
    Ok(if checks.iter().all(|c| c.ok) {
        0
    } else {
        super::EXIT_ERROR
    })
}

/// `drift`: plan without writing anything (the lockfile included); exit 2
/// when apply would change something. With `--prometheus` the findings — or,
/// when the check fails, `nixgold_drift_success 0` — go to a textfile.
pub async fn cmd_drift(
    fleet: &Path,
    lock: &Path,
    locked: bool,
    sim: bool,
    prometheus: Option<&Path>,
    out: &Output,
) -> Result<u8, Failure> {
    let checked = async {
        let s = session(fleet, lock, locked, sim, LockUse::Report, out).await?;
        let plan = compute(&s, &PlanOptions::default())?;
        let mut drift = crate::drift::Drift::new(&plan, &s.live, &s.desired.lock);
        // One `/pending` read per running VM, concurrently (the client
        // bounds the requests in flight), reported in VMID order.
        let mut reads = tokio::task::JoinSet::new();
        for (address, node, vmid) in crate::drift::Drift::running_vms(&plan, &s.live) {
            let client = s.conn.client.clone();
            reads.spawn(async move { (vmid, address, client.pending(&node, vmid).await) });
        }
        let mut pending = reads.join_all().await;
        pending.sort_by_key(|(vmid, _, _)| *vmid);
        for (_, address, entries) in pending {
            drift.add_pending(&address, &entries.map_err(Failure::from)?);
        }
        inspect_guests(&s.conn.client, &mut drift, &s.live, &s.desired.lock).await;
        Ok::<_, Failure>(drift)
    }
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let write = |text: String| {
        prometheus.map_or(Ok(()), |path| {
            write_atomic(path, &text)
                .map_err(|e| Failure::Message(format!("cannot write {}: {e}", path.display())))
        })
    };
    let drift = match checked {
        Ok(drift) => drift,
        Err(e) => {
            // The series keep their fleet label even when the fleet does not load.
            let name = crate::fleet::name_or_stem(fleet);
            write(crate::drift::prometheus_failure(&name, now))?;
            return Err(e);
        }
    };
    write(drift.prometheus(now))?;
    if out.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&drift).expect("reports serialise")
        );
    } else {
        print!("{}", drift.text());
    }
    Ok(if drift.has_drift() { EXIT_CHANGES } else { 0 })
}

/// Looks into every VM's guest concurrently (the client bounds the
/// requests in flight) and records what each runs, in VMID order, with the
/// API calls that took.
async fn inspect_guests(
    client: &pve_api::Client,
    drift: &mut crate::drift::Drift,
    live: &crate::live::LiveState,
    lock: &crate::lock::Lockfile,
) {
    let before = client.calls();
    let mut looks = tokio::task::JoinSet::new();
    for target in crate::inspect::targets(&drift.fleet, live, lock) {
        let client = client.clone();
        looks.spawn(async move {
            let outcome = crate::inspect::inspect(&client, &target).await;
            (target.vmid, target.address, outcome)
        });
    }
    let mut found = looks.join_all().await;
    found.sort_by_key(|(vmid, _, _)| *vmid);
    for (_, address, outcome) in found {
        drift.add_guest(&address, outcome);
    }
    drift.api_calls += client.calls() - before;
}

/// `update`: resolve the ISO pins again (all, or the ISOs named in `only`)
/// and record the ones that moved — a new channel release, a changed
/// checksum file. Pins that did not move stay as they are, so the lockfile
/// changes only when a release does; the next plan then proposes new
/// generations of the images built from a moved ISO.
pub async fn cmd_update(
    fleet: &Path,
    lock_path: &Path,
    locked: bool,
    sim: bool,
    only: &[String],
    out: &Output,
) -> Result<u8, Failure> {
    let (loaded, lock) = super::load_checked(fleet, lock_path)?;
    let isos = &loaded.fleet.isos;
    if let Some(unknown) = only.iter().find(|n| !isos.contains_key(*n)) {
        return Err(Failure::Message(format!(
            "--iso {unknown}: the fleet has no such ISO\n  hint: known ISOs: {}",
            isos.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    let resolver = Resolver::for_run(sim);
    let mut next = lock.clone();
    let mut report = Vec::new();
    for (name, iso) in isos {
        if !only.is_empty() && !only.contains(name) {
            continue;
        }
        if iso.pinned_by_fleet() {
            report.push(IsoUpdate {
                iso: name.clone(),
                status: "fixed",
                before: None,
                after: None,
            });
            continue;
        }
        let before = lock.isos.get(name).filter(|p| p.source == iso.source());
        let pin = pin::resolve(&resolver, name, iso)
            .await
            .map_err(Failure::from)?;
        let status = match before {
            None => "pinned",
            Some(b) if b.url == pin.url && b.sha256 == pin.sha256 => "up to date",
            Some(_) => "moved",
        };
        report.push(IsoUpdate {
            iso: name.clone(),
            status,
            before: before.map(PinRef::of),
            after: Some(PinRef::of(&pin)),
        });
        if status != "up to date" {
            next.isos.insert(name.clone(), pin);
        }
    }
    let changed = next.write(lock_path, locked)?;
    if out.json {
        println!(
            "{:#}",
            serde_json::json!({ "changed": changed, "lockfile": lock_path, "isos": report })
        );
        return Ok(0);
    }
    for r in &report {
        match (r.status, &r.before, &r.after) {
            ("fixed", _, _) => println!(
                "iso.{}: pinned by the fleet (url + sha256): change the fleet file to move it",
                r.iso
            ),
            ("moved", Some(b), Some(a)) => println!(
                "iso.{}: moved\n    from {} (sha256 {})\n    to   {} (sha256 {})",
                r.iso, b.url, b.sha256, a.url, a.sha256
            ),
            (status, _, Some(a)) => {
                println!("iso.{}: {status}: {} (sha256 {})", r.iso, a.url, a.sha256)
            }
            (status, _, None) => println!("iso.{}: {status}", r.iso),
        }
    }
    out.info(&if changed {
        format!(
            "{}: updated; `nixgold plan` shows the new generations this asks for",
            lock_path.display()
        )
    } else {
        format!("{}: up to date", lock_path.display())
    });
    Ok(0)
}

/// What `update` did to one ISO's pin.
#[derive(Debug, Serialize)]
struct IsoUpdate {
    iso: String,
    /// `pinned` (first time), `moved`, `up to date`, or `fixed` (by the fleet).
    status: &'static str,
    before: Option<PinRef>,
    after: Option<PinRef>,
}

#[derive(Debug, Serialize)]
struct PinRef {
    url: String,
    sha256: String,
}

impl PinRef {
    fn of(pin: &crate::lock::IsoPin) -> Self {
        PinRef {
            url: pin.url.clone(),
            sha256: pin.sha256.to_string(),
        }
    }
}

/// `graph --plan`: the plan's execution order, as text or DOT.
pub async fn cmd_plan_order(
    fleet: &Path,
    lock: &Path,
    locked: bool,
    sim: bool,
    text: bool,
    out: &Output,
) -> Result<u8, Failure> {
    let s = session(fleet, lock, locked, sim, LockUse::Report, out).await?;
    let plan = compute(&s, &PlanOptions::default())?;
    plan.lock.write(lock, locked)?;
    if text {
        print!("{}", render::plan_order_text(&plan));
    } else {
        print!("{}", render::plan_order_dot(&plan));
    }
    Ok(0)
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    crate::files::write_atomic(path, text, ".nixgold.")
}

/// Reads `path` as a saved plan, if it is one.
pub fn read_saved(path: &Path) -> Option<Result<SavedPlan, Failure>> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    (value.get("format").and_then(|f| f.as_str()) == Some(SAVED_PLAN_FORMAT)).then(|| {
        serde_json::from_value(value).map_err(|e| {
            Failure::Message(format!("{}: not a usable saved plan: {e}", path.display()))
        })
    })
}

/// Refuses to apply `saved` (read from `path`) to another cluster or fleet
/// than it was planned for, or with flags that would change it.
fn check_saved_target(
    saved: &SavedPlan,
    path: &Path,
    sim: bool,
    options: &PlanOptions,
) -> Result<(), Failure> {
    let flags: Vec<&str> = [
        (!options.targets.is_empty(), "--target"),
        (!options.replace.is_empty(), "--replace"),
        (options.allow_destroy, "--allow-destroy"),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect();
    if !flags.is_empty() {
        return Err(Failure::Message(format!(
            "{} cannot change a saved plan ({} is applied exactly as planned)\n  hint: pass {} to `nixgold plan --out` and apply the new file",
            flags.join(", "),
            path.display(),
            flags.join(", ")
        )));
    }
    let Some(planned) = &saved.target else {
        return Err(Failure::Message(format!(
            "{} does not say which cluster it was planned for (saved by an older nixgold)\n  hint: run `nixgold plan --out` again",
            path.display()
        )));
    };
    let fleet = crate::fleet::load(&saved.fleet_path).map_err(Failure::from)?;
    planned.check(&super::target::PlanTarget::current(sim, &fleet.fleet), path)
}

#[derive(Debug, Clone, Default)]
pub struct ApplyArgs {
    pub auto_approve: bool,
    /// How long to wait for another run's apply lock (0: fail at once).
    pub lock_timeout: Duration,
    /// Overrides the fleet's `task_timeout`.
    pub task_timeout: Option<Duration>,
    pub keep_failed_build: bool,
    pub options: PlanOptions,
    pub concurrency: usize,
}

pub async fn cmd_apply(
    target: &Path,
    lock: &Path,
    locked: bool,
    sim: bool,
    args: &ApplyArgs,
    out: &Output,
) -> Result<u8, Failure> {
    let take = LockUse::Take {
        command: "apply",
        wait: args.lock_timeout,
    };
    let saved = read_saved(target).transpose()?;
    let mut s = match &saved {
        Some(saved) => {
            check_saved_target(saved, target, sim, &args.options)?;
            let current = std::fs::read_to_string(&saved.lock_path).unwrap_or_default();
            if current != saved.lock_text {
                return Err(Failure::Message(format!(
                    "{} changed since the plan was saved\n  hint: run `nixgold plan` again",
                    saved.lock_path.display()
                )));
            }
            session(&saved.fleet_path, &saved.lock_path, true, sim, take, out).await?
        }
        None => session(target, lock, locked, sim, take, out).await?,
    };
    let held = s.apply_lock.take();
    let result = apply_in_session(&s, saved, locked, args, out).await;
    release(held, out).await;
    result
}

/// The saved plan, checked against the cluster and re-derived from its own
/// fleet and lockfile.
fn saved_plan_to_apply(s: &Session, saved: SavedPlan) -> Result<Plan, Failure> {
    if s.live.fingerprint() != saved.plan.live_fingerprint {
        return Err(Failure::Message(
            "the cluster changed since the plan was saved\n  hint: run `nixgold plan` again and review the new plan".into(),
        ));
    }
    verify_saved(&compute(s, &saved.options)?, &saved.plan)?;
    let mut plan = saved.plan;
    // The lockfile is not part of the serialised plan: the saved text is.
    plan.lock = crate::lock::Lockfile::parse(&saved.lock_path, &saved.lock_text)?;
    Ok(plan)
}

/// Refuses a saved plan unless every change in it is the one the plan's
/// own fleet, lockfile and the live cluster give now: an edited VMID,
/// setting or action, an added change or a dropped one is named and
/// nothing runs. (The cluster and the lockfile are the ones the plan was
/// made against: their fingerprints were checked before.)
fn verify_saved(derived: &Plan, saved: &Plan) -> Result<(), Failure> {
    let refuse = |address: &str, action: plan::Action, why: &str| {
        Failure::Message(format!(
            "refusing the saved plan: change `{address}` ({}) {why}\n  hint: the plan file was edited after `nixgold plan --out` (or by another nixgold version); plan again and review it. Nothing was changed.",
            format!("{action:?}").to_lowercase()
        ))
    };
    for change in &saved.changes {
        match derived.changes.iter().find(|d| d.address == change.address) {
            None => {
                return Err(refuse(
                    &change.address,
                    change.action,
                    "is not justified by the fleet, the lockfile and the cluster",
                ));
            }
            Some(d) if d != change => {
                return Err(refuse(
                    &change.address,
                    change.action,
                    "differs from what the fleet, the lockfile and the cluster give",
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(missing) = derived
        .changes
        .iter()
        .find(|d| !saved.changes.iter().any(|c| c.address == d.address))
    {
        return Err(refuse(
            &missing.address,
            missing.action,
            "was removed from the plan file",
        ));
    }
    if derived.changes != saved.changes || derived.adopted != saved.adopted {
        return Err(Failure::Message(
            "refusing the saved plan: its changes are in another order, or its adopted templates differ, from what the fleet, the lockfile and the cluster give\n  hint: plan again and review it. Nothing was changed.".into(),
        ));
    }
    Ok(())
}

async fn apply_in_session(
    s: &Session,
    saved: Option<SavedPlan>,
    locked: bool,
    args: &ApplyArgs,
    out: &Output,
) -> Result<u8, Failure> {
    let (plan, saved) = match saved {
        Some(saved) => (saved_plan_to_apply(s, saved)?, true),
        None => (compute(s, &args.options)?, false),
    };
    let mut plan = plan;
    if let Some(guest_port) = s.conn.sim_guest_port() {
        localise_builds(&mut plan, guest_port);
    }
    if out.json {
        super::apply_json::start(&plan);
    } else if !saved {
        print_plan(&plan, out);
    }
    if plan.is_empty() {
        plan.lock.write(&s.lock_path, locked)?;
        if out.json {
            super::apply_json::finish(&plan, &[]);
        }
        return Ok(0);
    }
    if !args.auto_approve && !saved {
        confirm()?;
    }
    // Record allocations and pins before touching the cluster.
    plan.lock.write(&s.lock_path, locked)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let printer = tokio::spawn(print_events(rx, out.quiet, out.json));
    let mut options = ApplyOptions {
        base_dir: s.loaded.path.parent().unwrap_or(Path::new(".")).to_owned(),
        keep_failed_build: args.keep_failed_build,
        task_timeout: args
            .task_timeout
            .unwrap_or(s.loaded.fleet.task_timeout.get()),
        endpoint_host: s.conn.client.endpoint_host(),
        log_dir: Some(
            std::env::var_os("NIXGOLD_LOG_DIR")
                .map_or_else(|| PathBuf::from(".nixgold/logs"), PathBuf::from),
        ),
        ..ApplyOptions::default()
    };
    if args.concurrency > 0 {
        options.concurrency = args.concurrency;
    }
    let report = apply::apply(&s.conn.client, &plan, options, tx).await;
    let _ = printer.await;
    record_outcome(s, &plan, &report, locked, out)?;
    print_report(&plan, &report, out)
}

/// Asks on the terminal; only `yes` goes on.
fn confirm() -> Result<(), Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Message(
            "refusing to apply without confirmation\n  hint: review the plan and pass --auto-approve (or save it with plan --out and apply the file)".into(),
        ));
    }
    eprint!("\nApply these changes? Only 'yes' is accepted: ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().read_line(&mut answer);
    if answer.trim() != "yes" {
        return Err(Failure::Message(
            "apply cancelled; nothing was changed".into(),
        ));
    }
    Ok(())
}

/// Removed templates leave the lockfile; generations enter it only once
/// built (or found built and stamped).
fn record_outcome(
    s: &Session,
    plan: &Plan,
    report: &apply::Report,
    locked: bool,
    out: &Output,
) -> Result<(), Failure> {
    let removed: Vec<(&str, u32, &str)> = plan
        .changes
        .iter()
        .filter_map(|c| match &c.work {
            crate::plan::Work::DestroyTemplate {
                image,
                generation,
                node,
                ..
            } if report
                .changes
                .iter()
                .any(|r| r.address == c.address && r.outcome == Outcome::Done) =>
            {
                Some((image.as_str(), *generation, node.as_str()))
            }
            _ => None,
        })
        .collect();
    let built: Vec<&crate::build::BuildResult> = plan
        .adopted
        .iter()
        .chain(report.changes.iter().filter_map(|c| c.built.as_ref()))
        .collect();
    if built.is_empty() && removed.is_empty() {
        return Ok(());
    }
    let mut lock = plan.lock.clone();
    for (image, generation, node) in &removed {
        lock.forget_replica(image, *generation, node);
    }
    for r in built {
        let replicas = replicas_of(&s.desired, &r.image, r.generation);
        record_build(&mut lock, r, replicas);
        out.info(&format!(
            "recorded image.{} generation {} on {} in {}",
            r.image,
            r.generation,
            r.node,
            s.lock_path.display()
        ));
    }
    lock.write(&s.lock_path, locked)?;
    Ok(())
}

/// Each change's outcome (secrets redacted), then the summary; an error
/// when some change did not complete.
fn print_report(plan: &Plan, report: &apply::Report, out: &Output) -> Result<u8, Failure> {
    let failed = report
        .changes
        .iter()
        .filter(|c| c.outcome != Outcome::Done)
        .count();
    if out.json {
        // JSON Lines: each outcome, then the summary that ends the stream.
        super::apply_json::finish(plan, &report.changes);
        return Ok(if failed == 0 { 0 } else { super::EXIT_ERROR });
    }
    for c in &report.changes {
        let (symbol, address) = (c.action.symbol(), &c.address);
        let line = match &c.outcome {
            Outcome::Done => format!("  {symbol} {address}: done"),
            Outcome::Failed { step, error } => {
                format!("  {symbol} {address}: FAILED at {step}: {error}")
            }
            Outcome::Skipped { because } => {
                format!("  {symbol} {address}: skipped ({because})")
            }
        };
        println!("{}", crate::redact::redact(&line));
    }
    if failed > 0 {
        return Err(Failure::Message(format!(
            "{failed} change(s) did not complete\n  hint: fix the cause and run apply again: it finishes what is left"
        )));
    }
    println!(
        "Apply complete: {} created, {} updated, {} replaced, {} destroyed.",
        plan.count(plan::Action::Create),
        plan.count(plan::Action::Update),
        plan.count(plan::Action::Replace),
        plan.count(plan::Action::Destroy)
    );
    Ok(0)
}

/// Shows apply's events: a live view (one spinner per change) on a
/// terminal, plain timestamped lines otherwise (CI logs, pipes).
/// With `--json`, JSON Lines on stdout instead.
async fn print_events(mut rx: mpsc::UnboundedReceiver<Event>, quiet: bool, json: bool) {
    let live = !quiet && !json && std::io::stderr().is_terminal();
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{spinner} [{elapsed:>4}] {prefix} {msg}")
        .expect("a valid template")
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✓");
    let mut spinners: std::collections::BTreeMap<String, indicatif::ProgressBar> =
        Default::default();
    while let Some(event) = rx.recv().await {
        if json {
            super::apply_json::event(event);
            continue;
        }
        if quiet {
            continue;
        }
        if live {
            let address = match &event {
                Event::Started { address, .. }
                | Event::Finished { address, .. }
                | Event::Retrying { address, .. }
                | Event::Failed { address, .. }
                | Event::Progress { address, .. } => address.clone(),
            };
            let bar = spinners.entry(address.clone()).or_insert_with(|| {
                let bar = bars.add(indicatif::ProgressBar::new_spinner().with_style(style.clone()));
                bar.set_prefix(address);
                bar.enable_steady_tick(std::time::Duration::from_millis(120));
                bar
            });
            match event {
                Event::Started { step, .. } => bar.set_message(format!("{step}…")),
                Event::Progress { line, .. } => bar.set_message(line),
                Event::Retrying { step, error, .. } => {
                    bar.set_message(format!("{step}: {error}; retrying"))
                }
                Event::Finished { step, .. } => bar.set_message(format!("{step} done")),
                Event::Failed { step, error, .. } => {
                    bar.abandon_with_message(format!("{step} FAILED: {error}"))
                }
            }
            continue;
        }
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let time = now.get(11..19).unwrap_or(&now);
        let line = match event {
            Event::Progress { address, line } => format!("{address}: {line}"),
            Event::Started { address, step } => format!("{address}: {step}…"),
            Event::Finished {
                address,
                step,
                elapsed,
            } => {
                format!("{address}: {step} done ({:.1}s)", elapsed.as_secs_f64())
            }
            Event::Retrying {
                address,
                step,
                error,
            } => format!("{address}: {step}: {error}; retrying"),
            Event::Failed {
                address,
                step,
                error,
            } => format!("{address}: {step} FAILED: {error}"),
        };
        eprintln!("[{time}] {line}");
    }
    for bar in spinners.values() {
        if !bar.is_finished() {
            bar.finish();
        }
    }
}

pub async fn cmd_output(fleet: &Path, lock: &Path, sim: bool, out: &Output) -> Result<u8, Failure> {
    let s = session(fleet, lock, true, sim, LockUse::Report, out).await?;
    let mut rows = Vec::new();
    for (vm, stamp) in plan::owned(&s.live, &s.loaded.fleet.fleet) {
        let name = stamp.get("resource").cloned().unwrap_or_default();
        let config = vm.config.as_ref().map(|c| &c.values);
        let mut ip = config
            .and_then(|c| c.get("ipconfig0"))
            .and_then(|v| pve_api::property::IpConfig::parse(v).ip)
            .filter(|ip| ip != "dhcp")
            .map(|ip| ip.split('/').next().unwrap_or(&ip).to_owned());
        if ip.is_none() && vm.running == Some(true) {
            ip = s
                .conn
                .client
                .agent_interfaces(&vm.node, vm.vmid)
                .await
                .ok()
                .and_then(|ifaces| {
                    ifaces
                        .into_iter()
                        .filter(|i| i.name != "lo")
                        .flat_map(|i| i.ip_addresses)
                        .find(|a| a.kind == "ipv4" && !a.ip_address.starts_with("169.254."))
                        .map(|a| a.ip_address)
                });
        }
        rows.push(serde_json::json!({
            "address": name,
            "name": vm.name,
            "vmid": vm.vmid,
            "node": vm.node,
            "status": if vm.running == Some(true) { "running" } else { "stopped" },
            "ip": ip,
            "generation": stamp.get("generation").and_then(|g| g.parse::<u32>().ok()),
        }));
    }
    if out.json {
        println!("{}", serde_json::to_string_pretty(&rows).expect("json"));
    } else {
        let text = |r: &serde_json::Value, key: &str| r[key].as_str().unwrap_or("-").to_owned();
        let width = rows
            .iter()
            .map(|r| text(r, "address").len())
            .max()
            .unwrap_or(0)
            .max(2);
        println!(
            "{:<width$} {:>9}  {:<10} {:<8} {:<16} generation",
            "vm", "vmid", "node", "status", "ip"
        );
        for r in &rows {
            println!(
                "{:<width$} {:>9}  {:<10} {:<8} {:<16} {}",
                text(r, "address"),
                r["vmid"].as_u64().unwrap_or_default(),
                text(r, "node"),
                text(r, "status"),
                text(r, "ip"),
                r["generation"]
                    .as_u64()
                    .map_or("-".to_owned(), |g| g.to_string())
            );
        }
    }
    Ok(0)
}

/// Nodes that must hold a replica of `image`'s generation `generation`.
fn replicas_of(desired: &DesiredGraph, image: &str, generation: u32) -> usize {
    desired
        .graph
        .node_weights()
        .filter(|n| matches!(n, crate::desired::DesiredNode::Template(t) if t.image == image && t.generation.number() == generation))
        .count()
}

fn record_build(lock: &mut crate::lock::Lockfile, r: &crate::build::BuildResult, replicas: usize) {
    let parse = |hex: &str| hex.parse::<crate::ids::Sha256>().ok();
    let (Some(input_hash), Some(iso_sha256), Ok(node), Ok(vmid)) = (
        parse(&r.input_hash),
        parse(&r.iso_sha256),
        r.node.parse::<crate::ids::NodeName>(),
        crate::ids::Vmid::new(u64::from(r.vmid)),
    ) else {
        return;
    };
    lock.record_generation(
        &r.image,
        crate::lock::Generation {
            number: r.generation,
            input_hash,
            iso_sha256,
            built_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            nixos_version: r.nixos_version.clone(),
            system_path: r.system_path.clone(),
            templates: vec![crate::lock::TemplateReplica { node, vmid }],
        },
        replicas,
    );
}

/// Loads the fleet and connects, for the commands that read no live
/// state (`rollback`, `force-unlock`).
async fn connect_only(
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

#[derive(Debug, Clone)]
pub struct RollbackArgs {
    pub image: String,
    pub to: Option<u32>,
    pub lock_timeout: Duration,
}

/// `rollback`: under the fleet's apply lock (an apply running elsewhere
/// must not record a generation in between), point an image back at an
/// older kept generation in the lockfile.
pub async fn cmd_rollback(
    fleet: &Path,
    lock_path: &Path,
    locked: bool,
    sim: bool,
    args: &RollbackArgs,
    out: &Output,
) -> Result<u8, Failure> {
    let (loaded, conn) = connect_only(fleet, lock_path, sim, out).await?;
    let take = LockUse::Take {
        command: "rollback",
        wait: args.lock_timeout,
    };
    let held = lock_or_report(&conn.client, &loaded.fleet.fleet, take, out).await?;
    let result = crate::lock::Lockfile::read_for(lock_path, &loaded.fleet.fleet)
        .map_err(Failure::from)
        .and_then(|current| rollback(current, lock_path, locked, args, out));
    release(held, out).await;
    result
}

fn rollback(
    mut current: crate::lock::Lockfile,
    lock_path: &Path,
    locked: bool,
    args: &RollbackArgs,
    out: &Output,
) -> Result<u8, Failure> {
    let image = &args.image;
    let entry = current.images.get_mut(image).ok_or_else(|| {
        Failure::Message(format!(
            "image `{image}` has no generations in {}",
            lock_path.display()
        ))
    })?;
    let mut numbers: Vec<u32> = entry.generations.iter().map(|g| g.number).collect();
    numbers.sort_unstable();
    let target = match args.to {
        Some(n) => n,
        None => numbers
            .iter()
            .rev()
            .copied()
            .find(|n| *n < entry.current)
            .ok_or_else(|| {
                Failure::Message(format!(
                    "image `{image}` has no generation older than {}",
                    entry.current
                ))
            })?,
    };
    if !numbers.contains(&target) {
        return Err(Failure::Message(format!(
            "image `{image}` has no kept generation {target}\n  hint: kept generations: {numbers:?}"
        )));
    }
    let from = entry.current;
    entry.current = target;
    current.write(lock_path, locked)?;
    out.info(&format!(
        "image.{image}: generation {from} -> {target}; new clones use it. Revert the fleet's image changes too, or the next plan builds a new generation from the current fleet."
    ));
    Ok(0)
}

/// `force-unlock ID`: breaks the fleet's apply lock if it is held under ID.
pub async fn cmd_force_unlock(
    fleet: &Path,
    lock_path: &Path,
    sim: bool,
    id: &str,
    out: &Output,
) -> Result<u8, Failure> {
    let (loaded, conn) = connect_only(fleet, lock_path, sim, out).await?;
    let fleet = &loaded.fleet.fleet;
    let holder = apply_lock::force_unlock(&conn.client, fleet, id).await?;
    if out.json {
        println!(
            "{:#}",
            serde_json::json!({ "ok": true, "fleet": fleet, "lock_id": holder.id })
        );
    } else {
        println!(
            "fleet `{fleet}`: broke the apply lock of {}",
            holder.describe()
        );
    }
    Ok(0)
}
