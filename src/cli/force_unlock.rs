//! `force-unlock`: break the fleet's apply lock.

use std::path::Path;

use super::session::connect_only;
use super::{Failure, Output};
use crate::apply_lock;

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
