//! The `nixgold` command line: argument parsing, output and exit codes.
//!
//! Each subcommand is a thin shell around the library: it loads what it
//! needs, calls the pipeline, and prints text or (with `--json`) data.
//! Everything the user can get wrong ends here as a short message with a
//! hint and exit code 1; nothing is changed by a command that failed.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::fleet::{self, LoadedFleet};
use crate::lock::Lockfile;
use crate::problem::Problem;

mod apply;
mod apply_json;
mod docs;
mod doctor;
mod drift;
mod force_unlock;
mod graph;
mod import;
mod init;
mod local;
mod output;
mod plan;
mod progress;
mod rollback;
mod schedule;
mod session;
mod show;
mod sim;
mod update;

/// The lockfile's name before each fleet had its own (`FLEET.lock`).
const LEGACY_LOCK: &str = "nixgold.lock";

/// Exit code of a command that failed (bad input, refused change, error).
pub const EXIT_ERROR: u8 = 1;

/// Exit code of a command line nixgold cannot parse (unknown flag, missing
/// value): `EX_USAGE` from sysexits.h, so that it never reads as 0 ("no
/// changes") or 2 ("changes", "drift") to a script.
pub const EXIT_USAGE: u8 = 64;

/// Exit code of `plan --detailed-exitcode` when there are changes, and of
/// `drift` when there is drift.
pub const EXIT_CHANGES: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "nixgold",
    version,
    about = "NixOS golden images and VMs on Proxmox VE, from one fleet file and a lockfile",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Global {
    /// Fleet file (.ncl, .yaml, .yml or .json).
    #[arg(long, global = true, env = "NIXGOLD_FLEET", value_name = "FILE")]
    fleet: Option<PathBuf>,
    /// Lockfile to read and update [default: one per fleet, NAME.lock beside
    /// NAME.ncl; with --sim: .nixgold/sim/NAME.lock, beside the simulated
    /// cluster].
    #[arg(long, global = true, env = "NIXGOLD_LOCK", value_name = "FILE")]
    lock: Option<PathBuf>,
    /// Refuse to change the lockfile (for CI): fail if it is out of date.
    #[arg(long, global = true)]
    locked: bool,
    /// When to use colours.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,
    /// More log output (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only print errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Print data as JSON instead of text (where the output is data).
    #[arg(long, global = true)]
    json: bool,
    /// Use the embedded Proxmox simulator (state in .nixgold/sim/) instead
    /// of the fleet's cluster.
    #[arg(long, global = true, env = "NIXGOLD_SIM", value_parser = clap::builder::BoolishValueParser::new())]
    sim: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a fleet file: contracts, references, VMIDs, addresses, sizes.
    Validate(FleetArg),
    /// Show the desired graph (ISO → image generation → VMs), or with
    /// --plan the plan's execution order.
    Graph {
        #[command(flatten)]
        fleet: FleetArg,
        /// Output format.
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
        /// Plan against the cluster and show the order apply would run it in.
        #[arg(long)]
        plan: bool,
    },
    /// Print an image's rendered configuration.nix and install script.
    Render {
        #[command(flatten)]
        fleet: FleetArg,
        /// The image (key in `images`).
        #[arg(long, value_name = "NAME")]
        image: String,
    },
    /// Bring the lockfile up to date with the fleet (allocate VMIDs).
    Lock(FleetArg),
    /// Resolve the ISO pins again (a new channel release moves them) and
    /// record the ones that moved in the lockfile.
    Update {
        #[command(flatten)]
        fleet: FleetArg,
        /// Only this ISO (key in `isos`); repeatable.
        #[arg(long, value_name = "NAME")]
        iso: Vec<String>,
    },
    /// Show what apply would change in the cluster.
    Plan {
        #[command(flatten)]
        fleet: FleetArg,
        /// Save the plan to apply it later with `nixgold apply FILE`.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Exit 0 without changes, 2 with changes, 1 on error.
        #[arg(long)]
        detailed_exitcode: bool,
        #[command(flatten)]
        scope: Scope,
    },
    /// Change the cluster to match the fleet (or apply a saved plan).
    Apply(ApplyCmd),
    /// Compare the cluster with the fleet and change nothing (for timers and
    /// CI): exit 0 without drift, 2 with drift, 1 on error.
    Drift {
        #[command(flatten)]
        fleet: FleetArg,
        /// Also write the findings to FILE as a Prometheus textfile
        /// (atomically; for node_exporter's textfile collector).
        #[arg(long, value_name = "FILE")]
        prometheus: Option<PathBuf>,
    },
    /// The quarterly cycle, unattended: update the ISO pins, save the plan,
    /// apply it only with --apply. Exit 0 (nothing to do, or applied), 2 (the
    /// plan waits), 1 (a step failed).
    Cycle(schedule::CycleArgs),
    /// Print (or write into --dir) systemd units for the drift timer and the
    /// quarterly cycle, secrets as systemd credentials.
    Schedule(schedule::ScheduleArgs),
    /// Check the cluster can take the fleet, changing nothing: reachability,
    /// TLS, API version, nodes, storages and their content types, space,
    /// and every privilege nixgold needs (exit 1 when something is missing).
    Doctor(FleetArg),
    /// Show the fleet's VMs: address, VMID, node, status, IP.
    Output(FleetArg),
    /// Point an image back at an older kept generation and hold it there
    /// while the fleet asks for what it asks for now (lockfile only).
    Rollback {
        #[command(flatten)]
        fleet: FleetArg,
        /// The image (key in `images`).
        #[arg(long, value_name = "NAME")]
        image: String,
        /// The generation to return to (default: the one before current).
        #[arg(long, value_name = "N")]
        to: Option<u32>,
        #[command(flatten)]
        wait: LockWait,
    },
    /// End the hold a `rollback` put on an image: the next plan follows the
    /// fleet again (lockfile only).
    Release {
        #[command(flatten)]
        fleet: FleetArg,
        /// The image (key in `images`).
        #[arg(long, value_name = "NAME")]
        image: String,
        #[command(flatten)]
        wait: LockWait,
    },
    /// Write a fleet file for what exists: a starter fleet, or with
    /// --from-cluster one drafted from the cluster's templates and VMs.
    Init(init::InitArgs),
    /// Take an existing VM (`vm.NAME`) or template (`image.NAME`) under
    /// management without recreating it: records the adoption in the
    /// lockfile; the next plan shows what adopting changes.
    Import {
        /// The fleet file.
        #[arg(value_name = "FLEET")]
        fleet: PathBuf,
        /// The fleet's resource: `vm.NAME` or `image.NAME`.
        #[arg(value_name = "ADDRESS")]
        address: crate::import::Address,
        /// The VMID of the existing VM or template.
        #[arg(value_name = "VMID")]
        vmid: u32,
        #[command(flatten)]
        wait: LockWait,
    },
    /// Break the fleet's apply lock left by a run that is gone (its lock ID
    /// is in the error of the run that found it).
    ForceUnlock {
        /// The lock ID.
        #[arg(value_name = "LOCK_ID")]
        id: String,
        #[command(flatten)]
        fleet: FleetArg,
    },
    /// Show a saved plan (PLANFILE), or the managed state a fleet's
    /// lockfile records; with --json in terraform's `show -json` shape.
    Show {
        /// A plan saved with `plan --out`, or a fleet file (its state).
        #[arg(value_name = "PLANFILE_OR_FLEET")]
        path: Option<PathBuf>,
    },
    /// Print the fleet file's JSON Schema (for YAML editors).
    Schema,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Example: nixgold completions bash > ~/.local/share/bash-completion/completions/nixgold"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page nixgold(1), or write one page per command into DIR.
    Man {
        /// Write nixgold.1, nixgold-plan.1, … into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// The built-in Proxmox VE simulator.
    Sim {
        #[command(subcommand)]
        command: sim::SimCommand,
    },
}

// The arguments of `apply` (its help is the variant's doc comment).
#[derive(Debug, Args)]
struct ApplyCmd {
    /// A fleet file, or a plan saved with `plan --out`.
    #[arg(value_name = "FLEET_OR_PLAN")]
    path: Option<PathBuf>,
    /// Do not ask for confirmation.
    #[arg(long)]
    auto_approve: bool,
    /// Keep the VM of a failed template build for debugging.
    #[arg(long)]
    keep_failed_build: bool,
    /// Changes in flight at once.
    #[arg(long, default_value_t = crate::apply::ApplyOptions::default().concurrency)]
    concurrency: usize,
    /// How long to wait for one Proxmox task before reporting it as
    /// hung [default: the fleet's task_timeout, 30m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    task_timeout: Option<std::time::Duration>,
    #[command(flatten)]
    wait: LockWait,
    #[command(flatten)]
    scope: Scope,
}

#[derive(Debug, Args)]
struct FleetArg {
    /// Fleet file; overrides --fleet.
    #[arg(value_name = "FLEET")]
    path: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct LockWait {
    /// Wait this long for another run's apply lock of the fleet (e.g. 5m)
    /// instead of failing at once.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "0s")]
    lock_timeout: std::time::Duration,
}

#[derive(Debug, Args)]
struct Scope {
    /// Limit the run to this resource (`vm.NAME`, `iso.NAME`); repeatable.
    #[arg(long, value_name = "ADDRESS")]
    target: Vec<String>,
    /// Destroy stamped VMs that are no longer in the fleet.
    #[arg(long)]
    allow_destroy: bool,
    /// Destroy and re-create this VM although it matches the fleet
    /// (`vm.NAME`); repeatable.
    #[arg(long, value_name = "ADDRESS")]
    replace: Vec<String>,
}

impl Scope {
    fn options(&self) -> crate::plan::PlanOptions {
        crate::plan::PlanOptions {
            allow_destroy: self.allow_destroy,
            targets: self.target.clone(),
            replace: self.replace.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GraphFormat {
    Dot,
    Text,
}

/// What went wrong, ready to print.
#[derive(Debug)]
pub(crate) enum Failure {
    Problems {
        problems: Vec<Problem>,
        detail: Option<String>,
    },
    Message(String),
}

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            text.push_str(&format!("\n  caused by: {cause}"));
            source = cause.source();
        }
        Failure::Message(text)
    }
}

pub(crate) struct Output {
    /// Colour on stderr (messages, errors).
    color: bool,
    /// Colour on stdout (the plan).
    color_stdout: bool,
    json: bool,
    quiet: bool,
    verbose: u8,
}

impl Output {
    fn error_label(&self) -> &'static str {
        if self.color {
            "\x1b[1;31merror\x1b[0m"
        } else {
            "error"
        }
    }

    fn print_failure(&self, failure: &Failure) {
        let redacted;
        let failure = match failure {
            Failure::Message(m) => {
                redacted = Failure::Message(crate::redact::redact(m).into_owned());
                &redacted
            }
            Failure::Problems { .. } => failure,
        };
        if self.json {
            let value = match failure {
                Failure::Problems { problems, .. } => {
                    serde_json::json!({ "ok": false, "problems": problems })
                }
                Failure::Message(m) => serde_json::json!({ "ok": false, "error": m }),
            };
            // One line, so that it also ends a JSON Lines stream (`apply --json`).
            println!("{}", crate::redact::redact(&value.to_string()));
            return;
        }
        let mut stderr = std::io::stderr().lock();
        match failure {
            Failure::Problems { problems, detail } => {
                for p in problems {
                    let text = crate::redact::redact(&p.to_string()).into_owned();
                    let text = text
                        .strip_prefix("error")
                        .map_or(text.clone(), |rest| format!("{}{rest}", self.error_label()));
                    let _ = writeln!(stderr, "{text}");
                }
                if let (Some(detail), true) = (detail, self.verbose > 0) {
                    let _ = writeln!(stderr, "\n{}", crate::redact::redact(detail));
                }
                let _ = writeln!(
                    stderr,
                    "{} problem{} found; nothing was changed",
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                );
            }
            Failure::Message(m) => {
                let text = m.strip_prefix("error: ").unwrap_or(m);
                let _ = writeln!(stderr, "{}: {text}", self.error_label());
            }
        }
    }

    fn info(&self, text: &str) {
        if !self.quiet {
            eprintln!("{text}");
        }
    }
}

/// Runs the CLI; returns the process exit code.
pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    let g = &cli.global;
    // `--color always|never` wins; `auto` colours a terminal unless NO_COLOR
    // is set to anything non-empty (https://no-color.org).
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let color_on = |terminal: bool| match g.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => terminal && !no_color,
    };
    let color = color_on(std::io::stderr().is_terminal());
    init_tracing(g.verbose, g.quiet, color);
    let out = Output {
        color,
        color_stdout: color_on(std::io::stdout().is_terminal()),
        json: g.json,
        quiet: g.quiet,
        verbose: g.verbose,
    };
    match dispatch(&cli, &out) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            out.print_failure(&failure);
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn init_tracing(verbose: u8, quiet: bool, color: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIXGOLD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("nixgold={level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| crate::redact::Stderr)
        .with_ansi(color)
        .try_init();
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Runtime::new().map_err(Failure::from)
}

impl Global {
    /// The lockfile of the fleet file `fleet`: `--lock`, or one per fleet —
    /// `NAME.lock` beside `NAME.ncl` (with `--sim`, in the simulator's
    /// directory). A `nixgold.lock` in the current directory (the default
    /// before) is used while it belongs to this fleet and the fleet's own
    /// lockfile does not exist yet, with a note to rename it.
    fn lock_for(&self, fleet: &Path, out: &Output) -> PathBuf {
        if let Some(lock) = &self.lock {
            return lock.clone();
        }
        let stem = fleet.file_stem().unwrap_or(std::ffi::OsStr::new("fleet"));
        let (dir, legacy) = if self.sim {
            let dir = crate::connect::sim_dir();
            let legacy = dir.join(LEGACY_LOCK);
            (dir, legacy)
        } else {
            let dir = fleet.parent().unwrap_or(Path::new("")).to_owned();
            (dir, PathBuf::from(LEGACY_LOCK))
        };
        let own = dir.join(stem).with_extension("lock");
        if own.exists() || !legacy.exists() {
            return own;
        }
        let belongs = Lockfile::read(&legacy).is_ok_and(|lock| {
            fleet::load(fleet).is_ok_and(|f| !lock.fleet.is_empty() && f.fleet.fleet == lock.fleet)
        });
        if !belongs {
            return own;
        }
        out.info(&format!(
            "note: using {} (fleet `{}`), the lockfile's old default name; each fleet now has its own: `mv {} {}` (or `git mv`)",
            legacy.display(),
            Lockfile::read(&legacy).map(|l| l.fleet).unwrap_or_default(),
            legacy.display(),
            own.display()
        ));
        legacy
    }
}

fn dispatch(cli: &Cli, out: &Output) -> Result<u8, Failure> {
    let g = &cli.global;
    match &cli.command {
        Command::Plan {
            fleet,
            out: save,
            detailed_exitcode,
            scope,
        } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            let args = plan::PlanArgs {
                out: save.clone(),
                detailed_exitcode: *detailed_exitcode,
                options: scope.options(),
            };
            runtime()?.block_on(plan::cmd_plan(&path, &lock, g.locked, g.sim, &args, out))
        }
        Command::Apply(cmd) => apply::dispatch(g, cmd, out),
        Command::Update { fleet, iso } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            runtime()?.block_on(update::cmd_update(&path, &lock, g.locked, g.sim, iso, out))
        }
        Command::Drift { fleet, prometheus } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            runtime()?.block_on(drift::cmd_drift(
                &path,
                &lock,
                g.locked,
                g.sim,
                prometheus.as_deref(),
                out,
            ))
        }
        Command::Doctor(arg) => {
            let (path, lock) = fleet_and_lock(g, arg, out)?;
            runtime()?.block_on(doctor::cmd_doctor(&path, &lock, g.sim, out))
        }
        Command::Output(arg) => {
            let (path, lock) = fleet_and_lock(g, arg, out)?;
            runtime()?.block_on(output::cmd_output(&path, &lock, g.sim, out))
        }
        Command::Graph {
            fleet,
            format,
            plan: true,
        } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            let text = *format == GraphFormat::Text;
            runtime()?.block_on(graph::cmd_plan_order(
                &path, &lock, g.locked, g.sim, text, out,
            ))
        }
        other => dispatch_admin(g, other, out),
    }
}

