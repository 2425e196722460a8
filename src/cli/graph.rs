//! `graph --plan`: the plan's execution order.

use std::path::Path;

use super::session::{LockUse, compute, session};
use super::{Failure, Output};
use crate::plan::PlanOptions;
use crate::render;

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
