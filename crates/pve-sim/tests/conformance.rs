//! Every route the simulator serves, checked against the official Proxmox
//! VE API schema (`../shared/pve-api/apidoc.json`, PVE 9.1): the method
//! exists, the parameters are the schema's (names, types, optionality,
//! ranges, enums), unknown ones are rejected with 400, required ones are
//! required, and live responses have the declared return type and only
//! declared fields (minus the schema's documented omissions).
//!
//! The schema is third-party reference data and is never copied into the
//! repository; where `../shared` is absent the test says so and skips.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{TOKEN, fast, start, urlencode};
use pve_sim::params::Kind;
use pve_sim::routes::{RouteId, routes};
use pve_sim::{ClusterSpec, RemoteFile};
use serde_json::Value;

fn schema() -> Option<BTreeMap<String, Value>> {
    let path = std::env::var_os("NIXGOLD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
        .join("pve-api/apidoc.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!(
            "SKIPPED: {} not found (set NIXGOLD_SHARED to the shared/ folder)",
            path.display()
        );
        return None;
    };
    let roots: Vec<Value> = serde_json::from_str(&text).expect("apidoc.json parses");
    let mut index = BTreeMap::new();
    fn walk(node: &Value, index: &mut BTreeMap<String, Value>) {
        index.insert(node["path"].as_str().unwrap().to_owned(), node.clone());
        for child in node["children"].as_array().into_iter().flatten() {
            walk(child, index);
        }
    }
    roots.iter().for_each(|r| walk(r, &mut index));
    Some(index)
}

fn method_info<'a>(index: &'a BTreeMap<String, Value>, path: &str, method: &str) -> &'a Value {
    let node = index
        .get(path)
        .unwrap_or_else(|| panic!("{path} is not in the schema"));
    let info = &node["info"][method];
    assert!(info.is_object(), "{method} {path} is not in the schema");
    info
}

