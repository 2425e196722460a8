//! `nixgold import FLEET ADDRESS VMID`: records the adoption of an
//! existing VM or template in the lockfile, under the fleet's apply lock.
//! Proxmox is only read; the next plan shows what adopting changes.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use super::session::{self as run, LockUse};
use super::{Failure, Output};
use crate::import::{Address, ImportError};
use crate::lock::Lockfile;

pub async fn cmd_import(
    fleet: &Path,
    lock_path: &Path,
    sim: bool,
    address: &Address,
    vmid: u32,
    lock_timeout: Duration,
    out: &Output,
) -> Result<u8, Failure> {
    let (loaded, conn) = run::connect_only(fleet, lock_path, sim, out).await?;
    let take = LockUse::Take {
        command: "import",
        wait: lock_timeout,
    };
    let held = run::lock_or_report(&conn.client, &loaded.fleet.fleet, take, out).await?;
    let result = async {
        let only = BTreeSet::from([vmid]);
        let mut found = crate::live::read_with_configs(&conn.client, Some(&only)).await?;
        let vm = found.remove(&vmid).ok_or_else(|| ImportError::NoVm {
            address: address.to_string(),
            vmid,
        })?;
        // Read again under the lock: another run may have written it.
        let mut lock = Lockfile::read_for(lock_path, &loaded.fleet.fleet)?;
        lock.fleet = loaded.fleet.fleet.clone();
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let notes = crate::import::record(&loaded.fleet, &mut lock, address, &vm, &now)?;
        lock.write(lock_path, false)?;
        out.info(&format!(
            "imported {address} (VMID {vmid} on {}) into {}; nothing was written to Proxmox",
            vm.node,
            lock_path.display()
        ));
        for note in notes {
            out.info(&format!("note: {note}"));
        }
        out.info("run `nixgold plan` to see what adopting it changes (stamp, tags, settings that differ)");
        Ok::<u8, Failure>(0)
    }
    .await;
    run::release(held, out).await;
    result
}
