//! Decoding of real Proxmox responses from PVE 6 to 9, recorded in
//! `../shared/pve-api/recorded/` (third-party data: read in place, never
//! copied; the test says so and skips where it is absent). Every recorded
//! file must be understood — a new kind of file fails the test until it is.

use std::path::{Path, PathBuf};

use pve_api::types::{
    ClusterResource, GuestInterface, LogLine, Node, StorageInfo, TaskStatus, Version, VmConfig,
    VmStatus, Volume, decode_agent_interfaces,
};
use pve_api::{ApiError, Upid};
use serde_json::Value;

fn recorded_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("NIXGOLD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
        .join("pve-api/recorded");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: {} not found (set NIXGOLD_SHARED to the shared/ folder)",
            dir.display()
        );
        None
    }
}

/// The status line recorded for `file` in INDEX.md ("500 Configuration …").
fn recorded_status(index: &str, file: &str) -> Option<(u16, String)> {
    let row = index
        .lines()
        .find(|l| l.starts_with(&format!("| `{file}`")))?;
    let cell = row.split('|').nth(7)?.trim();
    let (code, rest) = cell.split_once(' ').unwrap_or((cell, ""));
    let code: u16 = code.parse().ok()?;
    // Drop the " (Content-Length N)" note, keep parentheses of the reason.
    let reason = match rest.rfind(" (Content-Length") {
        Some(i) => &rest[..i],
        None => rest,
    };
    let reason = reason.trim().to_owned();
    Some((code, reason))
}

