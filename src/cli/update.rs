//! `update`: resolve the ISO pins again and record the ones that moved.

use std::path::Path;

use serde::Serialize;

use super::{Failure, Output};
use crate::pin::{self, Resolver};

/// `update`: resolve the ISO pins again (all, or the ISOs named in `only`)
/// and record the ones that moved — a new channel release, a changed
/// checksum file. Pins that did not move stay as they are, so the lockfile
/// changes only when a release does; the next plan then proposes new
/// generations of the images built from a moved ISO.
pub async fn cmd_update(
    fleet: &Path,
    lock_path: &Path,
    locked: bool,
    sim: bool,
    only: &[String],
    out: &Output,
) -> Result<u8, Failure> {
    let (loaded, lock) = super::load_checked(fleet, lock_path)?;
    let isos = &loaded.fleet.isos;
    if let Some(unknown) = only.iter().find(|n| !isos.contains_key(*n)) {
        return Err(Failure::Message(format!(
            "--iso {unknown}: the fleet has no such ISO\n  hint: known ISOs: {}",
            isos.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    let resolver = Resolver::for_run(sim);
    let mut next = lock.clone();
    let mut report = Vec::new();
    for (name, iso) in isos {
        if !only.is_empty() && !only.contains(name) {
            continue;
        }
        if iso.pinned_by_fleet() {
            report.push(IsoUpdate {
                iso: name.clone(),
                status: "fixed",
                before: None,
                after: None,
            });
            continue;
        }
        let before = lock.isos.get(name).filter(|p| p.source == iso.source());
        let pin = pin::resolve(&resolver, name, iso)
            .await
            .map_err(Failure::from)?;
        let status = match before {
            None => "pinned",
            Some(b) if b.url == pin.url && b.sha256 == pin.sha256 => "up to date",
            Some(_) => "moved",
        };
        report.push(IsoUpdate {
            iso: name.clone(),
            status,
            before: before.map(PinRef::of),
            after: Some(PinRef::of(&pin)),
        });
        if status != "up to date" {
            next.isos.insert(name.clone(), pin);
        }
    }
    let changed = next.write(lock_path, locked)?;
    if out.json {
        println!(
            "{:#}",
            serde_json::json!({ "changed": changed, "lockfile": lock_path, "isos": report })
        );
        return Ok(0);
    }
    print_report(&report);
    out.info(&if changed {
        format!(
            "{}: updated; `nixgold plan` shows the new generations this asks for",
            lock_path.display()
        )
    } else {
        format!("{}: up to date", lock_path.display())
    });
    Ok(0)
}

/// One line (or three, for a move) per ISO, for people.
fn print_report(report: &[IsoUpdate]) {
    for r in report {
        match (r.status, &r.before, &r.after) {
            ("fixed", _, _) => println!(
                "iso.{}: pinned by the fleet (url + sha256): change the fleet file to move it",
                r.iso
            ),
            ("moved", Some(b), Some(a)) => println!(
                "iso.{}: moved\n    from {} (sha256 {})\n    to   {} (sha256 {})",
                r.iso, b.url, b.sha256, a.url, a.sha256
            ),
            (status, _, Some(a)) => {
                println!("iso.{}: {status}: {} (sha256 {})", r.iso, a.url, a.sha256)
            }
            (status, _, None) => println!("iso.{}: {status}", r.iso),
        }
    }
}

/// What `update` did to one ISO's pin.
#[derive(Debug, Serialize)]
struct IsoUpdate {
    iso: String,
    /// `pinned` (first time), `moved`, `up to date`, or `fixed` (by the fleet).
    status: &'static str,
    before: Option<PinRef>,
    after: Option<PinRef>,
}

#[derive(Debug, Serialize)]
struct PinRef {
    url: String,
    sha256: String,
}

impl PinRef {
    fn of(pin: &crate::lock::IsoPin) -> Self {
        PinRef {
            url: pin.url.clone(),
            sha256: pin.sha256.to_string(),
        }
    }
}
