//! "Deploy N VMs from one template" — nixgold against its peers (a parallel
//! proxmoxer script, Ansible's community.proxmox.proxmox_kvm) on the same
//! simulator, one after the other, each on a fresh cluster, with the lower
//! bound the simulator's own rules allow.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use pve_sim::{Credentials as SimCreds, SimOptions, Simulator};

use crate::{
    Nodes, TOKEN, apply_plan, cluster_on, fleet_yaml_on, lock_text_on, plan_for, realistic,
};

/// One tool's run: wall time, VMs deployed, failures by message.
struct Outcome {
    wall: f64,
    ok: usize,
    failures: Vec<(String, usize)>,
}

/// Where the peers' Python packages live: installed on first use. Unset
/// with `NIXGOLD_BENCH_PEERS=0` (nixgold's rows alone, for a quick look).
fn peers_venv() -> Result<PathBuf, String> {
    if std::env::var_os("NIXGOLD_BENCH_PEERS").is_some_and(|v| v == "0") {
        return Err("NIXGOLD_BENCH_PEERS=0".into());
    }
    let venv = std::env::var_os("NIXGOLD_PEERS_VENV").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/nixgold-peers"),
        PathBuf::from,
    );
    if venv.join("bin/ansible-playbook").exists() {
        return Ok(venv);
    }
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| e.to_string())?;
        out.status
            .success()
            .then_some(())
            .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
    };
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "-q",
        "ansible",
        "proxmoxer",
        "requests",
    ]))?;
    Ok(venv)
}

/// The lower bound of deploying `vms` VMs from one template on one storage
/// (on four nodes too: the template's disk is on a shared storage, which
/// every full clone's copy goes to), from the simulator's rules.
///
/// The least any tool can send per VM is five requests: the clone, one
/// read of its task's status, a synchronous config write (`PUT`, no
/// task), the start, one read of its status. Each is a round trip; the
/// API server's workers are busy only for the service time. Linked
/// clones hold the template's config lock shared, so they run side by
/// side, but the server takes the clone calls one service time per worker
/// at a time: the last one starts its task no earlier than that. Full
/// clones' copies share the storage's bandwidth, so they take one copy
/// time each, in a row. After the last clone: four round trips and the
/// start. Nothing can beat the server's total time for five requests per
/// VM either; the bound is the larger of the two.
fn lower_bound(opts: &SimOptions, vms: usize, full: bool) -> f64 {
    let t = |kind: &str| opts.task_duration(kind).as_secs_f64();
    let (latency, service) = (opts.latency.as_secs_f64(), opts.service_time.as_secs_f64());
    let per_worker = service / opts.workers as f64;
    let round_trip = 2.0 * latency + service;
    let clones = if full {
        service + vms as f64 * t("qmclone")
    } else {
        vms as f64 * per_worker + t("qmclone")
    };
    let chain = latency + clones + 4.0 * round_trip + t("qmstart");
    let server = 5.0 * vms as f64 * per_worker + 2.0 * latency;
    chain.max(server)
}

