//! Proxmox semantics: tasks and their logs, digests, pending values,
//! canonical forms, locks and their timeouts, clones and templates,
//! storage capacity and downloads.

mod common;

use std::time::Duration;

use common::{Reply, SSH_KEY, default_sim, fast, start, urlencode};
use pve_sim::cluster::StorageSpec;
use pve_sim::{ClusterSpec, RemoteFile, SimOptions};
use serde_json::Value;

fn upid_fields(upid: &str) -> Vec<&str> {
    upid.split(':').collect()
}

#[tokio::test]
async fn upids_have_the_real_format_and_tasks_log_to_task_ok() {
    let s = default_sim().await;
    let r = s
        .post("/nodes/pve/qemu", &[("vmid", "100"), ("memory", "512")])
        .await;
    let upid = r.data().as_str().unwrap().to_owned();
    let f = upid_fields(&upid);
    assert_eq!(f.len(), 9, "{upid}");
    assert_eq!(
        (f[0], f[1], f[5], f[6], f[7], f[8]),
        ("UPID", "pve", "qmcreate", "100", "root@pam!test", "")
    );
    assert!(
        f[2].len() == 8
            && f[2]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
    );
    // Running first, then stopped with OK.
    let st = s
        .get(&format!("/nodes/pve/tasks/{}/status", urlencode(&upid)))
        .await;
    assert_eq!(st.data()["status"], "running");
    assert_eq!(st.data()["user"], "root@pam");
    assert_eq!(st.data()["tokenid"], "test");
    assert!(st.data()["pid"].is_u64() && st.data()["id"].is_string());
    assert_eq!(s.wait(&upid).await, "OK");
    let log = s
        .get(&format!(
            "/nodes/pve/tasks/{}/log?start=0&limit=50",
            urlencode(&upid)
        ))
        .await;
    let lines = log.data().as_array().unwrap();
    assert_eq!(lines.last().unwrap()["t"], "TASK OK");
    assert_eq!(log.body["total"], lines.len());
    assert_eq!(lines[0]["n"], 1);
    let r = s.get("/nodes/pve/tasks/UPID:nonsense/status").await;
    assert_eq!(r.body["errors"]["upid"], "unable to parse worker upid");
}

#[tokio::test]
async fn the_vmid_is_reserved_by_create_before_the_task_ends() {
    let s = default_sim().await;
    let r = s.post("/nodes/pve/qemu", &[("vmid", "100")]).await;
    assert_eq!(r.status, 200);
    let again = s.post("/nodes/pve/qemu", &[("vmid", "100")]).await;
    assert_eq!(again.status, 500);
    assert_eq!(
        again.body["message"],
        "unable to create VM 100 - VM 100 already exists on node 'pve'\n"
    );
    assert_eq!(s.config(100).await["lock"], "create");
    s.wait(r.data().as_str().unwrap()).await;
    // nextid reserves nothing: it keeps answering the same free id.
    assert_eq!(s.get("/cluster/nextid").await.data(), "101");
    assert_eq!(s.get("/cluster/nextid").await.data(), "101");
}

