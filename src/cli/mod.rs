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

use crate::desired::{self, DesiredGraph};
use crate::fleet::{self, LoadedFleet};
use crate::lock::Lockfile;
use crate::nixos;
use crate::problem::Problem;

mod apply_json;
mod docs;
mod run;
mod show;
mod sim;
mod target;

/// The lockfile's name before each fleet had its own (`FLEET.lock`).
const LEGACY_LOCK: &str = "nixgold.lock";

/// Exit code of a command that failed (bad input, refused change, error).
pub const EXIT_ERROR: u8 = 1;

/// Exit code of a command line nixgold cannot parse (unknown flag, missing
/// value): `EX_USAGE` from sysexits.h, so that it never reads as 0 ("no
/// changes") or 2 ("changes", "drift") to a script.
pub const EXIT_USAGE: u8 = 64;

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
    Apply {
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
    },
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
    /// Check the cluster can take the fleet, changing nothing: reachability,
    /// TLS, API version, nodes, storages and their content types, space,
    /// and every privilege nixgold needs (exit 1 when something is missing).
    Doctor(FleetArg),
    /// Show the fleet's VMs: address, VMID, node, status, IP.
    Output(FleetArg),
    /// Point an image back at an older kept generation (lockfile only).
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
            let dir = run::sim_dir();
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
            let args = run::PlanArgs {
                out: save.clone(),
                detailed_exitcode: *detailed_exitcode,
                options: scope.options(),
            };
            runtime()?.block_on(run::cmd_plan(&path, &lock, g.locked, g.sim, &args, out))
        }
        Command::Apply {
            path,
            auto_approve,
            keep_failed_build,
            concurrency,
            task_timeout,
            wait,
            scope,
        } => {
            let path = path.clone().or_else(|| g.fleet.clone()).ok_or_else(|| {
                Failure::Message("no fleet file or saved plan given\n  hint: nixgold apply FLEET (or a file from plan --out)".into())
            })?;
            let lock = g.lock_for(&path, out);
            let args = run::ApplyArgs {
                auto_approve: *auto_approve,
                lock_timeout: wait.lock_timeout,
                task_timeout: *task_timeout,
                keep_failed_build: *keep_failed_build,
                options: scope.options(),
                concurrency: *concurrency,
            };
            runtime()?.block_on(run::cmd_apply(&path, &lock, g.locked, g.sim, &args, out))
        }
        Command::Update { fleet, iso } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            runtime()?.block_on(run::cmd_update(&path, &lock, g.locked, g.sim, iso, out))
        }
        Command::Drift { fleet, prometheus } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            runtime()?.block_on(run::cmd_drift(
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
            runtime()?.block_on(run::cmd_doctor(&path, &lock, g.sim, out))
        }
        Command::Output(arg) => {
            let (path, lock) = fleet_and_lock(g, arg, out)?;
            runtime()?.block_on(run::cmd_output(&path, &lock, g.sim, out))
        }
        Command::Validate(arg) => {
            let (path, lock) = fleet_and_lock(g, arg, out)?;
            let (loaded, lock) = load_checked(&path, &lock)?;
            let f = &loaded.fleet;
            if out.json {
                println!(
                    "{:#}",
                    serde_json::json!({
                        "ok": true,
                        "fleet": f.fleet,
                        "isos": f.isos.len(),
                        "images": f.images.len(),
                        "vms": f.vms.len(),
                    })
                );
            } else if !out.quiet {
                println!(
                    "{}: fleet `{}` is valid ({} ISO{}, {} image{}, {} VM{})",
                    loaded.path.display(),
                    f.fleet,
                    f.isos.len(),
                    plural(f.isos.len()),
                    f.images.len(),
                    plural(f.images.len()),
                    f.vms.len(),
                    plural(f.vms.len())
                );
            }
            warn_insecure(&loaded, out);
            drop(lock);
            Ok(0)
        }
        Command::Graph {
            fleet,
            format,
            plan: true,
        } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            let text = *format == GraphFormat::Text;
            runtime()?.block_on(run::cmd_plan_order(
                &path, &lock, g.locked, g.sim, text, out,
            ))
        }
        Command::Graph { fleet, format, .. } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            let (loaded, lock) = load_checked(&path, &lock)?;
            let desired = desired::build(&loaded.fleet, &lock)?;
            note_lock_drift(&desired, &lock, out);
            if out.json {
                println!("{:#}", graph_json(&desired));
            } else {
                match format {
                    GraphFormat::Dot => print!("{}", desired.to_dot()),
                    GraphFormat::Text => print!("{}", desired.to_text()),
                }
            }
            Ok(0)
        }
        Command::Render { fleet, image } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            let (loaded, _lock) = load_checked(&path, &lock)?;
            let Some(spec) = loaded.fleet.images.get(image) else {
                let known: Vec<&str> = loaded.fleet.images.keys().map(String::as_str).collect();
                return Err(Failure::Message(format!(
                    "image `{image}` is not in {}\n  hint: images in this fleet: {}",
                    loaded.path.display(),
                    if known.is_empty() {
                        "(none)".to_owned()
                    } else {
                        known.join(", ")
                    }
                )));
            };
            let configuration = nixos::configuration_nix(image, spec);
            let script = nixos::install_script(image, spec);
            if out.json {
                println!(
                    "{:#}",
                    serde_json::json!({ "image": image, "configuration_nix": configuration, "install_script": script })
                );
            } else {
                println!(
                    "# ===== configuration.nix =====\n{configuration}\n# ===== install.sh =====\n{script}"
                );
            }
            Ok(0)
        }
        Command::Lock(arg) => {
            let (path, lock) = fleet_and_lock(g, arg, out)?;
            let (loaded, current) = load_checked(&path, &lock)?;
            let desired = desired::build(&loaded.fleet, &current)?;
            let changed = desired.lock.write(&lock, g.locked)?;
            let unresolved = unresolved_isos(&desired);
            if out.json {
                println!(
                    "{:#}",
                    serde_json::json!({ "ok": true, "changed": changed, "lockfile": lock, "unpinned_isos": unresolved })
                );
            } else {
                out.info(&format!(
                    "{}: {}",
                    lock.display(),
                    if changed { "updated" } else { "up to date" }
                ));
                for iso in unresolved {
                    out.info(&format!("note: {iso} is not pinned yet"));
                }
            }
            Ok(0)
        }
        Command::Show { path } => {
            let path = path.clone().or_else(|| g.fleet.clone());
            match path.as_deref().map(|p| (p, run::read_saved(p).is_some())) {
                Some((plan, true)) => show::saved_plan(plan, out),
                Some((fleet, false)) => show::state(&g.lock_for(fleet, out), out),
                None => match &g.lock {
                    Some(lock) => show::state(lock, out),
                    None => Err(Failure::Message("no saved plan, fleet file or lockfile given\n  hint: nixgold show PLANFILE, nixgold show FLEET, or --lock FILE".into())),
                },
            }
        }
        Command::Schema => {
            print!("{}", fleet::load::json_schema());
            Ok(0)
        }
        Command::Rollback {
            fleet,
            image,
            to,
            wait,
        } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            let args = run::RollbackArgs {
                image: image.clone(),
                to: *to,
                lock_timeout: wait.lock_timeout,
            };
            runtime()?.block_on(run::cmd_rollback(&path, &lock, g.locked, g.sim, &args, out))
        }
        Command::ForceUnlock { id, fleet } => {
            let (path, lock) = fleet_and_lock(g, fleet, out)?;
            runtime()?.block_on(run::cmd_force_unlock(&path, &lock, g.sim, id, out))
        }
        Command::Completions { shell } => {
            docs::completions(*shell);
            Ok(0)
        }
        Command::Man { dir } => docs::man(dir.as_deref()).map(|()| 0),
        Command::Sim { command } => sim::run(command).map(|()| 0),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
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
    crate::redact::register_environment();
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
    let problems = fleet::validate::validate(&loaded, &lock);
    if !problems.is_empty() {
        return Err(Failure::Problems {
            problems,
            detail: None,
        });
    }
    Ok((loaded, lock))
}