async fn fresh(nodes: Nodes) -> (Simulator, pve_sim::ServerHandle, tempfile::TempDir) {
    let sim = Simulator::new(
        cluster_on(0, &nodes),
        realistic(),
        SimCreds::token(TOKEN).unwrap(),
    );
    let handle = sim
        .serve_tls(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pem = &handle.certificate.as_ref().unwrap().pem;
    std::fs::write(dir.path().join("ca.pem"), pem).unwrap();
    (sim, handle, dir)
}

async fn nixgold(nodes: Nodes, vms: usize, full: bool) -> Outcome {
    let (_sim, handle, dir) = fresh(nodes).await;
    let mode = if full { "full" } else { "linked" };
    let fleet = fleet_yaml_on(vms, &nodes).replace("clone: linked", &format!("clone: {mode}"));
    std::fs::write(dir.path().join("fleet.yaml"), fleet).unwrap();
    let client = pve_api::Client::new(pve_api::ClientOptions::new(
        handle.url(),
        pve_api::Credentials::token(TOKEN).unwrap(),
        pve_api::Tls::CaFile(dir.path().join("ca.pem")),
    ))
    .unwrap();
    let t = Instant::now();
    let mut plan = plan_for(&client, &dir.path().join("fleet.yaml"), |f| {
        lock_text_on(f, &nodes)
    })
    .await;
    // The peers find the ISO in place; so does nixgold here.
    plan.changes
        .retain(|c| matches!(c.work, nixgold::plan::Work::CreateVm(_)));
    let report = apply_plan(&client, &plan).await;
    let wall = t.elapsed().as_secs_f64();
    let mut failures = Vec::new();
    for c in &report.changes {
        if let nixgold::apply::Outcome::Failed { error, .. } = &c.outcome {
            failures.push((error.clone(), 1));
        }
    }
    handle.shutdown().await;
    Outcome {
        wall,
        ok: report.changes.len() - failures.len(),
        failures,
    }
}

/// Runs a peer off the runtime's threads: the simulator it talks to runs
/// on them.
async fn output(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/bench/peers")
        .join(name)
}

async fn proxmoxer(venv: &Path, nodes: Nodes, vms: usize, full: bool, threads: usize) -> Outcome {
    let (_sim, handle, dir) = fresh(nodes).await;
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.arg(script("proxmoxer_deploy.py")).args([
        handle.url(),
        TOKEN.to_owned(),
        dir.path().join("ca.pem").display().to_string(),
        nodes.names().join(","),
        "9400".into(),
        "1000".into(),
        vms.to_string(),
        u8::from(full).to_string(),
        threads.to_string(),
    ]);
    let out = output(cmd).await;
    handle.shutdown().await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("proxmoxer script: {}", String::from_utf8_lossy(&out.stderr)));
    Outcome {
        wall: v["wall"].as_f64().unwrap(),
        ok: v["ok"].as_u64().unwrap() as usize,
        failures: v["failures"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, n)| (k.clone(), n.as_u64().unwrap() as usize))
            .collect(),
    }
}

async fn ansible(venv: &Path, nodes: Nodes, vms: usize, full: bool, forks: usize) -> Outcome {
    let (_sim, handle, dir) = fresh(nodes).await;
    let (token_id, secret) = TOKEN.rsplit_once('=').unwrap();
    let (user, token) = token_id.split_once('!').unwrap();
    let mut inventory = String::from("[vms]\n");
    for (i, vmid) in (1000..1000 + vms).enumerate() {
        let _ = writeln!(
            inventory,
            "vm-{vmid} newid={vmid} target_node={}",
            nodes.of_vm(i)
        );
    }
    let _ = write!(
        inventory,
        "[vms:vars]\nansible_connection=local\nansible_python_interpreter={}\npve_host=127.0.0.1\npve_port={}\n\
         pve_user={user}\npve_token_id={token}\npve_token_secret={secret}\npve_node={}\ntemplate_name=golden-g1\n\
         template_vmid=9400\nfull={full}\n",
        venv.join("bin/python").display(),
        handle.addr.port(),
        nodes.of_vm(0),
    );
    let inv = dir.path().join("inventory.ini");
    std::fs::write(&inv, inventory).unwrap();
    let t = Instant::now();
    let mut cmd = Command::new(venv.join("bin/ansible-playbook"));
    cmd.arg("-i")
        .arg(&inv)
        .args(["-f", &forks.to_string()])
        .arg(script("ansible_deploy.yml"))
        .env("REQUESTS_CA_BUNDLE", dir.path().join("ca.pem"))
        .env("ANSIBLE_STDOUT_CALLBACK", "ansible.posix.json")
        .env("ANSIBLE_LOCAL_TEMP", dir.path().join("tmp"));
    let out = output(cmd).await;
    let wall = t.elapsed().as_secs_f64();
    handle.shutdown().await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("ansible-playbook: {}", String::from_utf8_lossy(&out.stderr)));
    ansible_outcome(&v, wall)
}

/// Hosts without failures, and the failure messages of the others.
fn ansible_outcome(v: &serde_json::Value, wall: f64) -> Outcome {
    let ok = v["stats"].as_object().map_or(0, |s| {
        s.values()
            .filter(|h| h["failures"] == 0 && h["unreachable"] == 0)
            .count()
    });
    let mut failures: Vec<(String, usize)> = Vec::new();
    for task in v["plays"][0]["tasks"].as_array().into_iter().flatten() {
        for host in task["hosts"]
            .as_object()
            .into_iter()
            .flat_map(|h| h.values())
        {
            if host["failed"] == true {
                let msg = host["msg"].as_str().unwrap_or("failed").to_owned();
                match failures.iter_mut().find(|(m, _)| *m == msg) {
                    Some((_, n)) => *n += 1,
                    None => failures.push((msg, 1)),
                }
            }
        }
    }
    Outcome { wall, ok, failures }
}