#[tokio::test]
async fn stale_digests_are_refused_and_changes_are_canonical() {
    let s = default_sim().await;
    s.create_vm(100, &[("tags", "Web;prod,web")]).await;
    let c = s.config(100).await;
    assert_eq!(c["tags"], "prod;web");
    let net0 = c["net0"].as_str().unwrap();
    assert!(
        net0.starts_with("virtio=BC:24:11:") && net0.ends_with(",bridge=vmbr0"),
        "{net0}"
    );
    assert_eq!(c["scsi0"], "tank:vm-100-disk-0,size=8G");
    let digest = c["digest"].as_str().unwrap().to_owned();
    let r = s
        .put(
            "/nodes/pve/qemu/100/config",
            &[("cores", "4"), ("digest", &digest)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body, serde_json::json!({"data": null}));
    let r = s
        .put(
            "/nodes/pve/qemu/100/config",
            &[("cores", "6"), ("digest", &digest)],
        )
        .await;
    assert_eq!(r.status, 500);
    assert_eq!(
        r.body["message"],
        "checksum mismatch (file change by other user?)\n"
    );
    // The MAC survives an update that sends net0 back; without it a new one
    // is generated.
    let mac_before = s.config(100).await["net0"].as_str().unwrap().to_owned();
    s.put("/nodes/pve/qemu/100/config", &[("net0", &mac_before)])
        .await;
    assert_eq!(s.config(100).await["net0"], mac_before.as_str());
    s.put(
        "/nodes/pve/qemu/100/config",
        &[("net0", "virtio,bridge=vmbr0")],
    )
    .await;
    assert_ne!(s.config(100).await["net0"], mac_before.as_str());
    let r = s.put("/nodes/pve/qemu/100/config", &[]).await;
    assert_eq!(r.body["message"], "no options specified\n");
    let r = s
        .put(
            "/nodes/pve/qemu/100/config",
            &[("cores", "2"), ("delete", "cores")],
        )
        .await;
    assert_eq!(
        r.body["errors"]["delete"],
        "you can't use '-cores' and -delete cores' at the same time"
    );
    // cipassword is masked, description trimmed.
    s.put(
        "/nodes/pve/qemu/100/config",
        &[("cipassword", "s3cret"), ("description", "hello  \n")],
    )
    .await;
    let c = s.config(100).await;
    assert_eq!(c["cipassword"], "**********");
    assert_eq!(c["description"], "hello");
}

#[tokio::test]
async fn a_running_vm_keeps_cold_changes_pending_until_restart() {
    let s = default_sim().await;
    s.create_vm(100, &[]).await;
    assert_eq!(s.run("/nodes/pve/qemu/100/status/start", &[]).await, "OK");
    s.put(
        "/nodes/pve/qemu/100/config",
        &[("memory", "4096"), ("name", "renamed")],
    )
    .await;
    let current = s.get("/nodes/pve/qemu/100/config?current=1").await;
    assert_eq!(current.data()["memory"], "2048");
    assert_eq!(current.data()["name"], "renamed", "name applies at once");
    assert_eq!(
        s.config(100).await["memory"],
        "4096",
        "pending values are overlaid by default"
    );
    let pending = s.get("/nodes/pve/qemu/100/pending").await;
    let mem = pending
        .data()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "memory")
        .unwrap()
        .clone();
    assert_eq!(
        (mem["value"].as_str(), mem["pending"].as_str()),
        (Some("2048"), Some("4096"))
    );
    assert_eq!(s.run("/nodes/pve/qemu/100/status/stop", &[]).await, "OK");
    let current = s.get("/nodes/pve/qemu/100/config?current=1").await;
    assert_eq!(
        current.data()["memory"],
        "4096",
        "applied at the cold stop/start"
    );
}

