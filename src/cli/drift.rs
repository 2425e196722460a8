//! `drift`: the plan run read-only, as a report and a Prometheus textfile.

use std::path::Path;

use super::session::{LockUse, compute, session};
use super::{EXIT_CHANGES, Failure, Output};
use crate::plan::PlanOptions;

/// `drift`: plan without writing anything (the lockfile included); exit 2
/// when apply would change something. With `--prometheus` the findings — or,
/// when the check fails, `nixgold_drift_success 0` — go to a textfile.
pub async fn cmd_drift(
    fleet: &Path,
    lock: &Path,
    locked: bool,
    sim: bool,
    prometheus: Option<&Path>,
    out: &Output,
) -> Result<u8, Failure> {
    let checked = async {
        let s = session(fleet, lock, locked, sim, LockUse::Report, out).await?;
        let plan = compute(&s, &PlanOptions::default())?;
        let mut drift = crate::drift::Drift::new(&plan, &s.live, &s.desired.lock);
        // One `/pending` read per running VM, concurrently (the client
        // bounds the requests in flight), reported in VMID order.
        let mut reads = tokio::task::JoinSet::new();
        for (address, node, vmid) in crate::drift::Drift::running_vms(&plan, &s.live) {
            let client = s.conn.client.clone();
            reads.spawn(async move { (vmid, address, client.pending(&node, vmid.get()).await) });
        }
        let mut pending = reads.join_all().await;
        pending.sort_by_key(|(vmid, _, _)| *vmid);
        for (_, address, entries) in pending {
            drift.add_pending(&address, &entries.map_err(Failure::from)?);
        }
        inspect_guests(&s.conn.client, &mut drift, &s.live, &s.desired.lock).await;
        Ok::<_, Failure>(drift)
    }
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let write = |text: String| {
        prometheus.map_or(Ok(()), |path| {
            crate::files::write_atomic(path, &text, ".nixgold.")
                .map_err(|e| Failure::Message(format!("cannot write {}: {e}", path.display())))
        })
    };
    let drift = match checked {
        Ok(drift) => drift,
        Err(e) => {
            // The series keep their fleet label even when the fleet does not load.
            let name = crate::fleet::name_or_stem(fleet);
            write(crate::drift::prometheus_failure(&name, now))?;
            return Err(e);
        }
    };
    write(drift.prometheus(now))?;
    if out.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&drift).expect("reports serialise")
        );
    } else {
        print!("{}", drift.text());
    }
    Ok(if drift.has_drift() { EXIT_CHANGES } else { 0 })
}

/// Looks into every VM's guest concurrently (the client bounds the
/// requests in flight) and records what each runs, in VMID order, with the
/// API calls that took.
async fn inspect_guests(
    client: &pve_api::Client,
    drift: &mut crate::drift::Drift,
    live: &crate::live::LiveState,
    lock: &crate::lock::Lockfile,
) {
    let before = client.calls();
    let mut looks = tokio::task::JoinSet::new();
    for target in crate::inspect::targets(&drift.fleet, live, lock) {
        let client = client.clone();
        looks.spawn(async move {
            let outcome = crate::inspect::inspect(&client, &target).await;
            (target.vmid, target.address, outcome)
        });
    }
    let mut found = looks.join_all().await;
    found.sort_by_key(|(vmid, _, _)| *vmid);
    for (_, address, outcome) in found {
        drift.add_guest(&address, outcome);
    }
    drift.api_calls += client.calls() - before;
}
