//! `rollback`: point an image back at an older kept generation.

use std::path::Path;
use std::time::Duration;

use super::session::{LockUse, connect_only, lock_or_report, release};
use super::{Failure, Global, LockWait, Output};

#[derive(Debug, Clone)]
pub struct RollbackArgs {
    pub image: String,
    pub to: Option<u32>,
    pub lock_timeout: Duration,
}

/// `rollback --image NAME [--to N]` for the fleet file and lockfile given.
pub(super) fn dispatch(
    g: &Global,
    (fleet, lock): (&Path, &Path),
    image: &str,
    to: Option<u32>,
    wait: &LockWait,
    out: &Output,
) -> Result<u8, Failure> {
    let args = RollbackArgs {
        image: image.to_owned(),
        to,
        lock_timeout: wait.lock_timeout,
    };
    super::runtime()?.block_on(cmd_rollback(fleet, lock, g.locked, g.sim, &args, out))
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