#[tokio::test]
async fn tasks_fail_inside_where_proxmox_fails_them() {
    let s = default_sim().await;
    s.create_vm(100, &[]).await;
    assert_eq!(s.run("/nodes/pve/qemu/100/template", &[]).await, "OK");
    let c = s.config(100).await;
    assert_eq!(c["template"], 1);
    assert_eq!(c["scsi0"], "tank:base-100-disk-0,size=8G");
    // Starting a template: the HTTP call succeeds, the task fails.
    let r = s.post("/nodes/pve/qemu/100/status/start", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        s.wait(r.data().as_str().unwrap()).await,
        "you can't start a vm if it's a template"
    );
    let r = s.post("/nodes/pve/qemu/100/template", &[]).await;
    assert_eq!(
        r.body["message"],
        "you can't convert a template to a template\n"
    );
    // A linked clone pins the template: deleting it fails in the task.
    assert_eq!(
        s.run(
            "/nodes/pve/qemu/100/clone",
            &[("newid", "101"), ("name", "web")]
        )
        .await,
        "OK"
    );
    // ZFS names the base in the clone's volume and lists the snapshot it
    // was cloned from (pve-storage `ZFSPoolPlugin.pm` `clone_image`,
    // `list_images`).
    let clone = s.config(101).await;
    assert_eq!(clone["scsi0"], "tank:base-100-disk-0/vm-101-disk-0,size=8G");
    let content = s.get("/nodes/pve/storage/tank/content?vmid=101").await;
    assert_eq!(content.data()[0]["parent"], "base-100-disk-0@__base__");
    assert_eq!(content.data()[0]["name"], "vm-101-disk-0");
    let r = s.delete("/nodes/pve/qemu/100").await;
    assert_eq!(
        s.wait(r.data().as_str().unwrap()).await,
        "base volume 'tank:base-100-disk-0' is still in use by linked cloned"
    );
    // A running VM cannot be destroyed.
    assert_eq!(s.run("/nodes/pve/qemu/101/status/start", &[]).await, "OK");
    let r = s.delete("/nodes/pve/qemu/101").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.body["message"], "VM 101 is running - destroy failed\n");
    // Stopped, it goes; then the template can go too.
    assert_eq!(s.run("/nodes/pve/qemu/101/status/stop", &[]).await, "OK");
    let r = s.delete("/nodes/pve/qemu/101").await;
    assert_eq!(s.wait(r.data().as_str().unwrap()).await, "OK");
    let r = s.delete("/nodes/pve/qemu/100").await;
    assert_eq!(s.wait(r.data().as_str().unwrap()).await, "OK");
    assert!(
        s.get("/nodes/pve/storage/tank/content")
            .await
            .data()
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn linked_clones_need_a_real_template() {
    let s = default_sim().await;
    s.create_vm(100, &[]).await;
    let r = s
        .post(
            "/nodes/pve/qemu/100/clone",
            &[("newid", "101"), ("full", "0")],
        )
        .await;
    assert_eq!(r.status, 500);
    assert_eq!(
        r.body["message"],
        "Linked clone feature is not supported for 'tank:vm-100-disk-0' (scsi0)\n"
    );
    // `template=1` through config sets the flag without base volumes.
    s.put("/nodes/pve/qemu/100/config", &[("template", "1")])
        .await;
    let r = s
        .post(
            "/nodes/pve/qemu/100/clone",
            &[("newid", "101"), ("full", "0"), ("storage", "tank")],
        )
        .await;
    assert_eq!(
        r.body["message"],
        "parameter 'storage' not allowed for linked clones\n"
    );
    // A full clone of a normal VM is the default.
    let fresh = default_sim().await;
    fresh.create_vm(100, &[]).await;
    assert_eq!(
        fresh
            .run("/nodes/pve/qemu/100/clone", &[("newid", "102")])
            .await,
        "OK"
    );
    let content = fresh.get("/nodes/pve/storage/tank/content?vmid=102").await;
    assert!(
        content.data()[0].get("parent").is_none(),
        "a full clone has no parent"
    );
}

#[tokio::test]
async fn a_clone_target_is_locked_while_the_clone_runs() {
    let mut opts = fast();
    opts.task_durations
        .insert("qmclone".into(), Duration::from_millis(400));
    let s = start(ClusterSpec::default(), opts).await;
    s.create_vm(100, &[]).await;
    s.run("/nodes/pve/qemu/100/template", &[]).await;
    let r = s
        .post("/nodes/pve/qemu/100/clone", &[("newid", "101")])
        .await;
    let upid = r.data().as_str().unwrap().to_owned();
    assert_eq!(
        upid_fields(&upid)[6],
        "100",
        "the UPID id of a clone is the source"
    );
    assert_eq!(s.config(101).await["lock"], "clone");
    let r = s.put("/nodes/pve/qemu/101/config", &[("cores", "4")]).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.body["message"], "VM is locked (clone)\n");
    assert_eq!(s.wait(&upid).await, "OK");
    let c = s.config(101).await;
    assert!(c.get("lock").is_none());
    assert_eq!(c["name"], "Copy-of-VM-vm");
}

#[tokio::test]
async fn config_locks_time_out_under_contention() {
    let mut opts = fast();
    opts.task_durations
        .insert("qmstart".into(), Duration::from_millis(2000));
    opts.vm_lock_timeout = Duration::from_millis(200);
    let s = start(ClusterSpec::default(), opts).await;
    s.create_vm(100, &[]).await;
    let r = s.post("/nodes/pve/qemu/100/status/start", &[]).await;
    let r2 = s.put("/nodes/pve/qemu/100/config", &[("cores", "4")]).await;
    assert_eq!(r2.status, 500);
    assert_eq!(
        r2.body["message"],
        "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout\n"
    );
    // A second worker on the same VM fails inside its task the same way.
    let r3 = s.post("/nodes/pve/qemu/100/status/stop", &[]).await;
    assert_eq!(
        s.wait(r3.data().as_str().unwrap()).await,
        "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout"
    );
    assert_eq!(s.wait(r.data().as_str().unwrap()).await, "OK");
}

