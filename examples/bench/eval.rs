//! Fleet evaluation at scale: `validate` and `plan` of generated fleets of
//! 1,000 and 10,000 VMs, in YAML and in Nickel. Each runs in a child
//! process of its own (this program, `--measure OP FILE`), so its CPU time
//! and peak RSS are its own and not the benchmark's.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use nixgold::{fleet, lock};

use crate::{cluster, fleet_yaml, lock_text, plan_for, realistic, serve};

/// The machine, as the benchmark saw it.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            kb.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kb| kb / (1 << 20) as f64);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "Machine: {cores} cores, {mem:.0} GiB; load average at the start {} (other jobs shared the cores, so \
         wall times carry some noise).",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// The same fleet as [`fleet_yaml`], written in Nickel.
fn fleet_ncl(vms: usize) -> String {
    let mut s = format!(
        "{{\n  fleet = \"bench\",\n  proxmox = {{ endpoint = \"https://pve.invalid:8006\", nodes = [\"pve\"], token = {{ env = \"PROXMOX_VE_API_TOKEN\" }} }},\n  vm_vmid_range = {{ first = 10000, last = 19999 }},\n  isos.nixos = {{ url = \"https://x.invalid/nixos.iso\", checksum = \"sha256:{}\" }},\n  images.golden = {{ iso = \"nixos\", vmid_range = {{ first = 9400, last = 9409 }}, hardware = {{ disk = \"30G\", storage = \"tank\" }}, nixos.state_version = \"24.05\" }},\n  vms = {{\n",
        "ab".repeat(32)
    );
    for i in 0..vms {
        let _ = writeln!(
            s,
            "    \"vm-{i:04}\" = {{ image = \"golden\", clone = \"linked\" }},"
        );
    }
    s.push_str("  },\n}\n");
    s
}

/// Runs `op` on the fleet at `path` and prints its wall time, CPU time and
/// peak RSS as JSON: the child side of [`section`].
pub async fn measure(op: &str, path: &Path) {
    let t = Instant::now();
    let detail = match op {
        "validate" => {
            let loaded = fleet::load(path).unwrap();
            let lockfile =
                lock::Lockfile::parse(Path::new("nixgold.lock"), &lock_text(&loaded.fleet))
                    .unwrap();
            let problems = nixgold::validate::validate(&loaded, &lockfile);
            assert!(problems.is_empty(), "{problems:?}");
            format!("{} VMs valid", loaded.fleet.vms.len())
        }
        _ => {
            let (_sim, handle, client) = serve(cluster(0), realistic()).await;
            let plan = plan_for(&client, path, lock_text).await;
            handle.shutdown().await;
            format!("{} changes", plan.changes.len())
        }
    };
    let wall = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({ "wall": wall, "cpu": cpu_seconds(), "rss": peak_rss_mib(), "detail": detail })
    );
}

/// CPU time (user and system) of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // After the command name in parentheses: utime and stime are fields 14
    // and 15, in USER_HZ ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: f64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// Peak resident memory of this process so far, in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The evaluation benchmark: one row per fleet size, format and command.
pub fn section(md: &mut String) {
    let _ = writeln!(
        md,
        "## Fleet evaluation at scale\n\n\
         `validate` (load, contract, semantic checks) and `plan` (that, the desired graph, reading an empty \
         cluster, the plan) of a generated fleet, each in a fresh child process; CPU is user+system time, memory \
         the child's peak RSS (for `plan` it includes the in-process simulator). Targets: under 2 s CPU and \
         200 MiB at 10,000 VMs.\n\n\
         | VMs | fleet file | command | wall | CPU | peak RSS | result |\n| ---: | --- | --- | ---: | ---: | ---: | --- |"
    );
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    for vms in [1000, 10_000] {
        for (ext, text) in [("yaml", fleet_yaml(vms)), ("ncl", fleet_ncl(vms))] {
            let path = dir.path().join(format!("fleet-{vms}.{ext}"));
            std::fs::write(&path, text).unwrap();
            for op in ["validate", "plan"] {
                let out = Command::new(&exe)
                    .arg("--measure")
                    .arg(op)
                    .arg(&path)
                    .output()
                    .unwrap();
                let v: serde_json::Value =
                    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
                        panic!(
                            "{op} {}: {}",
                            path.display(),
                            String::from_utf8_lossy(&out.stderr)
                        )
                    });
                let _ = writeln!(
                    md,
                    "| {vms} | {ext} | `{op}` | {:.2} s | {:.2} s | {:.0} MiB | {} |",
                    v["wall"].as_f64().unwrap(),
                    v["cpu"].as_f64().unwrap(),
                    v["rss"].as_f64().unwrap(),
                    v["detail"].as_str().unwrap(),
                );
            }
        }
    }
    let _ = writeln!(
        md,
        "\nA valid fleet is evaluated by Nickel as it is and checked in Rust against the schema data \
         (`src/fleet/schema_check.rs`); only a fleet that check does not prove valid goes through the Nickel \
         contract, which explains the problems (line:column, field path, hint) and costs about 1 ms and 50 KiB per \
         VM.\n"
    );
}
