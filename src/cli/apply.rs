//! `apply`: a fleet file (plan, confirm, apply) or a saved plan (check,
//! apply), under the fleet's apply lock.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

use super::session::{LockUse, Session, compute, release, session};
use super::{ApplyCmd, EXIT_ERROR, Failure, Global, Output};
use crate::apply::{self, ApplyOptions, Outcome};
use crate::plan::saved::SavedPlan;
use crate::plan::{self, Plan, PlanOptions};

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

/// `apply [PATH]`: the fleet file or saved plan given, or `--fleet`.
pub(super) fn dispatch(g: &Global, cmd: &ApplyCmd, out: &Output) -> Result<u8, Failure> {
    let path = cmd.path.clone().or_else(|| g.fleet.clone()).ok_or_else(|| {
        Failure::Message(
            "no fleet file or saved plan given\n  hint: nixgold apply FLEET (or a file from plan --out)"
                .into(),
        )
    })?;
    let lock = g.lock_for(&path, out);
    let args = ApplyArgs {
        auto_approve: cmd.auto_approve,
        lock_timeout: cmd.wait.lock_timeout,
        task_timeout: cmd.task_timeout,
        keep_failed_build: cmd.keep_failed_build,
        options: cmd.scope.options(),
        concurrency: cmd.concurrency,
    };
    super::runtime()?.block_on(cmd_apply(&path, &lock, g.locked, g.sim, &args, out))
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
    let saved = SavedPlan::read(target).transpose()?;
    let mut s = match &saved {
        Some(saved) => {
            saved.check_target(target, sim, &args.options)?;
            session(&saved.fleet_path, &saved.lock_path, true, sim, take, out).await?
        }
        None => session(target, lock, locked, sim, take, out).await?,
    };
    let held = s.apply_lock.take();
    let result = apply_in_session(&s, saved, locked, args, out).await;
    release(held, out).await;
    result
}

async fn apply_in_session(
    s: &Session,
    saved: Option<SavedPlan>,
    locked: bool,
    args: &ApplyArgs,
    out: &Output,
) -> Result<u8, Failure> {
    let (plan, saved) = match saved {
        Some(saved) => {
            saved.check_fresh(&s.live.fingerprint())?;
            let derived = compute(s, &saved.options)?;
            (saved.into_plan(&derived)?, true)
        }
        None => (compute(s, &args.options)?, false),
    };
    let mut plan = plan;
    if let Some(guest_port) = s.conn.sim_guest_port() {
        plan.localise_builds(guest_port);
    }
    if out.json {
        super::apply_json::start(&plan);
    } else if !saved {
        super::plan::print_plan(&plan, out);
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
    let printer = tokio::spawn(super::progress::print_events(rx, out.quiet, out.json));
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

/// Writes what the apply built and retired into the lockfile.
fn record_outcome(
    s: &Session,
    plan: &Plan,
    report: &apply::Report,
    locked: bool,
    out: &Output,
) -> Result<(), Failure> {
    let mut lock = plan.lock.clone();
    let recorded = crate::record::record_outcome(&mut lock, plan, report, &s.desired)?;
    for r in recorded {
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
        return Ok(if failed == 0 { 0 } else { EXIT_ERROR });
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
