//! VMs from a `terraform.tfstate` (format 4) of the bpg provider
//! (`proxmox_virtual_environment_vm`) or the Telmate provider
//! (`proxmox_vm_qemu`). A state holds the VMs' passwords in plaintext;
//! they are never copied, a VM with one gets an env reference instead.

use serde_json::{Map, Value, json};

use super::classic::Found;
use super::{cloud_init_network, key, password_env};

/// Every managed VM resource instance of either provider.
pub fn vms(state: &Value, file: &str) -> Found {
    let mut found = Found::default();
    let resources = state["resources"].as_array().cloned().unwrap_or_default();
    for r in resources.iter().filter(|r| r["mode"] == "managed") {
        let convert: fn(&Value, &mut Found, &str) = match r["type"].as_str() {
            Some("proxmox_virtual_environment_vm") => bpg,
            Some("proxmox_vm_qemu") => telmate,
            _ => continue,
        };
        for instance in r["instances"].as_array().into_iter().flatten() {
            convert(&instance["attributes"], &mut found, file);
        }
    }
    found.notes.push(format!(
        "{file}: after `nixgold import`, stop Terraform managing these VMs with `terraform state rm` (see the README), or its next apply fights nixgold"
    ));
    found
}

/// The first element of a nested block list (`cpu[0]`).
fn first<'a>(v: &'a Value, key: &str) -> &'a Value {
    &v[key][0]
}

fn u32_of(v: &Value) -> Option<u32> {
    v.as_u64()
        .or_else(|| v.as_str()?.parse().ok())
        .and_then(|n| u32::try_from(n).ok())
}

fn password(found: &mut Found, file: &str, vm: &mut Map<String, Value>, name: &str) {
    let env = password_env(name);
    vm.insert("password".into(), json!({ "env": env }));
    found.notes.push(format!(
        "{file}: vm.{name} has a password in the state (plaintext); it was not copied: the fleet reads env {env}"
    ));
}

fn bpg(a: &Value, found: &mut Found, file: &str) {
    let name = key(a["name"].as_str().unwrap_or("vm"));
    let mut vm = Map::new();
    if let Some(node) = a["node_name"].as_str() {
        found.node.get_or_insert_with(|| node.to_owned());
        vm.insert("node".into(), json!(node));
    }
    let clone = first(a, "clone");
    if let Some(t) = u32_of(&clone["vm_id"]) {
        found.template.get_or_insert_with(|| t.to_string());
    }
    vm.insert(
        "clone".into(),
        json!(if clone["full"] == false {
            "linked"
        } else {
            "full"
        }),
    );
    if let Some(c) = first(a, "cpu")["cores"].as_u64() {
        vm.insert("cores".into(), json!(c));
    }
    if let Some(m) = first(a, "memory")["dedicated"].as_u64() {
        vm.insert("memory".into(), json!(m));
    }
    if let Some(gb) = first(a, "disk")["size"].as_u64() {
        vm.insert("disk".into(), json!(format!("{gb}G")));
    }
    let init = first(a, "initialization");
    let ipv4 = &init["ip_config"][0]["ipv4"][0];
    let mut network = Map::new();
    match ipv4["address"].as_str().filter(|ip| *ip != "dhcp") {
        Some(ip) => {
            network.insert("ip".into(), json!(ip));
            if let Some(gw) = ipv4["gateway"].as_str().filter(|g| !g.is_empty()) {
                network.insert("gateway".into(), json!(gw));
            }
            if let Some(servers) = init["dns"][0]["servers"].as_array() {
                network.insert("dns".into(), json!(servers));
            }
        }
        None => {
            network.insert("dhcp".into(), json!(true));
        }
    }
    let nic = first(a, "network_device");
    if let Some(bridge) = nic["bridge"].as_str() {
        found.bridge.get_or_insert_with(|| bridge.to_owned());
    }
    if let Some(tag) = nic["vlan_id"].as_u64().filter(|t| *t > 0) {
        network.insert("vlan".into(), json!(tag));
    }
    vm.insert("network".into(), Value::Object(network));
    let user = &init["user_account"][0];
    if let Some(u) = user["username"].as_str() {
        vm.insert("user".into(), json!(u));
    }
    if let Some(keys) = user["keys"].as_array().filter(|k| !k.is_empty()) {
        vm.insert("ssh_keys".into(), json!(keys));
    }
    if user["password"].as_str().is_some_and(|p| !p.is_empty()) {
        password(found, file, &mut vm, &name);
    }
    if let Some(tags) = a["tags"].as_array().filter(|t| !t.is_empty()) {
        vm.insert("tags".into(), json!(tags));
    }
    if let Some(d) = a["description"].as_str().filter(|d| !d.trim().is_empty()) {
        vm.insert("description".into(), json!(d.trim_end()));
    }
    if let Some(b) = a["on_boot"].as_bool() {
        vm.insert("onboot".into(), json!(b));
    }
    if let Some(b) = a["started"].as_bool() {
        vm.insert("start".into(), json!(b));
    }
    found.vms.push((name, u32_of(&a["vm_id"]), vm));
}

