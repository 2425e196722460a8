//! `cycle` and `schedule`: the quarterly cycle and the systemd units that
//! run it and the drift check unattended.

use std::path::{Path, PathBuf};

use clap::Args;

use super::{Failure, FleetArg};
use crate::cycle::Cycle;
use crate::schedule::Schedule;

#[derive(Debug, Args)]
pub(super) struct CycleArgs {
    #[command(flatten)]
    pub fleet: FleetArg,
    /// Where to keep the plan (for people to read, and to apply later).
    #[arg(long, value_name = "FILE")]
    plan_out: PathBuf,
    /// Apply the plan (without it the cycle reports and the plan waits).
    #[arg(long)]
    apply: bool,
    /// Also write the outcome to FILE as a Prometheus textfile.
    #[arg(long, value_name = "FILE")]
    prometheus: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(super) struct ScheduleArgs {
    #[command(flatten)]
    pub fleet: FleetArg,
    /// Generate systemd units (service + timer for drift and the cycle).
    #[arg(long, required = true)]
    systemd: bool,
    /// Write the units into DIR instead of printing them.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The nixgold binary the units run [default: this one].
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// When to check for drift (systemd.time(7) calendar event).
    #[arg(long, value_name = "CALENDAR", default_value = "hourly")]
    drift_every: String,
    /// When to run the cycle (systemd.time(7) calendar event).
    #[arg(long, value_name = "CALENDAR", default_value = "quarterly")]
    cycle_every: String,
    /// node_exporter's textfile directory (nixgold-drift.prom, nixgold-cycle.prom).
    #[arg(long, value_name = "DIR")]
    textfile_dir: Option<PathBuf>,
    /// Where the cycle keeps its plan.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/var/lib/nixgold/cycle.plan"
    )]
    plan_out: PathBuf,
    /// Let the cycle apply its plan (otherwise it only reports).
    #[arg(long)]
    apply: bool,
    /// Where the credential files live, one per secret variable.
    #[arg(long, value_name = "DIR", default_value = "/etc/nixgold/credentials")]
    credentials_dir: PathBuf,
}

pub(super) fn cycle(
    args: &CycleArgs,
    fleet: PathBuf,
    lock: PathBuf,
    sim: bool,
) -> Result<u8, Failure> {
    let name = crate::fleet::name_or_stem(&fleet);
    let outcome = Cycle {
        fleet,
        lock,
        plan_out: args.plan_out.clone(),
        apply: args.apply,
        sim,
    }
    .run();
    if let Some(path) = &args.prometheus {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        crate::files::write_atomic(
            path,
            &crate::cycle::prometheus(&name, outcome, now),
            ".nixgold.",
        )
        .map_err(|e| Failure::Message(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(outcome.exit_code())
}

pub(super) fn schedule(args: &ScheduleArgs, fleet: PathBuf) -> Result<u8, Failure> {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let loaded = crate::fleet::load(&fleet).map_err(Failure::from)?;
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().map_err(Failure::from)?,
    };
    let schedule = Schedule {
        binary: absolute(&binary),
        fleet: absolute(&fleet),
        drift_calendar: args.drift_every.clone(),
        cycle_calendar: args.cycle_every.clone(),
        textfile_dir: args.textfile_dir.as_deref().map(absolute),
        plan_out: absolute(&args.plan_out),
        apply: args.apply,
        credentials_dir: absolute(&args.credentials_dir),
        credentials: crate::schedule::secret_variables(&loaded.fleet),
    };
    let units = schedule.units();
    let Some(dir) = &args.dir else {
        for (name, text) in units {
            println!("# {name}\n{text}");
        }
        return Ok(0);
    };
    for (name, text) in units {
        let path = dir.join(&name);
        crate::files::write_atomic(&path, &text, ".nixgold.")
            .map_err(|e| Failure::Message(format!("cannot write {}: {e}", path.display())))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(0)
}