#[tokio::test]
async fn full_clones_into_one_storage_share_its_bandwidth_and_never_time_out() {
    // qemu-server `PVE/API2/Qemu.pm` clone_vm: the worker holds the source
    // config lock shared (`lock_config_shared($vmid, 1, …)`) and the target
    // exclusively for the whole clone. pve-storage `PVE/Storage.pm`
    // `vdisk_alloc` takes `cluster_lock_storage` only around `alloc_image`;
    // `clone_disk` copies afterwards without it. So parallel full clones of
    // one template do not fail on the storage lock: their copies compete for
    // the storage's bandwidth, queued here (the makespan of fair sharing).
    let mut opts = fast();
    opts.task_durations
        .insert("qmclone".into(), Duration::from_millis(400));
    let s = start(ClusterSpec::default(), opts).await;
    s.create_vm(100, &[]).await;
    assert_eq!(s.run("/nodes/pve/qemu/100/template", &[]).await, "OK");
    let started = std::time::Instant::now();
    let mut upids = Vec::new();
    for newid in ["101", "102", "103"] {
        let r = s
            .post(
                "/nodes/pve/qemu/100/clone",
                &[("newid", newid), ("full", "1")],
            )
            .await;
        upids.push(r.data().as_str().unwrap().to_owned());
    }
    for upid in &upids {
        assert_eq!(s.wait(upid).await, "OK");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "three copies into one storage take three copy times: {:?}",
        started.elapsed()
    );
    for vmid in [101, 102, 103] {
        assert!(s.config(vmid).await.get("lock").is_none());
    }
}

#[tokio::test]
async fn vmids_are_unique_across_the_cluster_and_local_storage_stays_local() {
    let s = start(ClusterSpec::with_nodes(2), fast()).await;
    let form = [("vmid", "100"), ("scsi0", "local-lvm:4")];
    assert_eq!(s.run("/nodes/pve1/qemu", &form).await, "OK");
    let r = s.post("/nodes/pve2/qemu", &[("vmid", "100")]).await;
    assert_eq!(
        r.body["message"],
        "unable to create VM 100 - VM 100 already exists on node 'pve1'\n"
    );
    let r = s.get("/nodes/pve2/qemu/100/config").await;
    assert_eq!(r.status, 500, "asking the wrong node is 'does not exist'");
    let r = s
        .post(
            "/nodes/pve1/qemu/100/clone",
            &[("newid", "101"), ("target", "pve2")],
        )
        .await;
    assert_eq!(
        r.body["message"],
        "can't clone VM to node 'pve2' (VM uses local storage)\n"
    );
    assert_eq!(
        s.run("/nodes/pve1/qemu", &[("vmid", "200"), ("scsi0", "ceph:4")])
            .await,
        "OK"
    );
    assert_eq!(
        s.run(
            "/nodes/pve1/qemu/200/clone",
            &[("newid", "201"), ("target", "pve2")]
        )
        .await,
        "OK"
    );
    assert_eq!(s.get("/nodes/pve2/qemu/201/config").await.status, 200);
}

fn small(id: &str, plugin: &str, sparse: bool) -> StorageSpec {
    StorageSpec {
        id: id.into(),
        plugin: plugin.into(),
        content: vec!["images".into()],
        shared: false,
        capacity: 10 << 30,
        nodes: None,
        sparse,
    }
}