fn telmate(a: &Value, found: &mut Found, file: &str) {
    let name = key(a["name"].as_str().unwrap_or("vm"));
    let mut vm = Map::new();
    if let Some(node) = a["target_node"].as_str() {
        found.node.get_or_insert_with(|| node.to_owned());
        vm.insert("node".into(), json!(node));
    }
    if let Some(t) = a["clone"].as_str() {
        found.template.get_or_insert_with(|| t.to_owned());
    }
    vm.insert(
        "clone".into(),
        json!(if a["full_clone"] == false {
            "linked"
        } else {
            "full"
        }),
    );
    if let Some(c) = a["cores"].as_u64() {
        vm.insert("cores".into(), json!(c));
    }
    if let Some(m) = a["memory"].as_u64() {
        vm.insert("memory".into(), json!(m));
    }
    let network = cloud_init_network(
        a["ipconfig0"].as_str(),
        a["nameserver"].as_str(),
        a["searchdomain"].as_str(),
    );
    if let Some(bridge) = first(a, "network")["bridge"].as_str() {
        found.bridge.get_or_insert_with(|| bridge.to_owned());
    }
    vm.insert("network".into(), Value::Object(network));
    if let Some(u) = a["ciuser"].as_str().filter(|u| !u.is_empty()) {
        vm.insert("user".into(), json!(u));
    }
    if let Some(keys) = a["sshkeys"].as_str() {
        let keys: Vec<&str> = keys
            .lines()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .collect();
        vm.insert("ssh_keys".into(), json!(keys));
    }
    if a["cipassword"].as_str().is_some_and(|p| !p.is_empty()) {
        password(found, file, &mut vm, &name);
    }
    if let Some(tags) = a["tags"].as_str().filter(|t| !t.is_empty()) {
        let tags: Vec<&str> = tags.split([';', ',']).filter(|t| !t.is_empty()).collect();
        vm.insert("tags".into(), json!(tags));
    }
    if let Some(b) = a["onboot"].as_bool() {
        vm.insert("onboot".into(), json!(b));
    }
    found.vms.push((name, u32_of(&a["vmid"]), vm));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Telmate `proxmox_vm_qemu` instance as its provider stores it
    /// (attribute names of the provider's schema, v2/v3).
    #[test]
    fn a_telmate_state_converts_its_vms_without_their_password() {
        let state = json!({
            "version": 4,
            "resources": [{
                "mode": "managed",
                "type": "proxmox_vm_qemu",
                "name": "db",
                "instances": [{ "attributes": {
                    "name": "db-01", "target_node": "pve2", "vmid": 201,
                    "clone": "nixos-golden-template", "full_clone": false,
                    "cores": 4, "memory": 8192,
                    "ipconfig0": "ip=10.0.0.21/24,gw=10.0.0.1", "nameserver": "10.0.0.1",
                    "ciuser": "ops", "cipassword": "telmate-pw-0006",
                    "sshkeys": "ssh-ed25519 AAAA ops@example\n",
                    "tags": "db;prod", "onboot": true,
                    "network": [{ "bridge": "vmbr1", "model": "virtio" }]
                }}]
            }]
        });
        let found = vms(&state, "terraform.tfstate");
        let text = serde_json::to_string(&found.vms).unwrap();
        assert!(!text.contains("telmate-pw-0006"), "{text}");
        assert!(!found.notes.join("\n").contains("telmate-pw-0006"));
        let (name, vmid, vm) = &found.vms[0];
        assert_eq!((name.as_str(), *vmid), ("db-01", Some(201)));
        assert_eq!(vm["clone"], "linked");
        assert_eq!(vm["password"], json!({ "env": "DB_01_PASSWORD" }));
        assert_eq!(
            vm["network"],
            json!({ "ip": "10.0.0.21/24", "gateway": "10.0.0.1", "dns": ["10.0.0.1"] })
        );
        assert_eq!(vm["tags"], json!(["db", "prod"]));
        assert_eq!(found.template.as_deref(), Some("nixos-golden-template"));
        assert_eq!(found.bridge.as_deref(), Some("vmbr1"));
    }
}
