//! Proxmox fidelity, round two: what the simulator rejects because Proxmox
//! rejects it, and what it generates because Proxmox generates it. Every
//! test names its evidence: a Proxmox source file and function, or a
//! recorded response under `../shared/pve-api/recorded/`.

mod common;

use common::{SSH_KEY, default_sim, urlencode};
use serde_json::Value;

/// The 400's reason for `key`, or a panic naming what came back.
fn param_error(r: &common::Reply, key: &str) -> String {
    assert_eq!(r.status, 400, "{}", r.raw);
    assert_eq!(r.body["message"], "Parameter verification failed.\n");
    r.body["errors"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no error for {key}: {}", r.raw))
        .to_owned()
}

/// qemu-server `QemuServer/Network.pm` `$ipconfig_fmt`: `ip` is
/// `pve-ipv4-config` (CIDR, `dhcp` or `manual`; pve-common JSONSchema.pm
/// `pve_verify_ipv4_config`), `gw` has `requires => 'ip'`, and
/// `parse_property_string` refuses keys the format does not define. The
/// text is `check_prop`'s `invalid format - ` around the exception that
/// `PVE::Exception::stringify` prints with its `errors`.
#[tokio::test]
async fn ipconfig_needs_a_cidr_or_dhcp_and_gw_needs_ip() {
    let s = default_sim().await;
    s.create_vm(100, &[]).await;
    let put = |value: &'static str| {
        let s = &s;
        async move {
            s.put("/nodes/pve/qemu/100/config", &[("ipconfig0", value)])
                .await
        }
    };
    assert_eq!(
        param_error(&put("ip=10.0.0.5").await, "ipconfig0"),
        "invalid format - format error\nipconfig0.ip: invalid format - value does not look like a valid ipv4 network configuration\n"
    );
    assert_eq!(
        param_error(&put("gw=10.0.0.1").await, "ipconfig0"),
        "invalid format - format error\nipconfig0.ip: missing property required by 'ipconfig0.gw'\n"
    );
    assert_eq!(
        param_error(&put("ip=dhcp,mask=24").await, "ipconfig0"),
        "invalid format - invalid key in comma-separated list property: mask\n"
    );
    assert_eq!(
        param_error(&put("ip=10.0.0.5/4").await, "ipconfig0"),
        "invalid format - format error\nipconfig0.ip: invalid format - value does not look like a valid ipv4 network configuration\n",
        "pve_verify_cidrv4 wants a prefix of 8 to 32"
    );
    for ok in [
        "ip=10.0.0.5/24,gw=10.0.0.1",
        "ip=dhcp",
        "ip=manual",
        "ip6=auto",
        "ip6=2001:db8::5/64,gw6=2001:db8::1",
    ] {
        assert_eq!(put(ok).await.status, 200, "{ok}");
    }
}

/// `$net_fmt` (`tag`: integer 1–4094) and `$memory_fmt` (`current`, the
/// default key: integer, minimum 16) in qemu-server; the messages are
/// pve-common `check_prop`'s.
#[tokio::test]
async fn vlan_tags_and_memory_are_range_checked_inside_the_property_string() {
    let s = default_sim().await;
    let r = s
        .post(
            "/nodes/pve/qemu",
            &[("vmid", "100"), ("net0", "virtio,bridge=vmbr0,tag=5000")],
        )
        .await;
    assert_eq!(
        param_error(&r, "net0"),
        "invalid format - format error\nnet0.tag: value must have a maximum value of 4094\n"
    );
    let r = s
        .post("/nodes/pve/qemu", &[("vmid", "100"), ("memory", "8")])
        .await;
    assert_eq!(
        param_error(&r, "memory"),
        "invalid format - format error\nmemory.current: value must have a minimum value of 16\n"
    );
    assert!(
        s.get("/cluster/resources?type=vm")
            .await
            .data()
            .as_array()
            .unwrap()
            .is_empty(),
        "a refused create reserves nothing"
    );
    s.create_vm(
        100,
        &[("net1", "e1000=bc:24:11:aa:bb:cc,bridge=vmbr0,tag=4094")],
    )
    .await;
    assert_eq!(
        s.config(100).await["net1"],
        "e1000=BC:24:11:AA:BB:CC,bridge=vmbr0,tag=4094"
    );
}

