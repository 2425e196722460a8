//! Benchmarks for BENCHMARKS.md: API calls per plan, fleet evaluation
//! (validate and plan) at 1,000 and 10,000 VMs, deploying VMs on one node
//! and across four against peers (Ansible, a proxmoxer script) and the
//! lower bound, and where a template build spends its time — all against
//! the simulator on 127.0.0.1 with its latency/worker model on.
//!
//!     cargo run --release --example bench -- BENCHMARKS.md
//!     cargo run --release --example bench -- - eval deploy
//!
//! Rewrites the given file (or prints to stdout for `-` or no argument);
//! names after it pick sections (`calls`, `eval`, `deploy`, `build`;
//! `deploy-linked` is `deploy` without its long full-clone rows).

mod deploy;
mod eval;
mod noop;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use nixgold::apply::{ApplyOptions, apply};
use nixgold::plan::PlanOptions;
use nixgold::{desired, fleet, live, lock, plan};
use pve_api::{Client, ClientOptions, Credentials, Tls};
use pve_sim::cluster::VmSpec;
use pve_sim::{ClusterSpec, Credentials as SimCreds, SimOptions, Simulator};

const TOKEN: &str = "root@pam!bench=bench-secret";

fn fleet_yaml(vms: usize) -> String {
    fleet_yaml_on(vms, &Nodes::One)
}

/// Where a benchmark's cluster puts its template and VMs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Nodes {
    /// Node `pve`, the template's disk on local storage `tank`.
    One,
    /// Nodes `pve1`…`pve4`, the template on `pve1` with its disk on the
    /// shared (rbd) storage `ceph`; VMs go to the nodes in turn.
    Four,
}

impl Nodes {
    fn names(self) -> Vec<String> {
        match self {
            Nodes::One => vec!["pve".into()],
            Nodes::Four => (1..=4).map(|i| format!("pve{i}")).collect(),
        }
    }

    fn storage(self) -> &'static str {
        match self {
            Nodes::One => "tank",
            Nodes::Four => "ceph",
        }
    }

    /// The node of the `i`th VM.
    fn of_vm(self, i: usize) -> String {
        let names = self.names();
        names[i % names.len()].clone()
    }
}

fn fleet_yaml_on(vms: usize, nodes: &Nodes) -> String {
    let names = nodes.names();
    let shared = if *nodes == Nodes::Four {
        "[ceph]"
    } else {
        "[]"
    };
    let mut s = format!(
        "fleet: bench\nproxmox:\n  endpoint: https://pve.invalid:8006\n  nodes: [{}]\n  shared_storages: {shared}\n  token: {{ env: PROXMOX_VE_API_TOKEN }}\nvm_vmid_range: {{ first: 10000, last: 19999 }}\nisos:\n  nixos: {{ url: \"https://x.invalid/nixos.iso\", checksum: \"sha256:{}\" }}\nimages:\n  golden:\n    iso: nixos\n    vmid_range: {{ first: 9400, last: 9409 }}\n    hardware: {{ disk: 30G, storage: {} }}\n    nixos: {{ state_version: \"24.05\" }}\nvms:\n",
        names.join(", "),
        "ab".repeat(32),
        nodes.storage(),
    );
    for i in 0..vms {
        let node = if *nodes == Nodes::One {
            String::new()
        } else {
            format!(", node: {}", nodes.of_vm(i))
        };
        let _ = writeln!(s, "  vm-{i:04}: {{ image: golden, clone: linked{node} }}");
    }
    s
}

/// The lockfile of a built generation 1, with the image's real input hash.
fn lock_text(fleet: &fleet::Fleet) -> String {
    lock_text_on(fleet, &Nodes::One)
}

fn lock_text_on(fleet: &fleet::Fleet, nodes: &Nodes) -> String {
    let sha = "ab".repeat(32);
    let iso: nixgold::ids::Sha256 = sha.parse().unwrap();
    let inputs = desired::input_hash("golden", &fleet.images["golden"], Some(&iso));
    format!(
        "version = 1\nfleet = \"bench\"\n\n[image.golden]\ncurrent = 1\n\n[[image.golden.generation]]\nnumber = 1\ninput_hash = \"{inputs}\"\niso_sha256 = \"{sha}\"\nbuilt_at = \"x\"\nnixos_version = \"24.05\"\nsystem_path = \"/nix/store/x\"\ntemplates = [{{ node = \"{}\", vmid = 9400 }}]\n",
        nodes.of_vm(0)
    )
}

fn cluster(unmanaged: usize) -> ClusterSpec {
    cluster_on(unmanaged, &Nodes::One)
}