fn warn_insecure(loaded: &LoadedFleet, out: &Output) {
    if loaded.fleet.proxmox.tls.insecure {
        out.info(
            "warning: proxmox.tls.insecure is set: the Proxmox certificate will NOT be verified",
        );
    }
}

fn unresolved_isos(desired: &DesiredGraph) -> Vec<String> {
    let mut names: Vec<String> = desired
        .graph
        .node_weights()
        .filter_map(|n| match n {
            desired::DesiredNode::Iso(iso) => match &iso.pin {
                desired::IsoPinState::Unresolved { source } => {
                    Some(format!("iso.{} ({source})", iso.name))
                }
                desired::IsoPinState::Pinned { .. } => None,
            },
            _ => None,
        })
        .collect();
    names.dedup();
    names
}

fn note_lock_drift(desired: &DesiredGraph, lock: &Lockfile, out: &Output) {
    if desired.lock.vmids != lock.vmids {
        out.info("note: VMIDs marked (allocated) are not in the lockfile yet; `nixgold lock` records them");
    }
}

fn graph_json(desired: &DesiredGraph) -> serde_json::Value {
    let g = &desired.graph;
    let nodes: Vec<serde_json::Value> = g
        .node_indices()
        .map(|i| {
            let mut v = serde_json::to_value(&g[i]).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("address".into(), g[i].address().into());
            }
            v
        })
        .collect();
    let edges: Vec<serde_json::Value> = g
        .edge_indices()
        .filter_map(|e| g.edge_endpoints(e))
        .map(|(a, b)| serde_json::json!({ "from": g[a].address(), "to": g[b].address() }))
        .collect();
    serde_json::json!({ "nodes": nodes, "edges": edges })
}