#[test]
fn every_route_and_parameter_is_the_schemas() {
    let Some(index) = schema() else { return };
    for route in routes() {
        let info = method_info(&index, route.path, route.method);
        let props = info["parameters"]["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let here = format!("{} {}", route.method, route.path);
        for p in &route.params {
            let s = props
                .get(p.name)
                .unwrap_or_else(|| panic!("{here}: parameter {} is not in the schema", p.name));
            assert_eq!(
                s["type"].as_str(),
                Some(p.kind.type_name()),
                "{here}: type of {}",
                p.name
            );
            let optional = s["optional"].as_i64() == Some(1);
            assert_eq!(optional, p.optional, "{here}: optionality of {}", p.name);
            if let Kind::Integer { min, max } = p.kind {
                let smin = s["minimum"]
                    .as_i64()
                    .or_else(|| s["minimum"].as_str().and_then(|v| v.parse().ok()));
                assert_eq!(min, smin, "{here}: minimum of {}", p.name);
                assert_eq!(max, s["maximum"].as_i64(), "{here}: maximum of {}", p.name);
            }
            if let pve_sim::params::Check::Enum(values) = p.check {
                let schema_enum: Vec<&str> = s["enum"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect();
                assert_eq!(values, schema_enum.as_slice(), "{here}: enum of {}", p.name);
            }
        }
        for name in props.keys() {
            assert!(
                route.params.iter().any(|p| p.name == name),
                "{here}: the schema's parameter {name} is not declared by the simulator"
            );
        }
        let returns = info["returns"]["type"].as_str().unwrap_or("null");
        assert_eq!(returns, route.returns.type_name(), "{here}: return type");
    }
}

/// Fields real servers send that the 9.1 schema does not list, per route
/// (shared/pve-api/NOTES.md §0, and the recordings in `recorded/`: e.g.
/// `disk` in every PVE 8 `qemu` list item).
fn undocumented(route: RouteId) -> &'static [&'static str] {
    match route {
        RouteId::Nodes => &["id", "type", "disk", "maxdisk"],
        RouteId::TaskStatus => &["tokenid"],
        // `name`: pve-storage `ZFSPoolPlugin.pm` `list_images` passes its
        // `zfs list` entries through whole.
        RouteId::StorageContent => &["content", "name"],
        RouteId::StatusCurrent => &["ha", "agent", "disk"],
        RouteId::QemuList => &["disk"],
        RouteId::TicketPost => &["cap"],
        // `snapshot_list`'s `current` row (qemu-server `API2/Qemu.pm`).
        RouteId::SnapshotList => &["digest", "running"],
        // pve-manager `API2/Nodes.pm` `status` sets both.
        RouteId::NodeStatus => &["uptime", "kversion"],
        // ifupdown2's bridge options, which `API2/Network.pm` passes on.
        RouteId::NodeNetwork => &["bridge_stp", "bridge_fd"],
        _ => &[],
    }
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn check_fields(here: &str, route: RouteId, schema: &Value, value: &Value) {
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    let Some(obj) = value.as_object() else { return };
    for key in obj.keys() {
        if route == RouteId::ConfigGet {
            break; // a config is free-form: any config key plus digest
        }
        assert!(
            props.contains_key(key) || undocumented(route).contains(&key.as_str()),
            "{here}: response field {key} is not in the schema"
        );
    }
    for (name, p) in props {
        if p["optional"].as_i64() != Some(1) {
            assert!(
                obj.contains_key(name),
                "{here}: required response field {name} is missing"
            );
        }
    }
}

#[tokio::test]
async fn live_requests_follow_the_schema() {
    let Some(index) = schema() else { return };
    let iso_url = "https://example.org/nixos.iso";
    let mut opts = fast();
    opts.remote_files.insert(
        iso_url.into(),
        RemoteFile {
            sha256: "c".repeat(64),
            size: 1 << 20,
        },
    );
    let s = start(ClusterSpec::default(), opts).await;
    s.create_vm(
        100,
        &[
            ("agent", "1"),
            ("ide2", "tank:cloudinit"),
            ("ipconfig0", "ip=dhcp"),
        ],
    )
    .await;
    s.run("/nodes/pve/qemu/100/status/start", &[]).await;
    let upid = s
        .post("/nodes/pve/qemu/100/status/stop", &[])
        .await
        .data()
        .as_str()
        .unwrap()
        .to_owned();
    s.wait(&upid).await;
    let upid_e = urlencode(&upid);
    let mut seen = Vec::new();

    for route in routes() {
        let here = format!("{} {}", route.method, route.path);
        let path = route
            .path
            .replace("{node}", "pve")
            .replace("{vmid}", "100")
            .replace("{storage}", "local")
            .replace("{snapname}", "before")
            .replace("{upid}", &upid_e)
            .replace("{poolid}", "nixgold-lock-homelab");
        // An unknown parameter is rejected with 400, by name.
        let bogus = [("nixgold_bogus", "1")];
        let req = match route.method {
            "GET" => s.http.get(s.url(&format!("{path}?nixgold_bogus=1"))),
            "DELETE" => s.http.delete(s.url(&format!("{path}?nixgold_bogus=1"))),
            "POST" => s.http.post(s.url(&path)).form(&bogus),
            _ => s.http.put(s.url(&path)).form(&bogus),
        };
        let r = s
            .send(req.header("Authorization", format!("PVEAPIToken={TOKEN}")))
            .await;
        assert_eq!(r.status, 400, "{here}: {}", r.raw);
        assert!(
            r.body["errors"]["nixgold_bogus"].is_string(),
            "{here}: {}",
            r.raw
        );
        // Every required, non-path parameter is reported missing.
        for p in route
            .params
            .iter()
            .filter(|p| !p.optional && !route.path.contains(&format!("{{{}}}", p.name)))
        {
            assert_eq!(
                r.body["errors"][p.name], "property is missing and it is not optional",
                "{here}: {} not required: {}",
                p.name, r.raw
            );
        }
        seen.push(route.id);
    }
    assert_eq!(seen.len(), routes().len());

    // Successful calls return the declared type and fields.
    let checks: Vec<(RouteId, reqwest::RequestBuilder)> = vec![
        (RouteId::Version, s.http.get(s.url("/version"))),
        (
            RouteId::ClusterResources,
            s.http.get(s.url("/cluster/resources")),
        ),
        (RouteId::Nodes, s.http.get(s.url("/nodes"))),
        (
            RouteId::NodeStorage,
            s.http.get(s.url("/nodes/pve/storage")),
        ),
        (
            RouteId::StorageContent,
            s.http.get(s.url("/nodes/pve/storage/tank/content")),
        ),
        (RouteId::QemuList, s.http.get(s.url("/nodes/pve/qemu"))),
        (RouteId::QemuIndex, s.http.get(s.url("/nodes/pve/qemu/100"))),
        (
            RouteId::ConfigGet,
            s.http.get(s.url("/nodes/pve/qemu/100/config")),
        ),
        (
            RouteId::Pending,
            s.http.get(s.url("/nodes/pve/qemu/100/pending")),
        ),
        (
            RouteId::StatusCurrent,
            s.http.get(s.url("/nodes/pve/qemu/100/status/current")),
        ),
        (
            RouteId::CloudinitGet,
            s.http.get(s.url("/nodes/pve/qemu/100/cloudinit")),
        ),
        (
            RouteId::CloudinitDump,
            s.http
                .get(s.url("/nodes/pve/qemu/100/cloudinit/dump?type=user")),
        ),
        (
            RouteId::TaskStatus,
            s.http
                .get(s.url(&format!("/nodes/pve/tasks/{upid_e}/status"))),
        ),
        (
            RouteId::TaskLog,
            s.http.get(s.url(&format!("/nodes/pve/tasks/{upid_e}/log"))),
        ),
        (
            RouteId::ConfigPut,
            s.http
                .put(s.url("/nodes/pve/qemu/100/config"))
                .form(&[("cores", "3")]),
        ),
        (
            RouteId::CloudinitPut,
            s.http.put(s.url("/nodes/pve/qemu/100/cloudinit")),
        ),
        (
            RouteId::ConfigPost,
            s.http
                .post(s.url("/nodes/pve/qemu/100/config"))
                .form(&[("cores", "2")]),
        ),
        (
            RouteId::Resize,
            s.http
                .put(s.url("/nodes/pve/qemu/100/resize"))
                .form(&[("disk", "scsi0"), ("size", "+1G")]),
        ),
        (
            RouteId::DownloadUrl,
            s.http
                .post(s.url("/nodes/pve/storage/local/download-url"))
                .form(&[
                    ("url", iso_url),
                    ("content", "iso"),
                    ("filename", "nixos.iso"),
                ]),
        ),
        (
            RouteId::Clone,
            s.http
                .post(s.url("/nodes/pve/qemu/100/clone"))
                .form(&[("newid", "101")]),
        ),
        (
            RouteId::QemuCreate,
            s.http
                .post(s.url("/nodes/pve/qemu"))
                .form(&[("vmid", "102")]),
        ),
        (
            RouteId::Start,
            s.http.post(s.url("/nodes/pve/qemu/100/status/start")),
        ),
        (
            RouteId::Reboot,
            s.http.post(s.url("/nodes/pve/qemu/100/status/reboot")),
        ),
        (
            RouteId::TaskList,
            s.http.get(s.url("/nodes/pve/tasks?source=all")),
        ),
        (
            RouteId::SnapshotCreate,
            s.http
                .post(s.url("/nodes/pve/qemu/100/snapshot"))
                .form(&[("snapname", "before")]),
        ),
        (
            RouteId::SnapshotList,
            s.http.get(s.url("/nodes/pve/qemu/100/snapshot")),
        ),
        (
            RouteId::SnapshotRollback,
            s.http
                .post(s.url("/nodes/pve/qemu/100/snapshot/before/rollback"))
                .form(&[("start", "1")]),
        ),
        (
            RouteId::SnapshotDelete,
            s.http.delete(s.url("/nodes/pve/qemu/100/snapshot/before")),
        ),
        (RouteId::NodeStatus, s.http.get(s.url("/nodes/pve/status"))),
        (
            RouteId::NodeNetwork,
            s.http.get(s.url("/nodes/pve/network?type=any_bridge")),
        ),
        (RouteId::ClusterStatus, s.http.get(s.url("/cluster/status"))),
        (
            RouteId::Permissions,
            s.http.get(s.url("/access/permissions?path=/vms/100")),
        ),
        (
            RouteId::UserCreate,
            s.http
                .post(s.url("/access/users"))
                .form(&[("userid", "ops@pve")]),
        ),
        (
            RouteId::TokenCreate,
            s.http.post(s.url("/access/users/ops@pve/token/ci")),
        ),
        (
            RouteId::RoleCreate,
            s.http
                .post(s.url("/access/roles"))
                .form(&[("roleid", "Ops"), ("privs", "VM.Audit")]),
        ),
        (
            RouteId::AclPut,
            s.http.put(s.url("/access/acl")).form(&[
                ("path", "/vms"),
                ("roles", "Ops"),
                ("tokens", "ops@pve!ci"),
            ]),
        ),
        (
            RouteId::PoolCreate,
            s.http
                .post(s.url("/pools"))
                .form(&[("poolid", "p1"), ("comment", "a comment")]),
        ),
        (
            RouteId::PoolUpdate,
            s.http
                .put(s.url("/pools"))
                .form(&[("poolid", "p1"), ("vms", "100")]),
        ),
        (RouteId::PoolIndex, s.http.get(s.url("/pools"))),
        (RouteId::PoolIndex, s.http.get(s.url("/pools?poolid=p1"))),
        (RouteId::PoolRead, s.http.get(s.url("/pools/p1"))),
        (
            RouteId::PoolUpdateById,
            s.http
                .put(s.url("/pools/p1"))
                .form(&[("vms", "100"), ("delete", "1")]),
        ),
        (RouteId::PoolDeleteById, s.http.delete(s.url("/pools/p1"))),
        (
            RouteId::PoolCreate,
            s.http.post(s.url("/pools")).form(&[("poolid", "p2")]),
        ),
        (
            RouteId::PoolDelete,
            s.http.delete(s.url("/pools?poolid=p2")),
        ),
        (RouteId::TicketGet, s.http.get(s.url("/access/ticket"))),
        (
            RouteId::TicketPost,
            s.http
                .post(s.url("/access/ticket"))
                .form(&[("username", "root@pam"), ("password", common::PASSWORD)]),
        ),
    ];
    for (id, req) in checks {
        let route = routes().iter().find(|r| r.id == id).unwrap();
        let here = format!("{} {}", route.method, route.path);
        let r = s
            .send(req.header("Authorization", format!("PVEAPIToken={TOKEN}")))
            .await;
        assert_eq!(r.status, 200, "{here}: {}", r.raw);
        let returns = &method_info(&index, route.path, route.method)["returns"];
        assert_eq!(
            type_of(r.data()),
            returns["type"].as_str().unwrap_or("null"),
            "{here}: {}",
            r.raw
        );
        match r.data() {
            Value::Array(items) => items
                .iter()
                .for_each(|i| check_fields(&here, id, &returns["items"], i)),
            v => check_fields(&here, id, returns, v),
        }
        if let Value::String(upid) = r.data()
            && route.is_async()
        {
            s.wait(upid).await;
        }
    }
    // The schema's one documented lie: nextid says integer, sends a string.
    let r = s.get("/cluster/nextid").await;
    assert_eq!(
        method_info(&index, "/cluster/nextid", "GET")["returns"]["type"],
        "integer"
    );
    assert!(r.data().is_string());
}

/// Each route's permission check is the schema's `permissions`: a `perm`
/// check with the same path, privileges and `any`, `user => 'all'` or
/// `'world'`, or a compound check the handler makes.
#[test]
fn every_route_checks_the_schemas_permissions() {
    use pve_sim::routes::{Perm, permission};
    let Some(index) = schema() else { return };
    for route in routes() {
        let here = format!("{} {}", route.method, route.path);
        let perms = &method_info(&index, route.path, route.method)["permissions"];
        let declared = permission(route.id);
        let check = perms["check"].as_array();
        match (check, perms["user"].as_str()) {
            (Some(c), _) if c[0] == "perm" => {
                let privs: Vec<&str> = c[2]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap())
                    .collect();
                let any = c.get(3).is_some_and(|a| a == "any");
                let Perm::Check {
                    path,
                    privs: got,
                    any: got_any,
                } = declared
                else {
                    panic!("{here}: declared {declared:?}, the schema has a perm check");
                };
                assert_eq!(
                    (path, got.to_vec(), got_any),
                    (c[1].as_str().unwrap(), privs, any),
                    "{here}"
                );
            }
            (Some(_), _) => assert_eq!(declared, Perm::Compound, "{here}"),
            (None, Some("all")) => assert_eq!(declared, Perm::All, "{here}"),
            (None, Some("world")) => assert_eq!(declared, Perm::World, "{here}"),
            other => panic!("{here}: unexpected permissions {other:?}"),
        }
    }
}