/// Thick storage reserves a volume's whole size and refuses, inside the
/// task, with the storage tool's error: pve-storage `LVMPlugin.pm`
/// `alloc_image` ("not enough free space (free < size)", bytes against
/// KiB as the source prints them) and `zfs create -V` without `-s`
/// (`ZFSPoolPlugin.pm` `zfs_create_zvol`). Thin storage (LVM-thin, sparse
/// ZFS) over-commits: only written data takes space.
#[tokio::test]
async fn thick_storage_reserves_and_thin_storage_over_commits() {
    let mut spec = ClusterSpec::default();
    spec.storages.push(small("thick", "lvm", false));
    spec.storages.push(small("zthick", "zfspool", false));
    spec.storages.push(small("thin", "lvmthin", false));
    spec.storages.push(small("zthin", "zfspool", true));
    let s = start(spec, fast()).await;
    let create = |vmid: &'static str, disk: &'static str| {
        let s = &s;
        async move {
            let r = s
                .post("/nodes/pve/qemu", &[("vmid", vmid), ("scsi0", disk)])
                .await;
            s.wait(r.data().as_str().unwrap()).await
        }
    };
    assert_eq!(
        create("100", "thick:20").await,
        format!("not enough free space ({} < {})", 10u64 << 30, 20u64 << 20)
    );
    assert_eq!(
        create("101", "zthick:20").await,
        "zfs error: cannot create 'zthick/vm-101-disk-0': out of space"
    );
    assert_eq!(
        s.get("/nodes/pve/qemu/100/config").await.status,
        500,
        "create cleaned up"
    );
    assert_eq!(create("102", "thin:20").await, "OK");
    assert_eq!(create("103", "thin:20").await, "OK", "over-committed twice");
    assert_eq!(create("104", "zthin:20").await, "OK");
    // The storage status counts what thin volumes hold, not their size.
    let thin = s.get("/nodes/pve/storage?storage=thin").await;
    assert_eq!(thin.data()[0]["used"], 0);
    // Growing a thin volume is free; a thick one needs the space.
    let r = s
        .put(
            "/nodes/pve/qemu/102/resize",
            &[("disk", "scsi0"), ("size", "+50G")],
        )
        .await;
    assert_eq!(s.wait(r.data().as_str().unwrap()).await, "OK");
    assert_eq!(create("105", "thick:8").await, "OK");
    let r = s
        .put(
            "/nodes/pve/qemu/105/resize",
            &[("disk", "scsi0"), ("size", "+8G")],
        )
        .await;
    let exit = s.wait(r.data().as_str().unwrap()).await;
    assert!(
        exit.starts_with(
            "error resizing volume '/dev/thick/vm-105-disk-0': Insufficient free space"
        ),
        "{exit}"
    );
}

/// Create refuses before its worker starts when a new disk's storage does
/// not exist or holds no images (qemu-server `API2/Qemu.pm`
/// `$check_storage_access`: `storage_config` dies, then a parameter error
/// on `storage`).
#[tokio::test]
async fn storage_errors_on_create_come_before_the_task() {
    let s = default_sim().await;
    let r = s
        .post("/nodes/pve/qemu", &[("vmid", "100"), ("scsi0", "nope:8")])
        .await;
    assert_eq!(r.status, 500, "{}", r.raw);
    assert_eq!(r.body["message"], "storage 'nope' does not exist\n");
    let r = s
        .post("/nodes/pve/qemu", &[("vmid", "100"), ("scsi0", "local:8")])
        .await;
    assert_eq!(r.status, 400, "{}", r.raw);
    assert_eq!(
        r.body["errors"]["storage"],
        "storage 'local' does not support vm images"
    );
    assert_eq!(s.get("/nodes/pve/qemu/100/config").await.status, 500);
}

#[tokio::test]
async fn resize_grows_only() {
    let s = default_sim().await;
    s.create_vm(100, &[]).await;
    assert_eq!(s.send_resize("+2G").await, "OK");
    assert_eq!(s.config(100).await["scsi0"], "tank:vm-100-disk-0,size=10G");
    assert_eq!(s.send_resize("10G").await, "OK", "an equal size is a no-op");
    assert_eq!(
        s.send_resize("4G").await,
        "shrinking disks is not supported"
    );
}

trait Resize {
    async fn send_resize(&self, size: &str) -> String;
}

impl Resize for common::Sim {
    async fn send_resize(&self, size: &str) -> String {
        let r = self
            .put(
                "/nodes/pve/qemu/100/resize",
                &[("disk", "scsi0"), ("size", size)],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.raw);
        self.wait(r.data().as_str().unwrap()).await
    }
}

