//! Fault injection, persistence across restarts, HTTPS, and scale.

mod common;

use std::time::{Duration, Instant};

use common::{TOKEN, default_sim, fast, start};
use pve_sim::cluster::VmSpec;
use pve_sim::{ClusterSpec, Credentials, FaultRule, Simulator};

fn rule(s: &str) -> FaultRule {
    s.parse().unwrap()
}

#[tokio::test]
async fn injected_status_codes_hit_the_chosen_calls_only_as_often_as_asked() {
    let s = default_sim().await;
    s.sim
        .options()
        .faults
        .add(rule("GET /cluster/resources => 596*2"));
    assert_eq!(s.get("/cluster/resources").await.status, 596);
    assert_eq!(
        s.get("/nodes").await.status,
        200,
        "other calls are not affected"
    );
    assert_eq!(s.get("/cluster/resources").await.status, 596);
    assert_eq!(s.get("/cluster/resources").await.status, 200);
    s.sim.options().faults.add(rule("* * => 595"));
    let r = s.get("/version").await;
    assert_eq!(r.status, 595);
    s.sim.options().faults.clear();
}

#[tokio::test]
async fn dropped_connections_get_no_answer() {
    let s = default_sim().await;
    s.sim.options().faults.add(rule("GET /nodes => drop*1"));
    let err = s
        .http
        .get(s.url("/nodes"))
        .header("Authorization", format!("PVEAPIToken={TOKEN}"))
        .send()
        .await
        .expect_err("the connection is closed without a response");
    assert!(
        err.is_request() || err.is_connect() || err.to_string().contains("connection"),
        "{err}"
    );
    assert_eq!(s.get("/nodes").await.status, 200);
}

