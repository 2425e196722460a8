//! The client against the simulator over real HTTP and HTTPS: token and
//! ticket auth, CA files and fingerprint pinning, every error class,
//! retries under injected 595/596 and dropped connections (reads only),
//! task waiting with a deadline, the in-flight bound, and every request the
//! client sent checked against the official schema.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pve_api::{
    ApiError, Client, ClientOptions, CloneRequest, ConfigUpdate, Credentials, Secret, Tls,
};
use pve_sim::{
    ClusterSpec, Credentials as SimCredentials, RemoteFile, ServerHandle, SimOptions, Simulator,
};

const TOKEN: &str = "root@pam!nixgold=5b0a2c1e-0d1f-4c6e-9a27-4f1f3e2d9c10";
const PASSWORD: &str = "battery staple";
/// A well-formed public key: the simulator checks keys as `ssh-keygen -l` would.
const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF4uCRRocy7VnWKg3xDEVQ9/84PtcagPU5KyqtjJnFsK";

struct Env {
    sim: Simulator,
    handle: ServerHandle,
}

async fn env_with(opts: SimOptions, tls: bool) -> Env {
    let creds = SimCredentials::token(TOKEN)
        .unwrap()
        .with_user("root@pam", PASSWORD);
    let sim = Simulator::new(ClusterSpec::default(), opts, creds);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handle = if tls {
        sim.serve_tls(listener).unwrap()
    } else {
        sim.serve(listener)
    };
    Env { sim, handle }
}

fn fast() -> SimOptions {
    let mut o = SimOptions::fast(Duration::from_millis(20));
    o.remote_files.insert(
        "https://example.org/nixos.iso".into(),
        RemoteFile {
            sha256: "d".repeat(64),
            size: 1 << 20,
        },
    );
    o
}

fn client(env: &Env, creds: Credentials, tls: Tls) -> Client {
    let mut o = ClientOptions::new(env.handle.url(), creds, tls);
    o.retry_base = Duration::from_millis(10);
    Client::new(o).unwrap()
}

fn token() -> Credentials {
    Credentials::token(TOKEN).unwrap()
}

fn config(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn create(c: &Client, vmid: u32) {
    let upid = c
        .create_vm(
            "pve",
            vmid,
            &config(&[
                ("name", "t"),
                ("memory", "2048"),
                ("scsi0", "tank:4"),
                ("net0", "virtio,bridge=vmbr0"),
            ]),
        )
        .await
        .unwrap();
    c.wait_task(&upid).await.unwrap();
}

#[tokio::test]
async fn token_and_ticket_auth_both_work_and_bad_ones_are_auth_errors() {
    let env = env_with(fast(), false).await;
    let c = client(&env, token(), Tls::System);
    assert_eq!(c.version().await.unwrap().release.as_deref(), Some("9.1"));
    create(&c, 100).await;
    let t = client(
        &env,
        Credentials::Password {
            username: "root@pam".into(),
            password: Secret::new(PASSWORD),
        },
        Tls::System,
    );
    // A write with a ticket needs the CSRF token: the client sends it.
    let upd = ConfigUpdate {
        set: config(&[("cores", "3")]),
        ..Default::default()
    };
    t.update_config_sync("pve", 100, &upd).await.unwrap();
    assert_eq!(
        t.vm_config("pve", 100, false).await.unwrap().get("cores"),
        Some("3")
    );
    let bad = client(
        &env,
        Credentials::token("root@pam!nixgold=wrong").unwrap(),
        Tls::System,
    );
    let e = bad.version().await.unwrap_err();
    assert!(matches!(e, ApiError::Auth { status: 401, .. }), "{e:?}");
    let bad_pw = client(
        &env,
        Credentials::Password {
            username: "root@pam".into(),
            password: Secret::new("nope"),
        },
        Tls::System,
    );
    let e = bad_pw.version().await.unwrap_err();
    assert!(
        matches!(&e, ApiError::Auth { message, .. } if message == "authentication failure"),
        "{e:?}"
    );
    assert!(
        !format!("{e:?}{e}").contains("nope"),
        "the password leaked into the error"
    );
}

#[tokio::test]
async fn https_with_a_ca_file_or_the_right_fingerprint_and_not_otherwise() {
    let env = env_with(fast(), true).await;
    let cert = env.handle.certificate.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert.pem).unwrap();
    let by_ca = client(&env, token(), Tls::CaFile(ca));
    assert!(by_ca.version().await.is_ok());
    let pinned = client(&env, token(), Tls::fingerprint(&cert.fingerprint).unwrap());
    assert!(pinned.version().await.is_ok());
    let wrong = client(&env, token(), Tls::Fingerprint([7; 32]));
    let e = wrong.version().await.unwrap_err();
    assert!(e.to_string().contains("does not match the pinned"), "{e}");
    let system = client(&env, token(), Tls::System);
    assert!(
        system.version().await.is_err(),
        "a self-signed certificate is refused by default"
    );
    let insecure = client(&env, token(), Tls::Insecure);
    assert!(insecure.version().await.is_ok());
    let missing = ClientOptions::new(
        env.handle.url(),
        token(),
        Tls::CaFile(PathBuf::from("/nonexistent.pem")),
    );
    assert!(matches!(Client::new(missing), Err(ApiError::Config { .. })));
}