fn cluster_on(unmanaged: usize, nodes: &Nodes) -> ClusterSpec {
    let mut spec = match nodes {
        Nodes::One => ClusterSpec::default(),
        Nodes::Four => ClusterSpec::with_nodes(4),
    };
    let template_node = nodes.of_vm(0);
    let disk = format!("{}:30", nodes.storage());
    // Room for a hundred full clones of a 30 GiB template.
    for storage in &mut spec.storages {
        storage.capacity = storage.capacity.max(8 << 40);
    }
    let mut config: std::collections::BTreeMap<String, String> = [
        ("name", "golden-g1"),
        ("memory", "2048"),
        ("scsi0", disk.as_str()),
        ("net0", "virtio,bridge=vmbr0"),
        (
            "description",
            "nixgold: fleet=bench resource=image.golden generation=1",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    spec.vms.push(VmSpec {
        vmid: 9400,
        node: template_node.clone(),
        config: config.clone(),
        template: true,
        running: false,
    });
    config.clear();
    spec.vms.extend((0..unmanaged).map(|i| VmSpec {
        vmid: 50_000 + i as u32,
        node: template_node.clone(),
        config: config.clone(),
        template: false,
        running: true,
    }));
    spec
}

struct Run {
    sim: Simulator,
    handle: pve_sim::ServerHandle,
    client: Client,
    dir: tempfile::TempDir,
}

/// `opts` with an internet that serves the bench ISO.
fn with_internet(mut opts: SimOptions) -> SimOptions {
    opts.remote_files.insert(
        "https://x.invalid/nixos.iso".into(),
        pve_sim::RemoteFile {
            sha256: "ab".repeat(32),
            size: 1 << 30,
        },
    );
    opts
}

/// A simulator of `spec` whose internet serves the bench ISO, and a client.
async fn serve(spec: ClusterSpec, opts: SimOptions) -> (Simulator, pve_sim::ServerHandle, Client) {
    let opts = with_internet(opts);
    let sim = Simulator::new(spec, opts, SimCreds::token(TOKEN).unwrap());
    let handle = sim.serve(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    let client = Client::new(ClientOptions::new(
        handle.url(),
        Credentials::token(TOKEN).unwrap(),
        Tls::System,
    ))
    .unwrap();
    (sim, handle, client)
}

async fn setup(vms: usize, unmanaged: usize, opts: SimOptions) -> Run {
    let (sim, handle, client) = serve(cluster(unmanaged), opts).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fleet.yaml"), fleet_yaml(vms)).unwrap();
    Run {
        sim,
        handle,
        client,
        dir,
    }
}

/// Applies `plan` with apply's defaults, recording nothing.
async fn apply_plan(client: &Client, plan: &plan::Plan) -> nixgold::apply::Report {
    apply(
        client,
        plan,
        ApplyOptions::default(),
        tokio::sync::mpsc::unbounded_channel().0,
        &mut nixgold::apply::Unrecorded,
    )
    .await
}

async fn plan_once(run: &Run) -> (plan::Plan, Duration) {
    let t = Instant::now();
    let p = plan_for(&run.client, &run.dir.path().join("fleet.yaml"), lock_text).await;
    (p, t.elapsed())
}

/// Loads the fleet, takes the lockfile `lock` writes for it, reads the
/// cluster and plans.
async fn plan_for(
    client: &Client,
    fleet_path: &std::path::Path,
    lock: impl FnOnce(&fleet::Fleet) -> String,
) -> plan::Plan {
    let loaded = fleet::load(fleet_path).unwrap();
    let lockfile =
        lock::Lockfile::parse(std::path::Path::new("nixgold.lock"), &lock(&loaded.fleet)).unwrap();
    let graph = desired::build(&loaded.fleet, &lockfile).unwrap();
    let state = live::collect(client, &graph, "bench", live::READ_CONCURRENCY)
        .await
        .unwrap();
    plan::plan(
        &loaded.fleet,
        &graph,
        &state,
        &graph.lock.render(),
        &PlanOptions::default(),
    )
    .unwrap()
}

fn realistic() -> SimOptions {
    SimOptions {
        latency: Duration::from_millis(2),
        service_time: Duration::from_millis(3),
        workers: 4,
        resources_lag: Duration::ZERO,
        agent_delay: Duration::ZERO,
        ..SimOptions::default()
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some("--measure") {
        let (op, path) = (args.next().unwrap(), args.next().unwrap());
        eval::measure(&op, std::path::Path::new(&path)).await;
        return;
    }
    let out_path = first.filter(|p| p != "-");
    let sections: Vec<String> = args.collect();
    let wants = |s: &str| sections.is_empty() || sections.iter().any(|x| x == s);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Benchmarks\n\nGenerated by `cargo run --release --example bench -- BENCHMARKS.md` (do not edit by hand; \
         `-- - deploy` prints one section). All figures are against the in-tree simulator on 127.0.0.1 with its \
         performance model on: 2 ms one-way latency, 4 server workers, 3 ms service time per request (a worker \
         is busy for that time only, not while the request and its answer are on the wire), Proxmox-like \
         task durations (clone 1.5 s, config 0.1 s, start 0.8 s), clones of a template under its shared lock. \
         {}\n",
        eval::machine()
    );
    if wants("calls") {
        api_calls(&mut md).await;
    }
    if wants("eval") {
        eval::section(&mut md);
    }
    if wants("deploy") || wants("deploy-linked") {
        deploy::deploy(&mut md, !wants("deploy")).await;
    }
    if wants("build") {
        build_steps(&mut md).await;
    }
    match out_path {
        Some(path) => std::fs::write(&path, &md).unwrap(),
        None => print!("{md}"),
    }
}

/// API calls per plan do not depend on unmanaged VMs.
async fn api_calls(md: &mut String) {
    let _ = writeln!(
        md,
        "## API calls per plan\n\n| managed VMs (existing) | unmanaged VMs | API calls |\n| ---: | ---: | ---: |"
    );
    for (vms, unmanaged) in [(10, 0), (10, 1000), (100, 0), (100, 5000)] {
        let mut opts = SimOptions::fast(Duration::from_millis(1));
        opts.workers = 64;
        let run = setup(vms, unmanaged, opts).await;
        let (p, _) = plan_once(&run).await;
        apply_plan(&run.client, &p).await;
        let (p2, _) = plan_once(&run).await;
        assert!(p2.is_empty(), "converged");
        let _ = writeln!(md, "| {vms} | {unmanaged} | {} |", p2.api_calls);
        run.handle.shutdown().await;
        drop(run.sim);
    }
    let _ = writeln!(
        md,
        "\nOne `resources?type=vm`, one `?type=storage`, one ISO listing, then a config read per managed VM \
         (and the template; running state comes from the listing), and one disk listing per storage holding a managed \
         VM's disk (to tell linked clones): managed+1+3+1 here. Unmanaged VMs cost nothing."
    );
    noop::section(md, 1000).await;
}

/// One build of generation 1 from an empty cluster, step by step, with the
/// simulator's guest on its default timings (installer console after 8 s,
/// guest agent 3 s after boot) and `boot_wait` 10 s.
async fn build_steps(md: &mut String) {
    let dir = tempfile::tempdir().unwrap();
    let fleet_path = dir.path().join("fleet.yaml");
    let text = fleet_yaml(1).replace(
        "    nixos: { state_version: \"24.05\" }\n",
        "    nixos: { state_version: \"24.05\" }\n    build: { address: { call_home: { listen: \"127.0.0.1:0\", advertise: \"127.0.0.1\" } } }\n",
    );
    std::fs::write(&fleet_path, text).unwrap();
    let opts = SimOptions {
        agent_delay: SimOptions::default().agent_delay,
        ..realistic()
    };
    let (_sim, handle, client) = serve(ClusterSpec::default(), opts).await;
    let mut p = plan_for(&client, &fleet_path, |_| {
        "version = 1\nfleet = \"bench\"\n".to_owned()
    })
    .await;
    p.changes.retain(|c| {
        matches!(
            c.work,
            plan::Work::BuildTemplate { .. } | plan::Work::DownloadIso { .. }
        )
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let report = apply(
        &client,
        &p,
        ApplyOptions::default(),
        tx,
        &mut nixgold::apply::Unrecorded,
    )
    .await;
    assert!(report.succeeded(), "{report:?}");
    let _ = writeln!(
        md,
        "\n## Where a template build spends its time\n\nGeneration 1 from an empty cluster on the simulated guest \
         (installer console after 8 s, guest agent 3 s after boot, `boot_wait` 10 s, 20 ms between typed keys), \
         after the ISO download. Each step is a step of apply with its own deadline.\n\n\
         | step | time |\n| --- | ---: |"
    );
    let mut total = 0.0;
    while let Ok(event) = rx.try_recv() {
        if let nixgold::apply::Event::Finished {
            address,
            step,
            elapsed,
        } = event
            && address.starts_with("image.")
        {
            let step = step
                .split_once(": ")
                .map_or(step.as_str(), |(_, s)| s)
                .to_owned();
            total += elapsed.as_secs_f64();
            let _ = writeln!(md, "| {step} | {:.1} s |", elapsed.as_secs_f64());
        }
    }
    let _ = writeln!(
        md,
        "| **total** | **{total:.1} s** |\n\nThe access step is `boot_wait` plus typing the sequence key by key \
         (one `sendkey` call each); the reboot step waits for the installed system's guest agent. On a real host \
         the install step (downloading and building the system) dominates."
    );
    handle.shutdown().await;
}