#[tokio::test]
async fn slow_calls_are_slow() {
    let s = default_sim().await;
    s.sim
        .options()
        .faults
        .add(rule("GET /version => slow:300*1"));
    let t = Instant::now();
    assert_eq!(s.get("/version").await.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn tasks_can_be_made_to_fail_or_hang() {
    let s = default_sim().await;
    s.create_vm(100, &[]).await;
    s.sim.options().faults.add(rule(
        "POST /nodes/*/qemu/*/clone => task-fail:storage exploded*1",
    ));
    let exit = s
        .run("/nodes/pve/qemu/100/clone", &[("newid", "101")])
        .await;
    assert_eq!(exit, "clone failed: storage exploded");
    assert_eq!(
        s.get("/nodes/pve/qemu/101/config").await.status,
        500,
        "no half clone left"
    );
    s.sim
        .options()
        .faults
        .add(rule("POST /nodes/*/qemu/*/status/start => task-hang*1"));
    let r = s.post("/nodes/pve/qemu/100/status/start", &[]).await;
    let upid = r.data().as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = s
        .get(&format!(
            "/nodes/pve/tasks/{}/status",
            common::urlencode(&upid)
        ))
        .await;
    assert_eq!(st.data()["status"], "running");
    // Stopping the task ends it.
    let r = s
        .delete(&format!("/nodes/pve/tasks/{}", common::urlencode(&upid)))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(s.wait(&upid).await, "interrupted by signal");
}

#[tokio::test]
async fn lock_timeouts_and_a_silent_agent_can_be_injected() {
    let s = default_sim().await;
    s.create_vm(100, &[("agent", "1")]).await;
    s.sim
        .options()
        .faults
        .add(rule("PUT /nodes/*/qemu/*/config => lock-timeout*1"));
    let r = s.put("/nodes/pve/qemu/100/config", &[("cores", "3")]).await;
    assert_eq!(
        r.body["message"],
        "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout\n"
    );
    assert_eq!(
        s.put("/nodes/pve/qemu/100/config", &[("cores", "3")])
            .await
            .status,
        200
    );
    s.run("/nodes/pve/qemu/100/status/start", &[]).await;
    s.sim.options().faults.add(rule(
        "GET /nodes/*/qemu/*/agent/network-get-interfaces => agent-not-running*1",
    ));
    let r = s
        .get("/nodes/pve/qemu/100/agent/network-get-interfaces")
        .await;
    assert_eq!(r.body["message"], "QEMU guest agent is not running\n");
    let r = s
        .get("/nodes/pve/qemu/100/agent/network-get-interfaces")
        .await;
    let names: Vec<&str> = r.data()["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lo", "eth0"]);
}

#[tokio::test]
async fn faults_can_be_added_over_http() {
    let s = default_sim().await;
    let r = s
        .http
        .post(format!("{}/_sim/faults", s.handle.url()))
        .body("GET /nodes => 599*1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.get("/nodes").await.status, 599);
    let r = s
        .http
        .post(format!("{}/_sim/faults", s.handle.url()))
        .body("nonsense")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim.json");
    let creds = || Credentials::token(TOKEN).unwrap();
    {
        let sim = Simulator::persistent(&path, ClusterSpec::default(), fast(), creds()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handle = sim.serve(listener);
        let s = common::Sim {
            sim,
            handle,
            http: reqwest::Client::new(),
        };
        s.create_vm(100, &[("description", "keeper")]).await;
        s.handle.shutdown().await;
    }
    let sim = Simulator::persistent(&path, ClusterSpec::default(), fast(), creds()).unwrap();
    let name = sim.inspect(|st| st.vms[&100].config.values.get("description").cloned());
    assert_eq!(name.as_deref(), Some("keeper"));
    std::fs::write(&path, "{ not json").unwrap();
    let err = Simulator::persistent(&path, ClusterSpec::default(), fast(), creds())
        .err()
        .unwrap();
    assert!(err.to_string().contains("unreadable"), "{err}");
}

#[tokio::test]
async fn https_serves_a_certificate_whose_fingerprint_is_known() {
    let sim = Simulator::new(
        ClusterSpec::default(),
        fast(),
        Credentials::token(TOKEN).unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handle = sim.serve_tls(listener).unwrap();
    let cert = handle.certificate.clone().unwrap();
    assert_eq!(cert.fingerprint.split(':').count(), 32);
    let strict = reqwest::Client::builder().build().unwrap();
    let url = format!("{}/api2/json/version", handle.url());
    assert!(
        strict.get(&url).send().await.is_err(),
        "a self-signed certificate is not trusted by default"
    );
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let r = trusting
        .get(&url)
        .header("Authorization", format!("PVEAPIToken={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn ten_thousand_vms_on_32_nodes_are_listed_in_one_call() {
    let mut spec = ClusterSpec::with_nodes(32);
    spec.vms = (0..10_000u32)
        .map(|i| VmSpec {
            vmid: 1000 + i,
            node: format!("pve{}", i % 32 + 1),
            config: [
                ("name", format!("vm-{i}")),
                ("memory", "2048".to_owned()),
                ("tags", "bulk".to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            template: false,
            running: i % 2 == 0,
        })
        .collect();
    let s = start(spec, fast()).await;
    let r = s.get("/cluster/resources?type=vm").await;
    assert_eq!(r.data().as_array().unwrap().len(), 10_000);
    let r = s.get("/nodes/pve7/qemu").await;
    assert_eq!(r.data().as_array().unwrap().len(), 10_000 / 32 + 1);
    assert_eq!(s.get("/cluster/nextid").await.data(), "100");
}

#[tokio::test]
async fn clones_from_one_template_share_its_lock() {
    let mut opts = fast();
    opts.task_durations
        .insert("qmclone".into(), Duration::from_millis(400));
    opts.clone_lock_timeout = Duration::from_millis(100);
    let s = start(ClusterSpec::default(), opts).await;
    s.create_vm(100, &[]).await;
    s.run("/nodes/pve/qemu/100/template", &[]).await;
    let a = s
        .post("/nodes/pve/qemu/100/clone", &[("newid", "101")])
        .await;
    let b = s
        .post("/nodes/pve/qemu/100/clone", &[("newid", "102")])
        .await;
    assert_eq!(s.wait(a.data().as_str().unwrap()).await, "OK");
    assert_eq!(
        s.wait(b.data().as_str().unwrap()).await,
        "OK",
        "linked clones run side by side"
    );
}
