//! A no-op plan of 1,000 managed VMs against the simulator's performance
//! model, beside the server-bound limit: the API server's time for the
//! plan's calls (service time over its workers) plus one round trip.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use pve_sim::{Credentials as SimCreds, SimOptions, Simulator};

use crate::{
    TOKEN, apply_plan, cluster, fleet_yaml, lock_text, plan_for, realistic, with_internet,
};

/// Deploys `vms` VMs on a fast simulator that saves its state, then
/// serves that state with the realistic model and times a plan on it.
pub async fn section(md: &mut String, vms: usize) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sim.json");
    let fleet_path = dir.path().join("fleet.yaml");
    std::fs::write(&fleet_path, fleet_yaml(vms)).unwrap();
    let mut fast = SimOptions::fast(Duration::from_millis(1));
    fast.workers = 64;
    deploy(&state, &fleet_path, fast).await;

    let opts = realistic();
    let sim =
        Simulator::persistent(&state, cluster(0), with_internet(realistic()), creds()).unwrap();
    let handle = sim.serve(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    let client = client(&handle);
    let t = Instant::now();
    let plan = plan_for(&client, &fleet_path, lock_text).await;
    let wall = t.elapsed().as_secs_f64();
    assert!(plan.is_empty(), "the deployed fleet plans no change");
    handle.shutdown().await;
    let limit = plan.api_calls as f64 * opts.service_time.as_secs_f64() / opts.workers as f64
        + 2.0 * opts.latency.as_secs_f64();
    let _ = writeln!(
        md,
        "\n### A no-op plan of {vms} managed VMs\n\nThe fleet deployed, then planned again with the model above \
         (fleet loaded, cluster read, plan made). The server-bound limit is the API server's time for the plan's \
         calls, {} ms each over its {} workers, plus one round trip.\n\n\
         | managed VMs | API calls | wall | server-bound limit | ratio |\n| ---: | ---: | ---: | ---: | ---: |\n\
         | {vms} | {} | {wall:.2} s | {limit:.2} s | {:.2}× |",
        opts.service_time.as_millis(),
        opts.workers,
        plan.api_calls,
        wall / limit
    );
}

fn creds() -> SimCreds {
    SimCreds::token(TOKEN).unwrap()
}

fn client(handle: &pve_sim::ServerHandle) -> pve_api::Client {
    pve_api::Client::new(pve_api::ClientOptions::new(
        handle.url(),
        pve_api::Credentials::token(TOKEN).unwrap(),
        pve_api::Tls::System,
    ))
    .unwrap()
}

/// Applies the fleet at `fleet_path` to the simulator saved at `state`.
async fn deploy(state: &std::path::Path, fleet_path: &std::path::Path, opts: SimOptions) {
    let sim = Simulator::persistent(state, cluster(0), with_internet(opts), creds()).unwrap();
    let handle = sim.serve(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    let client = client(&handle);
    let plan = plan_for(&client, fleet_path, lock_text).await;
    let report = apply_plan(&client, &plan).await;
    assert!(report.succeeded(), "{report:?}");
    handle.shutdown().await;
}