/// `verify_bootdev` in qemu-server `QemuServer.pm` checks names at
/// validation; `update_vm_api` in `API2/Qemu.pm` then refuses an order
/// naming a device the VM does not have (the message's stray quote is
/// qemu-server's). PUT is synchronous (500); POST runs the same code in
/// its `qmconfig` worker, so the task fails.
#[tokio::test]
async fn a_boot_order_must_name_devices_the_vm_has() {
    let s = default_sim().await;
    s.create_vm(100, &[]).await;
    let r = s
        .put("/nodes/pve/qemu/100/config", &[("boot", "order=floppy0")])
        .await;
    assert_eq!(
        param_error(&r, "boot"),
        "invalid format - format error\nboot.order: invalid format - invalid boot device 'floppy0'\n"
    );
    let r = s
        .put(
            "/nodes/pve/qemu/100/config",
            &[("boot", "order=scsi0;virtio3")],
        )
        .await;
    assert_eq!(r.status, 500, "{}", r.raw);
    assert_eq!(
        r.body["message"],
        "invalid bootorder: device 'virtio3' does not exist'\n"
    );
    let exit = s
        .run(
            "/nodes/pve/qemu/100/config",
            &[("boot", "order=net0;scsi0"), ("delete", "net0")],
        )
        .await;
    assert_eq!(exit, "invalid bootorder: device 'net0' does not exist'");
    let r = s
        .put(
            "/nodes/pve/qemu/100/config",
            &[("boot", "order=scsi1;scsi0"), ("scsi1", "tank:1")],
        )
        .await;
    assert_eq!(r.status, 200, "a device added by the same request counts");
    assert_eq!(s.config(100).await["boot"], "order=scsi1;scsi0");
}

/// `create_vm` and `update_vm_api` (qemu-server `API2/Qemu.pm`) unescape
/// `sshkeys` and run pve-common `Tools.pm` `validate_ssh_public_keys`
/// (`ssh-keygen -l` per line) before anything is forked: a 500.
#[tokio::test]
async fn ssh_keys_must_be_public_keys() {
    let s = default_sim().await;
    let r = s
        .post(
            "/nodes/pve/qemu",
            &[("vmid", "100"), ("sshkeys", &urlencode("not a key"))],
        )
        .await;
    assert_eq!(r.status, 500, "{}", r.raw);
    assert_eq!(r.body["message"], "SSH public key validation error\n");
    // A key type followed by base64 of something else is no key either.
    let fake = urlencode("ssh-ed25519 AAAA ops@host");
    s.create_vm(100, &[]).await;
    let r = s
        .put("/nodes/pve/qemu/100/config", &[("sshkeys", &fake)])
        .await;
    assert_eq!(r.status, 500, "{}", r.raw);
    let two = urlencode(&format!(
        "{SSH_KEY} a@b\n\nfrom=\"10.0.0.0/8\" {SSH_KEY} c@d\n"
    ));
    let r = s
        .put("/nodes/pve/qemu/100/config", &[("sshkeys", &two)])
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
}

fn row<'a>(pending: &'a Value, key: &str) -> Option<&'a Value> {
    pending.as_array().unwrap().iter().find(|e| e["key"] == key)
}

