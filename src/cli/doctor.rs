//! `doctor`: what the cluster must offer for the fleet, checked read-only.

use std::path::Path;

use super::session::{LockUse, compute, session};
use super::{EXIT_ERROR, Failure, Output};
use crate::doctor;
use crate::plan::PlanOptions;

/// `doctor`: what the cluster must offer for the fleet, checked read-only.
/// Exit 0 when everything is there, 1 otherwise.
pub async fn cmd_doctor(fleet: &Path, lock: &Path, sim: bool, out: &Output) -> Result<u8, Failure> {
    let s = session(fleet, lock, false, sim, LockUse::Report, out).await.map_err(|e| match e {
        Failure::Message(m) => Failure::Message(format!(
            "cannot read the cluster: {m}\n  hint: check proxmox.endpoint, the token and proxmox.tls"
        )),
        other => other,
    })?;
    let client = &s.conn.client;
    let version = client.version().await?;
    let major: u32 = version
        .version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let mut checks = vec![doctor::Check {
        ok: true,
        what: format!("reached the API as {}", client.auth_id()),
    }];
    checks.push(doctor::Check {
        ok: major >= 8,
        what: format!("Proxmox VE {} (nixgold needs 8 or later)", version.version),
    });
    checks.extend(doctor::placement_checks(
        &s.loaded.fleet,
        &s.desired,
        &s.live,
    ));
    checks.extend(doctor::bridge_checks(client, &s.loaded.fleet, &s.desired).await?);
    let mut notes = Vec::new();
    match compute(&s, &PlanOptions::default()) {
        Ok(plan) => notes.extend(plan.notes),
        Err(Failure::Message(m)) => checks.push(doctor::Check { ok: false, what: m }),
        Err(other) => return Err(other),
    }
    let needs = doctor::privileges(&s.loaded.fleet, &s.desired);
    let missing = doctor::missing(client, &needs).await?;
    checks.push(doctor::Check {
        ok: missing.is_empty(),
        what: format!(
            "the token holds the privileges the fleet needs on {} paths",
            needs.len()
        ),
    });
    for c in &checks {
        println!("{} {}", if c.ok { "ok  " } else { "FAIL" }, c.what);
    }
    for n in &notes {
        println!("note {n}");
    }
    if !missing.is_empty() {
        println!(
            "\n{}",
            doctor::missing_text(client.auth_id(), &needs, &missing)
        );
    }
    Ok(if checks.iter().all(|c| c.ok) {
        0
    } else {
        EXIT_ERROR
    })
}