/// The commands that move images, record or adopt resources, or run a
/// cycle.
fn dispatch_admin(g: &Global, command: &Command, out: &Output) -> Result<u8, Failure> {
    match command {
        Command::Rollback {
            fleet,
            image,
            to,
            wait,
        } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            rollback::dispatch(g, (&path, &lock), image, Some(*to), wait, out)
        }
        Command::Release { fleet, image, wait } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            rollback::dispatch(g, (&path, &lock), image, None, wait, out)
        }
        Command::Init(args) => {
            let lock = g.lock_for(args.output(), out);
            runtime()?.block_on(init::cmd_init(args, &lock, out))
        }
        Command::Import {
            fleet,
            address,
            vmid,
            wait,
        } => {
            let lock = g.lock_for(fleet, out);
            runtime()?.block_on(import::cmd_import(
                fleet,
                &lock,
                g.sim,
                address,
                *vmid,
                wait.lock_timeout,
                out,
            ))
        }
        Command::ForceUnlock { id, fleet } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            runtime()?.block_on(force_unlock::cmd_force_unlock(&path, &lock, g.sim, id, out))
        }
        Command::Cycle(args) => {
            let (path, lock) = fleet_and_lock(g, &args.fleet, out)?;
            schedule::cycle(args, path, lock, g.sim)
        }
        local => dispatch_local(g, local, out),
    }
}

