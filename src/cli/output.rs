//! `output`: the fleet's VMs as the cluster has them.

use std::path::Path;

use super::session::{LockUse, session};
use super::{Failure, Output};
use crate::plan;

pub async fn cmd_output(fleet: &Path, lock: &Path, sim: bool, out: &Output) -> Result<u8, Failure> {
    let s = session(fleet, lock, true, sim, LockUse::Report, out).await?;
    let mut rows = Vec::new();
    for (vm, stamp) in plan::owned(&s.live, &s.loaded.fleet.fleet) {
        let name = stamp.resource.clone();
        let config = vm.config.as_ref().map(|c| &c.values);
        let mut ip = config
            .and_then(|c| c.get("ipconfig0"))
            .and_then(|v| pve_api::property::IpConfig::parse(v).ip)
            .filter(|ip| ip != "dhcp")
            .map(|ip| ip.split('/').next().unwrap_or(&ip).to_owned());
        if ip.is_none() && vm.running == Some(true) {
            ip = s
                .conn
                .client
                .agent_interfaces(&vm.node, vm.vmid)
                .await
                .ok()
                .and_then(|ifaces| {
                    ifaces
                        .into_iter()
                        .filter(|i| i.name != "lo")
                        .flat_map(|i| i.ip_addresses)
                        .find(|a| a.kind == "ipv4" && !a.ip_address.starts_with("169.254."))
                        .map(|a| a.ip_address)
                });
        }
        rows.push(serde_json::json!({
            "address": name,
            "name": vm.name,
            "vmid": vm.vmid,
            "node": vm.node,
            "status": if vm.running == Some(true) { "running" } else { "stopped" },
            "ip": ip,
            "generation": stamp.generation,
        }));
    }
    if out.json {
        println!("{}", serde_json::to_string_pretty(&rows).expect("json"));
    } else {
        let text = |r: &serde_json::Value, key: &str| r[key].as_str().unwrap_or("-").to_owned();
        let width = rows
            .iter()
            .map(|r| text(r, "address").len())
            .max()
            .unwrap_or(0)
            .max(2);
        println!(
            "{:<width$} {:>9}  {:<10} {:<8} {:<16} generation",
            "vm", "vmid", "node", "status", "ip"
        );
        for r in &rows {
            println!(
                "{:<width$} {:>9}  {:<10} {:<8} {:<16} {}",
                text(r, "address"),
                r["vmid"].as_u64().unwrap_or_default(),
                text(r, "node"),
                text(r, "status"),
                text(r, "ip"),
                r["generation"]
                    .as_u64()
                    .map_or("-".to_owned(), |g| g.to_string())
            );
        }
    }
    Ok(0)
}
