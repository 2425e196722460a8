//! `cycle`: the quarterly rebuild, unattended — `update` (the ISO pins),
//! `plan --out` (kept for people to read), then `apply` of exactly that
//! plan when the operator opted in (`--apply`); otherwise the plan waits.
//!
//! Each step is this same binary run as a child, so every step behaves
//! (lock, exit codes, redaction) exactly as when a person runs it. The
//! cycle's exit code is 0 (nothing to do, or applied), 2 (changes wait in
//! the kept plan) or 1 (a step failed); with `--prometheus` it writes a
//! textfile whose `nixgold_cycle_success 0` and `nixgold_cycle_failed_step`
//! make a failed run page someone instead of passing silently.

use std::path::PathBuf;
use std::process::Command;

/// A cycle's steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Update,
    Plan,
    Apply,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Update => "update",
            Step::Plan => "plan",
            Step::Apply => "apply",
        }
    }
}

/// How a cycle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The plan was empty.
    NothingToDo,
    /// The plan was applied.
    Applied,
    /// The plan waits for a person (no `--apply`).
    Waiting,
    Failed(Step),
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::NothingToDo | Outcome::Applied => 0,
            Outcome::Waiting => 2,
            Outcome::Failed(_) => 1,
        }
    }
}

/// What a cycle runs on.
#[derive(Debug, Clone)]
pub struct Cycle {
    pub fleet: PathBuf,
    pub lock: PathBuf,
    pub plan_out: PathBuf,
    pub apply: bool,
    pub sim: bool,
}

impl Cycle {
    /// Runs the steps; each child's output goes to ours.
    pub fn run(&self) -> Outcome {
        let fleet = self.fleet.as_os_str();
        let plan_out = self.plan_out.as_os_str();
        if !self.step(Step::Update, &["update".as_ref(), fleet]) {
            return Outcome::Failed(Step::Update);
        }
        let plan = [
            "plan".as_ref(),
            fleet,
            "--out".as_ref(),
            plan_out,
            "--detailed-exitcode".as_ref(),
        ];
        match self.code(Step::Plan, &plan) {
            Some(0) => return Outcome::NothingToDo,
            Some(2) => {}
            _ => return Outcome::Failed(Step::Plan),
        }
        if !self.apply {
            eprintln!(
                "nixgold cycle: the plan waits in {} (apply it with `nixgold apply {}`, or run the cycle with --apply)",
                self.plan_out.display(),
                self.plan_out.display()
            );
            return Outcome::Waiting;
        }
        let apply = ["apply".as_ref(), plan_out, "--auto-approve".as_ref()];
        if self.step(Step::Apply, &apply) {
            Outcome::Applied
        } else {
            Outcome::Failed(Step::Apply)
        }
    }

    fn step(&self, step: Step, args: &[&std::ffi::OsStr]) -> bool {
        self.code(step, args) == Some(0)
    }

    /// Runs `nixgold ARGS` with this cycle's lockfile (and `--sim`).
    fn code(&self, step: Step, args: &[&std::ffi::OsStr]) -> Option<i32> {
        eprintln!("nixgold cycle: {}", step.name());
        let exe = std::env::current_exe().ok()?;
        let mut cmd = Command::new(exe);
        cmd.args(args).arg("--lock").arg(&self.lock);
        if self.sim {
            cmd.arg("--sim");
        }
        match cmd.status() {
            Ok(status) => status.code(),
            Err(e) => {
                eprintln!("nixgold cycle: cannot run the {} step: {e}", step.name());
                None
            }
        }
    }
}

/// The cycle's Prometheus textfile.
pub fn prometheus(fleet: &str, outcome: Outcome, now_secs: u64) -> String {
    use crate::drift::{gauge, label};
    let base = format!("fleet=\"{}\"", label(fleet));
    let mut out = String::new();
    let one = |value: bool| [(base.clone(), u64::from(value))];
    gauge(
        &mut out,
        "nixgold_cycle_success",
        "Whether the last cycle ran through (1) or a step failed (0).",
        &one(!matches!(outcome, Outcome::Failed(_))),
    );
    gauge(
        &mut out,
        "nixgold_cycle_last_run_timestamp_seconds",
        "When the last cycle ran (Unix time).",
        &[(base.clone(), now_secs)],
    );
    gauge(
        &mut out,
        "nixgold_cycle_changes_waiting",
        "Whether a plan waits for a person (1) or not (0).",
        &one(outcome == Outcome::Waiting),
    );
    if let Outcome::Failed(step) = outcome {
        gauge(
            &mut out,
            "nixgold_cycle_failed_step",
            "The step the last cycle failed at.",
            &[(format!("{base},step=\"{}\"", step.name()), 1)],
        );
    }
    out
}