/// The commands that read no cluster.
fn dispatch_local(g: &Global, command: &Command, out: &Output) -> Result<u8, Failure> {
    match command {
        Command::Validate(arg) => {
            let (path, lock) = fleet_and_lock(g, arg, out)?;
            local::validate(&path, &lock, out)
        }
        Command::Graph { fleet, format, .. } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            local::graph(&path, &lock, *format, out)
        }
        Command::Render { fleet, image } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            local::render(&path, &lock, image, out)
        }
        Command::Lock(arg) => {
            let (path, lock) = fleet_and_lock(g, arg, out)?;
            local::lock(&path, &lock, g.locked, out)
        }
        Command::Show { path } => show::dispatch(g, path.as_deref(), out),
        Command::Schema => {
            print!("{}", fleet::load::json_schema());
            Ok(0)
        }
        Command::Completions { shell } => {
            docs::completions(*shell);
            Ok(0)
        }
        Command::Man { dir } => docs::man(dir.as_deref()).map(|()| 0),
        Command::Sim { command } => sim::run(command).map(|()| 0),
        Command::Schedule(args) => schedule::schedule(args, fleet_path(g, &args.fleet)?),
        cluster => Err(Failure::Message(format!(
            "internal error: `{cluster:?}` is not a local command"
        ))),
    }
}

