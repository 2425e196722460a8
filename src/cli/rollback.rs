//! `rollback`: point an image back at an older kept generation.

use std::path::Path;
use std::time::Duration;

use super::session::{LockUse, connect_only, lock_or_report, release};
use super::{Failure, Global, LockWait, Output};
use crate::fleet::Fleet;
use crate::lock::Lockfile;

#[derive(Debug, Clone)]
pub struct RollbackArgs {
    pub image: String,
    /// `rollback` (to a generation, default the one before current), or
    /// `release` (`None`).
    pub rollback: Option<Option<u32>>,
    pub lock_timeout: Duration,
}

/// `rollback --image NAME [--to N]` (`rollback: Some(to)`) or `release
/// --image NAME` (`None`) for the fleet file and lockfile given.
pub(super) fn dispatch(
    g: &Global,
    (fleet, lock): (&Path, &Path),
    image: &str,
    rollback: Option<Option<u32>>,
    wait: &LockWait,
    out: &Output,
) -> Result<u8, Failure> {
    let args = RollbackArgs {
        image: image.to_owned(),
        rollback,
        lock_timeout: wait.lock_timeout,
    };
    super::runtime()?.block_on(cmd_rollback(fleet, lock, g.locked, g.sim, &args, out))
}

/// `rollback` and `release`: under the fleet's apply lock (an apply
/// running elsewhere must not record a generation in between), point an
/// image back at an older kept generation and hold it there, or end the
/// hold.
pub async fn cmd_rollback(
    fleet: &Path,
    lock_path: &Path,
    locked: bool,
    sim: bool,
    args: &RollbackArgs,
    out: &Output,
) -> Result<u8, Failure> {
    let (loaded, conn) = connect_only(fleet, lock_path, sim, out).await?;
    let command = if args.rollback.is_some() {
        "rollback"
    } else {
        "release"
    };
    let take = LockUse::Take {
        command,
        wait: args.lock_timeout,
    };
    let held = lock_or_report(&conn.client, &loaded.fleet.fleet, take, out).await?;
    let result = Lockfile::read_for(lock_path, &loaded.fleet.fleet)
        .map_err(Failure::from)
        .and_then(|current| move_image(current, &loaded.fleet, lock_path, locked, args, out));
    release(held, out).await;
    result
}

/// Rolls `args.image` back (holding it) or releases it, and writes the
/// lockfile.
fn move_image(
    mut current: Lockfile,
    fleet: &Fleet,
    lock_path: &Path,
    locked: bool,
    args: &RollbackArgs,
    out: &Output,
) -> Result<u8, Failure> {
    let image = &args.image;
    let message = match args.rollback {
        Some(to) => {
            let inputs = crate::desired::image_inputs(fleet, &current, image)
                .ok_or_else(|| Failure::Message(format!("image `{image}` is not in the fleet")))?;
            let (from, to) = current.rollback(image, to, inputs)?;
            format!(
                "image.{image}: generation {from} -> {to}; new clones use it, and the image stays on generation {to} while the fleet asks for what it asks for now. A change of the image in the fleet, or `nixgold release --image {image}`, ends the hold."
            )
        }
        None => match current.release(image)? {
            Some(held) => format!(
                "image.{image}: released the hold on generation {held}; the next plan follows the fleet again (a kept generation with the inputs it asks for is reused, not rebuilt)"
            ),
            None => format!("image.{image}: not held; nothing to release"),
        },
    };
    current.write(lock_path, locked)?;
    out.info(&message);
    Ok(0)
}