fn data<T: serde::de::DeserializeOwned>(body: &Value, file: &str) -> T {
    serde_json::from_value(body["data"].clone()).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn every_recorded_response_decodes() {
    let Some(dir) = recorded_dir() else { return };
    let index = std::fs::read_to_string(dir.join("INDEX.md")).unwrap();
    let mut files = Vec::new();
    for version in ["6", "7", "8", "9"] {
        for entry in std::fs::read_dir(dir.join(version)).unwrap() {
            files.push(format!(
                "{version}/{}",
                entry.unwrap().file_name().to_string_lossy()
            ));
        }
    }
    files.sort();
    assert!(files.len() >= 80, "{} recorded files", files.len());
    for file in &files {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        let name = file.split('/').nth(1).unwrap().split("--").next().unwrap();
        match name {
            n if n.starts_with("error-") => {
                let (status, reason) =
                    recorded_status(&index, file).unwrap_or((500, String::new()));
                let status = if n.starts_with("error-400") {
                    400
                } else if n.starts_with("error-401") {
                    401
                } else {
                    status
                };
                let e = ApiError::from_body(status, &reason, &bytes);
                check_error(file, &e);
            }
            n if n.starts_with("cluster-resources") => {
                let items: Vec<ClusterResource> = data(&body, file);
                assert!(!items.is_empty(), "{file}");
                for r in items.iter().filter(|r| r.kind == "qemu") {
                    assert!(r.vmid.is_some() && r.node.is_some(), "{file}: {r:?}");
                }
            }
            n if n.starts_with("cluster-nextid") => {
                assert!(
                    body["data"].as_str().unwrap().parse::<u32>().is_ok(),
                    "{file}"
                );
            }
            n if n.starts_with("qemu-config") => {
                let c: VmConfig = data(&body, file);
                // SHA-1 hex (one LOW-confidence sample carries a hand-made
                // 42-digit value, see INDEX.md).
                assert!(
                    !c.digest.is_empty() && c.digest.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{file}"
                );
            }
            n if n.starts_with("task-status") => {
                let t: TaskStatus = data(&body, file);
                let upid: Upid = t.upid.parse().unwrap_or_else(|e| panic!("{file}: {e}"));
                assert_eq!(upid.to_string(), t.upid, "{file}: UPIDs round-trip");
                if t.is_running() {
                    assert!(t.exitstatus.is_none(), "{file}");
                } else {
                    assert_eq!(
                        t.succeeded(),
                        t.exitstatus.as_deref() == Some("OK"),
                        "{file}"
                    );
                }
            }
            n if n.starts_with("task-log") => {
                let lines: Vec<LogLine> = data(&body, file);
                assert_eq!(lines[0].n, 1, "{file}");
            }
            n if n.starts_with("version") || n.starts_with("node-version") => {
                let v: Version = data(&body, file);
                assert!(!v.version.is_empty(), "{file}");
            }
            n if n.starts_with("nodes") => {
                let nodes: Vec<Node> = data(&body, file);
                assert!(!nodes.is_empty(), "{file}");
            }
            n if n.starts_with("qemu-status-current") => {
                let s: VmStatus = data(&body, file);
                assert!(matches!(s.status.as_str(), "running" | "stopped"), "{file}");
            }
            n if n.starts_with("qemu-list") => {
                // Not a client type; a list of VMs with (string or int) vmids.
                for vm in body["data"].as_array().unwrap() {
                    let v: VmStatus = serde_json::from_value(vm.clone())
                        .unwrap_or_else(|e| panic!("{file}: {e}"));
                    assert!(v.vmid.is_some(), "{file}");
                }
            }
            n if n.starts_with("storage-content") => {
                let vols: Vec<Volume> = data(&body, file);
                assert!(vols.iter().all(|v| v.volid.contains(':')), "{file}");
            }
            n if n.starts_with("storage-list") => {
                let _: Vec<StorageInfo> = data(&body, file);
            }
            n if n.starts_with("agent-network-get-interfaces") => {
                match decode_agent_interfaces(body["data"].clone()) {
                    Ok(ifaces) => assert!(ifaces.iter().any(|i| i.name == "lo"), "{file}"),
                    Err(e) => assert!(
                        n.ends_with("unsupported") && e.to_string().contains("guest agent"),
                        "{file}: {e}"
                    ),
                }
            }
            n if n.ends_with("-upid") => {
                let upid: Upid = body["data"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
                assert_eq!(upid.to_string(), body["data"].as_str().unwrap());
            }
            n if n.starts_with("access-ticket") => {
                assert!(
                    body["data"]["ticket"].as_str().unwrap().starts_with("PVE:"),
                    "{file}"
                );
                assert!(body["data"]["CSRFPreventionToken"].is_string(), "{file}");
            }
            other => panic!("{file}: no decoder for recorded endpoint {other:?}"),
        }
    }
}

fn check_error(file: &str, e: &ApiError) {
    let name = file.split('/').nth(1).unwrap();
    let ok = match name {
        n if n.starts_with("error-400") => {
            matches!(e, ApiError::Params { errors, .. } if !errors.is_empty())
        }
        n if n.starts_with("error-401") => matches!(e, ApiError::Auth { status: 401, .. }),
        n if n.contains("config-missing") => e.is_not_found(),
        n if n.contains("locked") => e.is_lock_contention(),
        n if n.contains("agent-not-running") => {
            e.to_string().contains("QEMU guest agent is not running")
        }
        _ => matches!(e, ApiError::Server { .. }),
    };
    assert!(ok, "{file}: classified as {e:?}");
}

#[test]
fn details_of_recorded_responses_survive_decoding() {
    let Some(dir) = recorded_dir() else { return };
    let read = |f: &str| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join(f)).unwrap()).unwrap()
    };
    // PVE 9: memory as a string property, integers as numbers, sshkeys encoded.
    let c: VmConfig = data(&read("9/qemu-config--lnvps-api.json"), "9/qemu-config");
    assert_eq!(c.memory_mib(), Some(4096));
    assert_eq!(c.get("cores"), Some("4"));
    let keys = pve_api::property::decode_sshkeys(c.get("sshkeys").unwrap());
    assert!(keys[0].starts_with("ssh-ed25519 AAAAC3"), "{keys:?}");
    let net = pve_api::property::Net::parse(c.get("net0").unwrap());
    assert_eq!(net.mac.as_deref(), Some("BC:24:11:4E:8F:D1"));
    // A token-started task: bare user plus tokenid, lock timeout as exit.
    let t: TaskStatus = data(
        &read("8/task-status-stopped-token-error--bpg-tpp-1255.json"),
        "task",
    );
    assert_eq!(
        (t.user.as_str(), t.tokenid.as_deref()),
        ("terraform@pve", Some("provider"))
    );
    assert!(!t.succeeded());
    let upid: Upid = t.upid.parse().unwrap();
    assert_eq!(upid.user, "terraform@pve!provider");
    let as_task_error = ApiError::Task {
        upid: t.upid.clone(),
        exitstatus: t.exitstatus.clone().unwrap(),
        log_tail: vec![],
    };
    assert!(as_task_error.is_lock_contention());
    // PVE 6: vmid as a string, template as "" — still decoded.
    let list = read("6/qemu-list--fog-proxmox.json");
    let vm: VmStatus = serde_json::from_value(list["data"][0].clone()).unwrap();
    assert_eq!((vm.vmid, vm.template), (Some(100), false));
    // ctime as a string in PVE 6 storage content.
    let vols: Vec<Volume> = data(
        &read("6/storage-content-images--fog-proxmox.json"),
        "content",
    );
    assert_eq!(vols[0].ctime, Some(1_606_311_524));
    // Agent interfaces without addresses omit `ip-addresses`.
    let ifaces: Vec<GuestInterface> = decode_agent_interfaces(
        read("8/agent-network-get-interfaces--france-nuage-plateforme.json")["data"].clone(),
    )
    .unwrap();
    assert!(ifaces.iter().any(|i| i.name == "lo"));
    // Old error form: only {"data":null}; the message is the reason phrase.
    let e = ApiError::from_body(
        500,
        "Configuration file 'nodes/pve/qemu-server/101.conf' does not exist",
        &std::fs::read(dir.join("6/error-500-config-missing--fog-proxmox.json")).unwrap(),
    );
    assert_eq!(
        e.to_string(),
        "not found: Configuration file 'nodes/pve/qemu-server/101.conf' does not exist"
    );
}