/// The fleet file of a command, and its lockfile.
fn fleet_and_lock(g: &Global, arg: &FleetArg, out: &Output) -> Result<(PathBuf, PathBuf), Failure> {
    let path = fleet_path(g, arg)?;
    let lock = g.lock_for(&path, out);
    Ok((path, lock))
}

fn fleet_path(g: &Global, arg: &FleetArg) -> Result<PathBuf, Failure> {
    arg.path.clone().or_else(|| g.fleet.clone()).ok_or_else(|| {
        Failure::Message("no fleet file given\n  hint: pass it as an argument, with --fleet FILE, or in NIXGOLD_FLEET".into())
    })
}

/// Loads the fleet and its lockfile and runs every semantic check.
pub(crate) fn load_checked(
    path: &Path,
    lock_path: &Path,
) -> Result<(LoadedFleet, Lockfile), Failure> {
    crate::connect::register_environment();
    let loaded = fleet::load(path).map_err(|e| match e {
        fleet::FleetError::Invalid { problems, report } => Failure::Problems {
            problems,
            detail: Some(report),
        },
        other => Failure::from(other),
    })?;
    let base = loaded.path.parent().unwrap_or(Path::new("."));
    crate::connect::register_secrets(&loaded.fleet, base);
    let lock = Lockfile::read_for(lock_path, &loaded.fleet.fleet)?;
    let problems = crate::validate::validate(&loaded, &lock);
    if !problems.is_empty() {
        return Err(Failure::Problems {
            problems,
            detail: None,
        });
    }
    Ok((loaded, lock))
}