/// pve-guest-common `AbstractConfig.pm` `cleanup_pending` drops a pending
/// value equal to the applied one (and a pending delete of a key that is
/// not set); `GuestHelpers.pm` `config_with_pending_array` lists the
/// loaded config, whose `digest` is a row, with values as qemu-server's
/// `check_type` parsed them (integers and booleans are numbers).
#[tokio::test]
async fn equal_values_leave_nothing_pending_and_pending_rows_are_typed() {
    let s = default_sim().await;
    s.create_vm(100, &[]).await;
    assert_eq!(s.run("/nodes/pve/qemu/100/status/start", &[]).await, "OK");
    let r = s
        .put(
            "/nodes/pve/qemu/100/config",
            &[("cores", "2"), ("memory", "2048")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let pending = s.get("/nodes/pve/qemu/100/pending").await;
    let rows = pending.data();
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|e| e.get("pending").is_none()),
        "equal values are not pending: {}",
        pending.raw
    );
    s.put(
        "/nodes/pve/qemu/100/config",
        &[("cores", "4"), ("delete", "balloon")],
    )
    .await;
    let pending = s.get("/nodes/pve/qemu/100/pending").await;
    let cores = row(pending.data(), "cores").unwrap();
    assert_eq!(
        (&cores["value"], &cores["pending"]),
        (&Value::from(2), &Value::from(4))
    );
    assert!(
        row(pending.data(), "balloon").is_none(),
        "nothing to delete"
    );
    let digest = row(pending.data(), "digest").expect("a digest row");
    assert_eq!(
        digest["value"],
        s.config(100).await["digest"],
        "the same digest GET config reports"
    );
    assert_eq!(row(pending.data(), "memory").unwrap()["value"], "2048");
    // Setting the value back drops the pending entry again.
    s.put("/nodes/pve/qemu/100/config", &[("cores", "2")]).await;
    let pending = s.get("/nodes/pve/qemu/100/pending").await;
    assert!(
        row(pending.data(), "cores")
            .unwrap()
            .get("pending")
            .is_none()
    );
}

fn is_uuid(v: &str) -> bool {
    let parts: Vec<usize> = v.split('-').map(str::len).collect();
    parts == [8, 4, 4, 4, 12] && v.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
}

/// qemu-server `API2/Qemu.pm` `create_vm` writes `meta`
/// (`MetaInfo.pm` `new_meta_info_string`), `smbios1` with a fresh uuid,
/// `vmgenid`, and a `boot` order from `get_default_bootdevices`; `clone_vm`
/// keeps `meta`, and always gives the clone a new smbios uuid, a new
/// vmgenid when the source had one, and new MACs. The recorded PVE 6
/// configs (`6/qemu-config-multi-nic--ansible-community-general.json`)
/// carry `smbios1: uuid=…` and `vmgenid` the same way.
#[tokio::test]
async fn create_and_clone_add_the_keys_proxmox_generates() {
    let s = default_sim().await;
    s.create_vm(100, &[("ide2", "none,media=cdrom")]).await;
    let c = s.config(100).await;
    let meta = c["meta"].as_str().unwrap();
    assert!(
        meta.starts_with("creation-qemu=") && meta.contains(",ctime="),
        "{meta}"
    );
    let uuid = c["smbios1"]
        .as_str()
        .unwrap()
        .strip_prefix("uuid=")
        .unwrap();
    assert!(is_uuid(uuid), "{uuid}");
    assert!(is_uuid(c["vmgenid"].as_str().unwrap()));
    assert_eq!(c["boot"], "order=scsi0;ide2;net0");

    assert_eq!(s.run("/nodes/pve/qemu/100/template", &[]).await, "OK");
    assert_eq!(
        s.run(
            "/nodes/pve/qemu/100/clone",
            &[("newid", "101"), ("name", "copy")]
        )
        .await,
        "OK"
    );
    let clone = s.config(101).await;
    assert_eq!(clone["meta"], c["meta"], "meta is copied");
    assert_eq!(clone["boot"], c["boot"]);
    for key in ["smbios1", "vmgenid", "net0"] {
        assert_ne!(clone[key], c[key], "{key} is regenerated");
    }
    assert!(clone["smbios1"].as_str().unwrap().starts_with("uuid="));

    // Keys the request sets are kept; `vmgenid=1` asks for a generated one.
    s.create_vm(
        102,
        &[
            ("smbios1", "uuid=7e1f0d4c-1b2a-4c3d-9e8f-0a1b2c3d4e5f"),
            ("vmgenid", "1"),
            ("boot", "order=net0"),
        ],
    )
    .await;
    let c = s.config(102).await;
    assert_eq!(c["smbios1"], "uuid=7e1f0d4c-1b2a-4c3d-9e8f-0a1b2c3d4e5f");
    assert!(is_uuid(c["vmgenid"].as_str().unwrap()));
    assert_eq!(c["boot"], "order=net0");
}