#[tokio::test]
async fn download_url_verifies_checksums_and_is_idempotent() {
    let url = "https://releases.example.org/nixos-minimal.iso";
    let sha = "a".repeat(64);
    let mut opts = fast();
    opts.remote_files.insert(
        url.into(),
        RemoteFile {
            sha256: sha.clone(),
            size: 1 << 30,
        },
    );
    let s = start(ClusterSpec::default(), opts).await;
    let base = [
        ("url", url),
        ("content", "iso"),
        ("filename", "nixos.iso"),
        ("checksum-algorithm", "sha256"),
    ];
    let other = "b".repeat(64);
    let bad = [&base[..], &[("checksum", other.as_str())]].concat();
    let exit = s.run("/nodes/pve/storage/local/download-url", &bad).await;
    assert!(exit.starts_with("checksum mismatch: got 'aaaa"), "{exit}");
    let good = [&base[..], &[("checksum", sha.as_str())]].concat();
    assert_eq!(
        s.run("/nodes/pve/storage/local/download-url", &good).await,
        "OK"
    );
    let content = s.get("/nodes/pve/storage/local/content?content=iso").await;
    assert_eq!(content.data()[0]["volid"], "local:iso/nixos.iso");
    assert_eq!(content.data()[0]["size"], 1u64 << 30);
    // Again with the checksum: nothing to do. Without: refused.
    let r = s.post("/nodes/pve/storage/local/download-url", &good).await;
    let upid = r.data().as_str().unwrap().to_owned();
    assert_eq!(upid_fields(&upid)[5..7], ["download", "nixos.iso"]);
    assert_eq!(s.wait(&upid).await, "OK");
    let log = s
        .get(&format!("/nodes/pve/tasks/{}/log", urlencode(&upid)))
        .await;
    assert_eq!(
        log.data()[0]["t"],
        "OK, got correct file already, no need to download"
    );
    let plain = [("url", url), ("content", "iso"), ("filename", "nixos.iso")];
    let exit = s.run("/nodes/pve/storage/local/download-url", &plain).await;
    assert_eq!(
        exit,
        "refusing to override existing file '/var/lib/vz/template/iso/nixos.iso'"
    );
    let r = s.post("/nodes/pve/storage/tank/download-url", &good).await;
    assert_eq!(
        r.body["message"],
        "can't upload to storage type 'zfspool', not a file based storage!\n"
    );
    let wrong = [
        ("url", url),
        ("content", "iso"),
        ("filename", "nixos.qcow2"),
    ];
    let r = s
        .post("/nodes/pve/storage/local/download-url", &wrong)
        .await;
    assert_eq!(r.body["errors"]["filename"], "wrong file extension");
}

#[tokio::test]
async fn cloud_init_is_regenerated_at_start_and_dumped_like_proxmox() {
    let s = default_sim().await;
    s.create_vm(
        100,
        &[
            ("ide2", "tank:cloudinit"),
            ("ciuser", "ops"),
            ("ipconfig0", "ip=192.168.1.130/24,gw=192.168.1.1"),
            ("nameserver", "8.8.8.8 1.1.1.1"),
            ("sshkeys", &urlencode(&format!("{SSH_KEY} ops@host"))),
        ],
    )
    .await;
    assert_eq!(
        s.config(100).await["ide2"],
        "tank:vm-100-cloudinit,media=cdrom"
    );
    let pending = s.get("/nodes/pve/qemu/100/cloudinit").await;
    assert!(
        pending
            .data()
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["key"] == "ciuser" && e["pending"] == "ops")
    );
    s.run("/nodes/pve/qemu/100/status/start", &[]).await;
    let after = s.get("/nodes/pve/qemu/100/cloudinit").await;
    assert!(
        after
            .data()
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e.get("pending").is_none()),
        "{}",
        after.raw
    );
    let user = s.get("/nodes/pve/qemu/100/cloudinit/dump?type=user").await;
    let text = user.data().as_str().unwrap();
    assert!(
        text.contains("user: ops") && text.contains(&format!("  - {SSH_KEY} ops@host")),
        "{text}"
    );
    let net = s
        .get("/nodes/pve/qemu/100/cloudinit/dump?type=network")
        .await;
    assert!(
        net.data()
            .as_str()
            .unwrap()
            .contains("address: '192.168.1.130/24'")
    );
    let r = s
        .post(
            "/nodes/pve/qemu",
            &[
                ("vmid", "101"),
                ("ide2", "tank:cloudinit"),
                ("ide3", "tank:cloudinit"),
            ],
        )
        .await;
    let exit = s.wait(r.data().as_str().unwrap()).await;
    assert!(
        exit.contains("cloud-init drive is already attached"),
        "{exit}"
    );
}

#[tokio::test]
async fn the_cluster_status_of_a_vm_lags_behind_a_start() {
    // pve-manager `PVE/API2Tools.pm` `extract_vm_stats`: `/cluster/resources`
    // takes a VM's status from pvestatd's RRD broadcast, not from the node;
    // `status/current` (qemu-server `vmstatus`) is fresh.
    let mut opts: SimOptions = fast();
    opts.resources_lag = Duration::from_secs(30);
    let mut spec = ClusterSpec::default();
    spec.vms.push(pve_sim::cluster::VmSpec {
        vmid: 100,
        node: "pve".into(),
        config: [("memory".to_owned(), "512".to_owned())].into(),
        template: false,
        running: false,
    });
    let s = start(spec, opts).await;
    let listed = |r: &Reply| r.data()[0]["status"].as_str().unwrap().to_owned();
    assert_eq!(
        listed(&s.get("/cluster/resources?type=vm").await),
        "stopped"
    );
    assert_eq!(s.run("/nodes/pve/qemu/100/status/start", &[]).await, "OK");
    let current = s.get("/nodes/pve/qemu/100/status/current").await;
    assert_eq!(current.data()["status"], "running");
    assert_eq!(
        listed(&s.get("/cluster/resources?type=vm").await),
        "stopped",
        "the listing still shows the last broadcast"
    );
}

