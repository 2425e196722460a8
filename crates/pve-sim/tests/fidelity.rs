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