/// pveproxy looks up the address of the node a call is proxied to
/// (pve-cluster `remote_node_ip`); for an unknown name that lookup dies in
/// the handler, a 500, not the proxy's retryable 595.
#[tokio::test]
async fn an_unknown_node_is_a_500() {
    let s = default_sim().await;
    let r = s.get("/nodes/pve9/qemu").await;
    assert_eq!(r.status, 500, "{}", r.raw);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .starts_with("hostname lookup 'pve9' failed"),
        "{}",
        r.raw
    );
}

/// pve-manager `API2/Tasks.pm` `node_tasks`: finished tasks unless
/// `source` says otherwise, newest first, `total` beside the page, filters
/// by VMID, type and error; each row has the UPID's fields, the exit
/// status as `status` and an `endtime`.
#[tokio::test]
async fn the_task_list_pages_and_filters_finished_tasks() {
    let s = default_sim().await;
    s.create_vm(100, &[]).await;
    s.create_vm(101, &[]).await;
    assert_eq!(s.run("/nodes/pve/qemu/100/status/start", &[]).await, "OK");
    let hung = s.post("/nodes/pve/qemu/101/template", &[]).await;
    s.wait(hung.data().as_str().unwrap()).await;
    let r = s.post("/nodes/pve/qemu/101/status/start", &[]).await;
    s.wait(r.data().as_str().unwrap()).await;
    let all = s.get("/nodes/pve/tasks").await;
    let rows = all.data().as_array().unwrap();
    assert_eq!(all.body["total"], 5, "{}", all.raw);
    assert_eq!(rows[0]["type"], "qmstart", "newest first");
    assert_eq!(rows[0]["id"], "101");
    assert_eq!(rows[0]["status"], "you can't start a vm if it's a template");
    assert!(rows[0]["endtime"].is_u64() && rows[0]["pid"].is_u64());
    let errors = s.get("/nodes/pve/tasks?errors=1").await;
    assert_eq!(errors.body["total"], 1);
    let created = s.get("/nodes/pve/tasks?typefilter=qmcreate&limit=1").await;
    assert_eq!(created.body["total"], 2);
    assert_eq!(created.data().as_array().unwrap().len(), 1);
    let vm100 = s.get("/nodes/pve/tasks?vmid=100").await;
    assert!(
        vm100
            .data()
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["id"] == "100"),
        "{}",
        vm100.raw
    );
    let active = s.get("/nodes/pve/tasks?source=active").await;
    assert_eq!(active.body["total"], 0);
}

/// qemu-server `API2/Qemu.pm` `vm_reboot`: refused at once for a stopped
/// VM; for a running one a `qmreboot` task that shuts down and starts
/// again, so pending changes apply (`vm_start` applies them).
#[tokio::test]
async fn reboot_applies_pending_changes() {
    let s = default_sim().await;
    s.create_vm(100, &[]).await;
    let r = s.post("/nodes/pve/qemu/100/status/reboot", &[]).await;
    assert_eq!(r.status, 500, "{}", r.raw);
    assert_eq!(r.body["message"], "VM 100 not running\n");
    assert_eq!(s.run("/nodes/pve/qemu/100/status/start", &[]).await, "OK");
    s.put("/nodes/pve/qemu/100/config", &[("cores", "4")]).await;
    let current = s.get("/nodes/pve/qemu/100/config?current=1").await;
    assert_eq!(current.data()["cores"], 2);
    let r = s.post("/nodes/pve/qemu/100/status/reboot", &[]).await;
    let upid = r.data().as_str().unwrap().to_owned();
    assert!(upid.contains(":qmreboot:100:"), "{upid}");
    assert_eq!(s.wait(&upid).await, "OK");
    let current = s.get("/nodes/pve/qemu/100/config?current=1").await;
    assert_eq!(current.data()["cores"], 4);
    let status = s.get("/nodes/pve/qemu/100/status/current").await;
    assert_eq!(status.data()["status"], "running");
}