#[tokio::test]
async fn resources_lag_behind_for_new_vms() {
    let mut opts: SimOptions = fast();
    opts.resources_lag = Duration::from_secs(30);
    let s = start(ClusterSpec::default(), opts).await;
    s.create_vm(100, &[]).await;
    let r = s.get("/cluster/resources?type=vm").await;
    assert_eq!(r.data()[0]["status"], "unknown");
    assert!(r.data()[0].get("name").is_none());
    let current = s.get("/nodes/pve/qemu/100/status/current").await;
    assert_eq!(
        current.data()["status"],
        "stopped",
        "the node-local status is fresh"
    );
    let all = s.get("/cluster/resources").await;
    let kinds: Vec<&str> = all
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"node") && kinds.contains(&"storage") && kinds.contains(&"qemu"));
    let storage = all
        .data()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "storage/pve/tank")
        .unwrap()
        .clone();
    assert_eq!(storage["shared"], 0);
    assert_eq!(storage["plugintype"], "zfspool");
    let _: Value = storage;
}

/// pve-manager `PVE/API2/Pool.pm`: `create_pool` checks and writes
/// `user.cfg` under `lock_user_config` (a pmxcfs `cfs_lock_file`), so of
/// many creates of one pool id exactly one succeeds and the others die
/// with "create pool failed: pool '…' already exists"; `read_pool` and
/// `delete_pool` die with "pool '…' does not exist"; `delete_pool` refuses
/// a pool that still holds an existing guest.
#[tokio::test]
async fn pool_creation_is_won_once_and_pools_go_only_empty() {
    let s = std::sync::Arc::new(default_sim().await);
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..8 {
        let s = s.clone();
        racers.spawn(async move {
            let comment = format!("racer {i}");
            s.post(
                "/pools",
                &[("poolid", "nixgold-lock-a"), ("comment", &comment)],
            )
            .await
        });
    }
    let replies = racers.join_all().await;
    let won: Vec<_> = replies.iter().filter(|r| r.status == 200).collect();
    assert_eq!(won.len(), 1, "exactly one create wins");
    for lost in replies.iter().filter(|r| r.status != 200) {
        assert_eq!(lost.status, 500);
        assert_eq!(
            lost.body["message"],
            "create pool failed: pool 'nixgold-lock-a' already exists\n"
        );
    }
    let read = s.get("/pools/nixgold-lock-a").await;
    assert!(
        read.data()["comment"]
            .as_str()
            .unwrap()
            .starts_with("racer ")
    );
    assert_eq!(read.data()["members"], serde_json::json!([]));
    // The comment changes in place.
    let r = s
        .put("/pools/nixgold-lock-a", &[("comment", "renewed")])
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        s.get("/pools/nixgold-lock-a").await.data()["comment"],
        "renewed"
    );
    // A pool holding a guest cannot go; once the guest leaves it can.
    s.create_vm(100, &[]).await;
    let r = s
        .put("/pools", &[("poolid", "nixgold-lock-a"), ("vms", "100")])
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let r = s.delete("/pools/nixgold-lock-a").await;
    assert_eq!(r.status, 500);
    assert_eq!(
        r.body["message"],
        "delete pool failed: pool 'nixgold-lock-a' is not empty (contains VM 100)\n"
    );
    let r = s
        .put("/pools/nixgold-lock-a", &[("vms", "100"), ("delete", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(s.delete("/pools/nixgold-lock-a").await.status, 200);
    let gone = s.get("/pools/nixgold-lock-a").await;
    assert_eq!(gone.status, 500);
    assert_eq!(
        gone.body["message"],
        "pool 'nixgold-lock-a' does not exist\n"
    );
    let r = s.delete("/pools?poolid=nixgold-lock-a").await;
    assert_eq!(
        r.body["message"],
        "delete pool failed: pool 'nixgold-lock-a' does not exist\n"
    );
}