#[tokio::test]
async fn each_error_class_is_recognised() {
    let mut opts = fast();
    opts.task_durations
        .insert("qmstart".into(), Duration::from_millis(1500));
    opts.vm_lock_timeout = Duration::from_millis(100);
    let env = env_with(opts, false).await;
    let c = client(&env, token(), Tls::System);
    let e = c.vm_config("pve", 4242, false).await.unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    let e = c.create_vm("pve", 99, &BTreeMap::new()).await.unwrap_err();
    assert!(
        matches!(&e, ApiError::Params { errors, .. } if errors["vmid"] == "value must have a minimum value of 100"),
        "{e:?}"
    );
    create(&c, 100).await;
    let digest = c.vm_config("pve", 100, false).await.unwrap().digest;
    let one = ConfigUpdate {
        set: config(&[("cores", "3")]),
        delete: vec![],
        digest: Some(digest.clone()),
    };
    c.update_config_sync("pve", 100, &one).await.unwrap();
    let e = c.update_config_sync("pve", 100, &one).await.unwrap_err();
    assert!(
        matches!(e, ApiError::Conflict { .. }),
        "a stale digest is a conflict: {e:?}"
    );
    // Lock contention: a long start holds the VM lock.
    let start = c.start("pve", 100).await.unwrap();
    let e = c
        .update_config_sync(
            "pve",
            100,
            &ConfigUpdate {
                set: config(&[("cores", "2")]),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(e.is_lock_contention(), "{e:?}");
    c.wait_task(&start).await.unwrap();
    // A task failing inside: starting it again.
    let again = c.start("pve", 100).await.unwrap();
    let e = c.wait_task(&again).await.unwrap_err();
    match e {
        ApiError::Task {
            exitstatus,
            log_tail,
            ..
        } => {
            assert_eq!(exitstatus, "VM 100 already running");
            assert_eq!(
                log_tail.last().map(String::as_str),
                Some("TASK ERROR: VM 100 already running")
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn reads_retry_transport_failures_and_writes_do_not() {
    let env = env_with(fast(), false).await;
    let c = client(&env, token(), Tls::System);
    let faults = &env.sim.options().faults;
    faults.add("GET /cluster/resources => 596*2".parse().unwrap());
    let before = c.calls();
    assert!(c.cluster_resources(Some("vm")).await.is_ok());
    assert_eq!(c.calls() - before, 3, "two failures, then success");
    faults.add("GET /nodes => drop*1".parse().unwrap());
    assert!(
        c.nodes().await.is_ok(),
        "a dropped connection is retried for a read"
    );
    faults.add("GET /version => 595*9".parse().unwrap());
    let e = c.version().await.unwrap_err();
    assert!(
        matches!(
            e,
            ApiError::Transport {
                status: Some(595),
                ..
            }
        ),
        "gives up after its attempts: {e:?}"
    );
    faults.clear();
    faults.add("POST /nodes/*/qemu => 599*1".parse().unwrap());
    let before = c.calls();
    let e = c.create_vm("pve", 100, &BTreeMap::new()).await.unwrap_err();
    assert!(e.is_transport());
    assert_eq!(c.calls() - before, 1, "a write is never retried blindly");
}

#[tokio::test]
async fn waiting_on_a_task_honours_the_callers_deadline() {
    let env = env_with(fast(), false).await;
    let c = client(&env, token(), Tls::System);
    create(&c, 100).await;
    env.sim.options().faults.add(
        "POST /nodes/*/qemu/*/status/start => task-hang*1"
            .parse()
            .unwrap(),
    );
    let upid = c.start("pve", 100).await.unwrap();
    let e = c
        .wait_task_for(&upid, Duration::from_millis(400))
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::TaskTimeout { .. }), "{e:?}");
}

#[tokio::test]
async fn the_in_flight_bound_limits_concurrency_not_throughput() {
    let mut opts = fast();
    opts.service_time = Duration::from_millis(50);
    opts.workers = 64;
    let env = env_with(opts, false).await;
    let mut o = ClientOptions::new(env.handle.url(), token(), Tls::System);
    o.max_in_flight = 4;
    let c = Client::new(o).unwrap();
    let t = std::time::Instant::now();
    let calls: Vec<_> = (0..16).map(|_| c.version()).collect();
    for r in futures_join(calls).await {
        r.unwrap();
    }
    // 16 calls, 4 at a time, 50 ms each: about 200 ms, never 50 (unbounded)
    // and never 800 (serial).
    let elapsed = t.elapsed();
    assert!(elapsed >= Duration::from_millis(190), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(700), "{elapsed:?}");
}

/// Drives futures concurrently on one task (no extra dependency for a join).
async fn futures_join<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut pending: Vec<_> = futs.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().map(|r| r.unwrap()).collect()
}

/// Runs every client method once against the simulator.
async fn exercise_every_method(c: &Client) {
    let _ = c.version().await.unwrap();
    let _ = c.cluster_resources(None).await.unwrap();
    let _ = c.cluster_resources(Some("storage")).await.unwrap();
    let _ = c.next_id().await.unwrap();
    let _ = c.nodes().await.unwrap();
    let _ = c.storages("pve", Some("iso")).await.unwrap();
    let up = c
        .download_url(
            "pve",
            "local",
            "https://example.org/nixos.iso",
            "nixos.iso",
            &"d".repeat(64),
        )
        .await
        .unwrap();
    c.wait_task(&up).await.unwrap();
    let _ = c
        .storage_content("pve", "local", Some("iso"), None)
        .await
        .unwrap();
    let up = c
        .create_vm(
            "pve",
            100,
            &config(&[
                ("name", "t"),
                ("memory", "2048"),
                ("scsi0", "tank:4"),
                ("ide2", "tank:cloudinit"),
                ("net0", "virtio,bridge=vmbr0"),
                ("agent", "1"),
                ("boot", "order=scsi0"),
            ]),
        )
        .await
        .unwrap();
    c.wait_task(&up).await.unwrap();
    let _ = c
        .storage_content("pve", "tank", None, Some(100))
        .await
        .unwrap();
    let cfg = c.vm_config("pve", 100, true).await.unwrap();
    let upd = ConfigUpdate {
        set: config(&[
            ("ciuser", "ops"),
            (
                "sshkeys",
                &pve_api::property::encode_sshkeys([format!("{SSH_KEY} ops@x").as_str()]),
            ),
            ("ipconfig0", "ip=10.0.0.5/24,gw=10.0.0.1"),
            ("nameserver", "1.1.1.1"),
            ("tags", "nixgold;web"),
            ("onboot", "1"),
        ]),
        delete: vec!["boot".into()],
        digest: Some(cfg.digest),
    };
    c.wait_task(&c.update_config("pve", 100, &upd).await.unwrap())
        .await
        .unwrap();
    c.update_config_sync(
        "pve",
        100,
        &ConfigUpdate {
            set: config(&[("description", "x")]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let _ = c.pending("pve", 100).await.unwrap();
    if let Some(up) = c.resize("pve", 100, "scsi0", "+1G", None).await.unwrap() {
        c.wait_task(&up).await.unwrap();
    }
    c.wait_task(&c.start("pve", 100).await.unwrap())
        .await
        .unwrap();
    let _ = c.vm_status("pve", 100).await.unwrap();
    c.sendkey("pve", 100, "shift-a").await.unwrap();
    let _ = c.agent_interfaces("pve", 100).await.unwrap();
    c.agent_ping("pve", 100).await.unwrap();
    // The command goes as a repeated key; a VM without a guest model
    // (no installer, no installed system) has nothing to run it.
    let command = ["sh", "-c", "true"].map(str::to_owned);
    let exit = c
        .agent_run("pve", 100, &command, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(exit.code, 127, "{exit:?}");
    assert!(exit.err.contains("no guest model"), "{exit:?}");
    c.regenerate_cloudinit("pve", 100).await.unwrap();
    let _ = c.cloudinit_dump("pve", 100, "user").await.unwrap();
    c.wait_task(&c.shutdown("pve", 100, 30, true).await.unwrap())
        .await
        .unwrap();
    c.wait_task(&c.stop("pve", 100).await.unwrap())
        .await
        .unwrap();
    c.wait_task(&c.template("pve", 100).await.unwrap())
        .await
        .unwrap();
    let clone = CloneRequest {
        newid: 101,
        name: Some("web".into()),
        full: false,
        storage: None,
        target: None,
        description: Some("clone".into()),
        pool: None,
    };
    let up = c.clone_vm("pve", 100, &clone).await.unwrap();
    c.wait_task(&up).await.unwrap();
    let (log, total) = c.task_log(&up, 0, 0).await.unwrap();
    assert_eq!(log.len() as u64, total);
    c.wait_task(&c.destroy("pve", 101, true, true).await.unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn every_request_the_client_sends_is_in_the_schema() {
    let env = env_with(fast(), false).await;
    let c = client(&env, token(), Tls::System);
    exercise_every_method(&c).await;
    let journal = env.sim.journal();
    assert!(journal.len() >= 30);
    let dir = std::env::var_os("NIXGOLD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    let Ok(text) = std::fs::read_to_string(dir.join("pve-api/apidoc.json")) else {
        eprintln!(
            "SKIPPED schema check: {} has no pve-api/apidoc.json",
            dir.display()
        );
        return;
    };
    let roots: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut index = BTreeMap::new();
    fn walk(n: &serde_json::Value, index: &mut BTreeMap<String, serde_json::Value>) {
        index.insert(n["path"].as_str().unwrap().to_owned(), n.clone());
        for ch in n["children"].as_array().into_iter().flatten() {
            walk(ch, index);
        }
    }
    roots.iter().for_each(|r| walk(r, &mut index));
    for entry in journal {
        let here = format!("{} {}", entry.method, entry.route);
        let info = &index
            .get(entry.route)
            .unwrap_or_else(|| panic!("{here}: path not in schema"))["info"][&entry.method];
        assert!(info.is_object(), "{here}: method not in schema");
        let empty = serde_json::Map::new();
        let props = info["parameters"]["properties"]
            .as_object()
            .unwrap_or(&empty);
        for (name, value) in &entry.params {
            let schema_name = indexed(name);
            let p = props
                .get(name)
                .or_else(|| props.get(&schema_name))
                .unwrap_or_else(|| panic!("{here}: parameter {name} is not in the schema"));
            match p["type"].as_str() {
                Some("integer") => assert!(
                    value.parse::<i64>().is_ok(),
                    "{here}: {name}={value} is not an integer"
                ),
                Some("boolean") => assert!(
                    value == "0" || value == "1",
                    "{here}: {name}={value} is not 0/1"
                ),
                Some("number") => assert!(value.parse::<f64>().is_ok(), "{here}: {name}={value}"),
                _ => {}
            }
            // A repeated key (joined with NUL on arrival) is how an array
            // travels; anything else must come once.
            assert!(
                !value.contains('\0') || p["type"] == "array",
                "{here}: {name} is repeated but not an array"
            );
            if let Some(values) = p["enum"].as_array() {
                assert!(
                    values.iter().any(|v| v == value),
                    "{here}: {name}={value} not in its enum"
                );
            }
        }
    }
}

/// `net0` → `net[n]`, as the schema names indexed keys.
fn indexed(name: &str) -> String {
    let base = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if base.len() < name.len() {
        format!("{base}[n]")
    } else {
        name.to_owned()
    }
}

#[tokio::test]
async fn simulator_answers_decode_like_the_recorded_ones() {
    let env = env_with(fast(), false).await;
    let c = client(&env, token(), Tls::System);
    exercise_every_method(&c).await;
    // The same fields the recorded PVE 8/9 answers carry are populated.
    let vm = c.cluster_resources(Some("vm")).await.unwrap();
    let r = &vm[0];
    assert!(
        r.vmid.is_some()
            && r.node.is_some()
            && r.status.is_some()
            && r.name.is_some()
            && r.maxmem.is_some()
    );
    let cfg = c.vm_config("pve", 100, false).await.unwrap();
    assert_eq!(cfg.memory_mib(), Some(2048));
    assert_eq!(cfg.digest.len(), 40);
    assert!(cfg.is_template());
    let status = c.vm_status("pve", 100).await.unwrap();
    assert!(status.template && !status.is_running());
}

#[tokio::test]
async fn tickets_are_renewed_with_the_current_ticket_before_they_expire() {
    let env = env_with(fast(), false).await;
    let mut o = ClientOptions::new(
        env.handle.url(),
        Credentials::Password {
            username: "root@pam".into(),
            password: Secret::new(PASSWORD),
        },
        Tls::System,
    );
    o.ticket_renew_after = Duration::from_millis(50);
    let c = Client::new(o).unwrap();
    c.version().await.unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    c.version().await.unwrap();
    let logins: Vec<String> = env
        .sim
        .journal()
        .into_iter()
        .filter(|e| e.route == "/access/ticket" && e.method == "POST")
        .map(|e| e.params["password"].clone())
        .collect();
    assert_eq!(logins.len(), 2, "a login, then one renewal");
    assert_eq!(logins[0], PASSWORD);
    assert!(
        logins[1].starts_with("PVE:root@pam:"),
        "renewed with the ticket, not the password"
    );
}

/// A token without privileges: every check fails with pve-common's 403
/// "Permission check failed (/vms/100, VM.Audit)", which the client reports
/// as a permission error naming the path and the privilege, and does not
/// retry. `/access/permissions` answers what the token holds (nothing).
#[tokio::test]
async fn a_missing_privilege_is_a_permission_error_and_not_retried() {
    const NOBODY: &str = "ops@pve!ro=2c9d1f0e-7a31-4c55-8f0b-0b6c1d2e3f40";
    let sim = Simulator::new(
        ClusterSpec::default(),
        fast(),
        SimCredentials::token(NOBODY).unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let env = Env {
        handle: sim.serve(listener),
        sim,
    };
    let c = client(&env, Credentials::token(NOBODY).unwrap(), Tls::Insecure);
    let e = c.vm_config("pve", 100, false).await.unwrap_err();
    assert_eq!(
        e,
        ApiError::Permission {
            path: "/vms/100".into(),
            privilege: "VM.Audit".into()
        }
    );
    assert!(e.to_string().contains("pveum acl modify /vms/100"), "{e}");
    assert_eq!(env.sim.journal().len(), 1, "not retried");
    assert!(c.permissions("/vms/100").await.unwrap().is_empty());
    assert_eq!(c.auth_id(), "ops@pve!ro");
}