/// Sends `method path` with another API token.
async fn as_token(
    s: &common::Sim,
    token: &str,
    method: reqwest::Method,
    path: &str,
    form: &[(&str, &str)],
) -> common::Reply {
    let req = s
        .http
        .request(method, s.url(path))
        .form(form)
        .header("Authorization", format!("PVEAPIToken={token}"));
    s.send(req).await
}

/// pve-access-control: `RPCEnvironment.pm` `permissions` intersects a
/// privilege-separated token's ACL with its user's; `AccessControl.pm`
/// `roles` lets entries propagate down the path unless `propagate=0`, and
/// `create_roles` defines the built-in roles; a failed check is pve-common
/// `raise_perm_exc`'s 403 "Permission check failed (path, privilege)".
/// The configured root token keeps every privilege.
#[tokio::test]
async fn privilege_separated_tokens_get_what_their_acls_and_user_allow() {
    use reqwest::Method;
    let s = default_sim().await;
    s.create_vm(100, &[]).await;
    assert_eq!(
        s.post("/access/users", &[("userid", "ops@pve")])
            .await
            .status,
        200
    );
    let made = s.post("/access/users/ops@pve/token/ci", &[]).await;
    assert_eq!(made.data()["full-tokenid"], "ops@pve!ci");
    assert_eq!(made.data()["info"]["privsep"], 1);
    let token = format!("ops@pve!ci={}", made.data()["value"].as_str().unwrap());

    // Listings show only what the token may audit (pve-manager
    // `API2/Cluster.pm` `resources`).
    let seen = as_token(&s, &token, Method::GET, "/cluster/resources", &[]).await;
    let kinds: Vec<&str> = seen
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["node"], "{}", seen.raw);
    assert!(
        seen.data()[0].get("maxmem").is_none(),
        "no Sys.Audit, no stats"
    );
    let config = || as_token(&s, &token, Method::GET, "/nodes/pve/qemu/100/config", &[]);
    let r = config().await;
    assert_eq!(r.status, 403, "{}", r.raw);
    assert_eq!(
        r.body["message"],
        "Permission check failed (/vms/100, VM.Audit)\n"
    );

    // The token's own ACL is not enough: its user must hold the privilege too.
    let acl = |who: &'static str, id: &'static str, role: &'static str, path: &'static str| {
        let s = &s;
        async move {
            let r = s
                .put("/access/acl", &[("path", path), ("roles", role), (who, id)])
                .await;
            assert_eq!(r.status, 200, "{}", r.raw);
        }
    };
    acl("tokens", "ops@pve!ci", "PVEAuditor", "/").await;
    assert_eq!(config().await.status, 403);
    acl("users", "ops@pve", "PVEVMAdmin", "/vms").await;
    assert_eq!(config().await.status, 200, "propagated from / and /vms");
    let start = as_token(
        &s,
        &token,
        Method::POST,
        "/nodes/pve/qemu/100/status/start",
        &[],
    )
    .await;
    assert_eq!(start.status, 403);
    assert_eq!(
        start.body["message"],
        "Permission check failed (/vms/100, VM.PowerMgmt)\n"
    );
    let create = as_token(
        &s,
        &token,
        Method::POST,
        "/nodes/pve/qemu",
        &[("vmid", "101")],
    )
    .await;
    assert_eq!(
        create.body["message"],
        "Permission check failed (/vms/101, VM.Allocate)\n"
    );

    // A custom role on the VM itself; an entry that does not propagate
    // stays on its path.
    let r = s
        .post(
            "/access/roles",
            &[("roleid", "Power"), ("privs", "VM.PowerMgmt,VM.Audit")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    acl("tokens", "ops@pve!ci", "Power", "/vms/100").await;
    let start = as_token(
        &s,
        &token,
        Method::POST,
        "/nodes/pve/qemu/100/status/start",
        &[],
    )
    .await;
    assert_eq!(start.status, 200, "{}", start.raw);
    let r = s
        .put(
            "/access/acl",
            &[
                ("path", "/nodes"),
                ("roles", "PVEAuditor"),
                ("users", "ops@pve"),
                ("propagate", "0"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let perms = as_token(
        &s,
        &token,
        Method::GET,
        "/access/permissions?path=/vms/100",
        &[],
    )
    .await;
    let privs = perms.data()["/vms/100"].as_object().unwrap();
    assert!(privs.contains_key("VM.PowerMgmt") && privs.contains_key("VM.Audit"));
    assert!(!privs.contains_key("VM.Allocate"), "{}", perms.raw);
    let perms = s.get("/access/permissions?path=/vms/100").await;
    assert!(
        perms.data()["/vms/100"]["VM.Allocate"] == 1,
        "root's token has all"
    );
}

/// pve-guest-common `AbstractConfig.pm` `snapshot_create`,
/// `snapshot_rollback` and `snapshot_delete`, and qemu-server
/// `snapshot_list`: snapshots chain by `parent`, `current` is listed last
/// ("You are here!"), a rollback restores the config (stopping the VM
/// first), a delete re-links the chain; reserved names are refused.
#[tokio::test]
async fn snapshots_chain_roll_back_and_delete() {
    let s = default_sim().await;
    s.create_vm(100, &[]).await;
    let r = s
        .post("/nodes/pve/qemu/100/snapshot", &[("snapname", "current")])
        .await;
    assert_eq!(
        r.body["message"],
        "unable to use snapshot name 'current' (reserved name)\n"
    );
    let snap = |name: &'static str| {
        let s = &s;
        async move {
            s.run("/nodes/pve/qemu/100/snapshot", &[("snapname", name)])
                .await
        }
    };
    assert_eq!(snap("one").await, "OK");
    s.put("/nodes/pve/qemu/100/config", &[("cores", "4")]).await;
    assert_eq!(snap("two").await, "OK");
    assert_eq!(snap("two").await, "snapshot name 'two' already used");
    let list = s.get("/nodes/pve/qemu/100/snapshot").await;
    let rows = list.data().as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1]["parent"], "one");
    assert_eq!(rows[2]["name"], "current");
    assert_eq!(rows[2]["description"], "You are here!");
    assert_eq!(rows[2]["parent"], "two");
    let old = s.get("/nodes/pve/qemu/100/config?snapshot=one").await;
    assert_eq!(old.data()["cores"], 2);

    assert_eq!(s.run("/nodes/pve/qemu/100/status/start", &[]).await, "OK");
    assert_eq!(
        s.run("/nodes/pve/qemu/100/snapshot/one/rollback", &[])
            .await,
        "OK"
    );
    let c = s.config(100).await;
    assert_eq!(
        (c["cores"].clone(), c["parent"].clone()),
        (2.into(), "one".into())
    );
    let status = s.get("/nodes/pve/qemu/100/status/current").await;
    assert_eq!(status.data()["status"], "stopped", "rollback stops the VM");

    let r = s.delete("/nodes/pve/qemu/100/snapshot/one").await;
    assert_eq!(s.wait(r.data().as_str().unwrap()).await, "OK");
    let list = s.get("/nodes/pve/qemu/100/snapshot").await;
    let two = &list.data().as_array().unwrap()[0];
    assert_eq!(two["name"], "two");
    assert!(two.get("parent").is_none(), "{}", list.raw);
    assert!(s.config(100).await.get("parent").is_none());
}
