//! `plan`: the plan for people or programs, optionally saved.

use std::path::{Path, PathBuf};

use super::session::{LockUse, compute, session};
use super::{EXIT_CHANGES, Failure, Output};
use crate::plan::saved::SavedPlan;
use crate::plan::target::PlanTarget;
use crate::plan::{Plan, PlanOptions};
use crate::render;

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
        let saved = SavedPlan::new(
            &s.loaded.path,
            lock,
            s.desired.lock.render(),
            &args.options,
            &plan,
            PlanTarget::current(sim, &s.loaded.fleet),
        );
        let text = serde_json::to_string_pretty(&saved).expect("plans serialise");
        crate::files::write_atomic(path, &text, ".nixgold.")
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