fn row(md: &mut String, tool: &str, vms: usize, o: &Outcome, bound: f64) {
    let failures = o
        .failures
        .iter()
        .map(|(m, n)| {
            format!(
                "{n}× {}",
                m.lines()
                    .next()
                    .unwrap_or(m)
                    .chars()
                    .take(90)
                    .collect::<String>()
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let _ = writeln!(
        md,
        "| {tool} | {:.1} s | {}/{vms} | {:.2}× | {} |",
        o.wall,
        o.ok.min(vms),
        o.wall / bound,
        if failures.is_empty() {
            "—".into()
        } else {
            failures
        }
    );
}

/// The deploy benchmark, every workload and tool; only the linked-clone
/// rows with `linked_only` (a quick look: the full-clone rows take minutes).
pub async fn deploy(md: &mut String, linked_only: bool) {
    let _ = writeln!(
        md,
        "\n## Deploying VMs from one template, against peers\n\n\
         Per VM: clone the template, set cores/memory/cloud-init, start. Every tool runs against a fresh simulator \
         (HTTPS, the performance model above), one tool after the other: one node with the template on its local \
         storage, or four nodes with the template's disk on a shared rbd storage and the VMs spread over the nodes \
         in turn (a clone onto another node passes `target`). \
         The lower bound comes from the simulator's rules (`lower_bound` in `examples/bench/deploy.rs`): five \
         requests per VM at the least (clone, one task-status read, a synchronous config write, start, one \
         status read), each a round trip of 7 ms that holds one of the server's 4 workers for its 3 ms of \
         service; clones hold the template's config lock shared (qemu-server `clone_vm`), so linked clones run \
         side by side, the last starting once the server has taken every clone call; full clones' copies share \
         the storage's bandwidth (pve-storage locks only the allocation), so they take one copy time each, in a \
         row; then the start. The ratio is wall time over that bound. Peers: a proxmoxer script with 20 threads \
         (`examples/bench/peers/proxmoxer_deploy.py`, proxmoxer's own task wait, polling every 0.1 s) and Ansible \
         `community.proxmox.proxmox_kvm` (`examples/bench/peers/ansible_deploy.yml`), installed from PyPI into \
         `$NIXGOLD_PEERS_VENV` (default `~/.cache/nixgold-peers`) on first use. nixgold's time includes its plan; \
         it sends the five requests of the bound per VM, plus status reads of tasks still running and, for \
         each task type, one task whose status is read often until the first ends."
    );
    let venv = peers_venv();
    if let Err(e) = &venv {
        let _ = writeln!(
            md,
            "\nPeers not run: installing them failed ({}).",
            e.trim()
        );
    }
    let opts = realistic();
    for (nodes, vms, full) in [
        (Nodes::One, 20, false),
        (Nodes::One, 20, true),
        (Nodes::One, 100, false),
        (Nodes::One, 100, true),
        (Nodes::Four, 20, false),
        (Nodes::Four, 20, true),
        (Nodes::Four, 100, false),
        (Nodes::Four, 100, true),
    ] {
        if full && linked_only {
            continue;
        }
        let bound = lower_bound(&opts, vms, full);
        let _ = writeln!(
            md,
            "\n### {vms} VMs, {} clones, {} (lower bound {bound:.1} s)\n\n| tool | wall | deployed | ratio to bound | failures |\n| --- | ---: | ---: | ---: | --- |",
            if full { "full" } else { "linked" },
            match nodes {
                Nodes::One => "one node",
                Nodes::Four => "across 4 nodes (template on shared `ceph`)",
            }
        );
        row(
            md,
            "nixgold `apply` (defaults)",
            vms,
            &nixgold(nodes, vms, full).await,
            bound,
        );
        let Ok(venv) = &venv else { continue };
        row(
            md,
            "proxmoxer script, 20 threads",
            vms,
            &proxmoxer(venv, nodes, vms, full, 20).await,
            bound,
        );
        // Ansible's runs are long (forks 1: one VM after the other); they
        // are measured where the comparison says something new.
        if vms <= 20 || !full {
            let o = ansible(venv, nodes, vms, full, 20).await;
            row(md, "Ansible `proxmox_kvm`, forks 20", vms, &o, bound);
        }
        if vms <= 20 && !full && nodes == Nodes::One {
            let o = ansible(venv, nodes, vms, full, 1).await;
            row(md, "Ansible `proxmox_kvm`, forks 1", vms, &o, bound);
        }
    }
}
