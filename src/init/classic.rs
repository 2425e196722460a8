//! Converting the classic NixOS golden-image setup: Packer's
//! `*.pkrvars.hcl` (+ `http/configuration.nix` beside it) for the template,
//! Terraform's `terraform.tfvars` or a `terraform.tfstate` of the bpg
//! (`proxmox_virtual_environment_vm`) or Telmate (`proxmox_vm_qemu`)
//! provider for the VMs.
//!
//! Variable files are parsed with a real HCL parser (`hcl-rs`). Variable
//! names differ between setups, so each value is looked up under the names
//! the common templates use. What cannot be carried over is turned into
//! its safe form and listed: a plaintext secret becomes an env reference
//! (its value is never read into the draft), `skip_tls_verify` a note to
//! pin the certificate (never `insecure`).

use std::path::Path;

use serde_json::{Map, Value, json};

use super::{key, password_env};

/// What one variable file or state says; every field optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Found {
    pub endpoint: Option<String>,
    pub node: Option<String>,
    pub storage: Option<String>,
    pub bridge: Option<String>,
    /// (image key, template VMID, image entry without `iso`/`nixos`).
    pub image: Option<(String, Option<u32>, Map<String, Value>)>,
    pub iso: Option<(String, String)>,
    pub iso_storage: Option<String>,
    /// The image's raw Nix and its `system.stateVersion`.
    pub extra_config: Option<String>,
    pub state_version: Option<String>,
    /// The template VMs are cloned from (name), for the draft's `image`.
    pub template: Option<String>,
    /// (VM key, VMID, entry).
    pub vms: Vec<(String, Option<u32>, Map<String, Value>)>,
    pub notes: Vec<String>,
}

/// Reads an HCL variable file as JSON values.
fn read_hcl(path: &Path) -> Result<Map<String, Value>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    hcl::from_str::<Map<String, Value>>(&text)
        .map_err(|e| format!("{}: not a variable file: {e}", path.display()))
}

/// The first of `names` that is set.
fn pick<'a>(vars: &'a Map<String, Value>, names: &[&str]) -> Option<(&'a str, &'a Value)> {
    names
        .iter()
        .find_map(|n| vars.get_key_value(*n).map(|(k, v)| (k.as_str(), v)))
}

fn text(vars: &Map<String, Value>, names: &[&str]) -> Option<String> {
    pick(vars, names).and_then(|(_, v)| match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

fn int(vars: &Map<String, Value>, names: &[&str]) -> Option<u64> {
    pick(vars, names).and_then(|(_, v)| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
}

/// `https://host:8006/api2/json` → `https://host:8006`.
fn endpoint(url: &str) -> String {
    let url = url.trim_end_matches('/').trim_end_matches("/api2/json");
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("https://{url}:8006")
    }
}

/// A disk size as the fleet writes it (`30G`), from `30G`, `30GB`, `32768M`.
fn disk(size: &str) -> Option<String> {
    let s = size.trim().trim_end_matches('B').trim_end_matches('i');
    let bytes = pve_api::property::parse_size(s)?;
    Some(pve_api::property::format_size(bytes))
}

/// The connection part shared by Packer and Terraform variables, with its
/// secrets turned into references and TLS into a pinning note.
fn connection(vars: &Map<String, Value>, found: &mut Found, file: &str) {
    found.endpoint = text(
        vars,
        &[
            "proxmox_url",
            "proxmox_api_url",
            "proxmox_endpoint",
            "pm_api_url",
            "proxmox_host",
        ],
    )
    .map(|u| endpoint(&u));
    found.node = text(vars, &["proxmox_node", "target_node", "node", "node_name"]);
    let secrets = [
        "proxmox_password",
        "proxmox_token",
        "proxmox_api_token_secret",
        "proxmox_api_token",
        "pm_password",
        "pm_api_token_secret",
        "proxmox_api_password",
    ];
    for name in secrets {
        if vars
            .get(name)
            .is_some_and(|v| v.as_str().is_some_and(|s| !s.is_empty()))
        {
            let reference = if name.contains("token") {
                "the API token (`user@realm!id=secret`) in env PROXMOX_VE_API_TOKEN"
            } else {
                "env PROXMOX_VE_PASSWORD (with PROXMOX_VE_USERNAME)"
            };
            found.notes.push(format!(
                "{file}: `{name}` holds a plaintext secret; it was not copied: the fleet reads {reference}"
            ));
        }
    }
    let insecure = [
        "proxmox_skip_tls_verify",
        "proxmox_insecure",
        "insecure_skip_tls_verify",
        "proxmox_tls_insecure",
        "pm_tls_insecure",
    ];
    if let Some((name, _)) = insecure.iter().find_map(|n| {
        vars.get_key_value(*n)
            .filter(|(_, v)| v.as_bool() == Some(true) || v.as_str() == Some("true"))
    }) {
        found.notes.push(format!(
            "{file}: `{name} = true` turned TLS verification off; nixgold does not: pin the certificate with proxmox.tls.fingerprint (`openssl s_client -connect HOST:8006 </dev/null | openssl x509 -noout -fingerprint -sha256`, or --fingerprint)"
        ));
    }
}

/// `--from-packer FILE.pkrvars.hcl`: the template as an image.
pub fn packer(path: &Path) -> Result<Found, String> {
    let vars = read_hcl(path)?;
    let file = path.display().to_string();
    let mut found = Found::default();
    connection(&vars, &mut found, &file);
    let name =
        key(&text(&vars, &["vm_name", "template_name", "name"]).unwrap_or_else(|| "nixos".into()));
    let vmid = int(&vars, &["vm_id", "vmid", "template_vmid", "template_id"])
        .and_then(|v| u32::try_from(v).ok());
    let mut hw = Map::new();
    if let Some(c) = int(&vars, &["cores", "cpu_cores", "vm_cores"]) {
        hw.insert("cores".into(), json!(c));
    }
    if let Some(s) = int(&vars, &["sockets", "cpu_sockets"]) {
        hw.insert("sockets".into(), json!(s));
    }
    if let Some(m) = int(&vars, &["memory", "vm_memory", "ram"]) {
        hw.insert("memory".into(), json!(m));
    }
    if let Some(d) = text(&vars, &["disk_size", "vm_disk_size"]).and_then(|d| disk(&d)) {
        hw.insert("disk".into(), json!(d));
    }
    found.storage = text(
        &vars,
        &["storage_pool", "disk_storage_pool", "vm_storage", "storage"],
    );
    found.bridge = text(&vars, &["bridge", "network_bridge", "vm_bridge"]);
    if let Some(cpu) = text(&vars, &["cpu_type", "cpu"]) {
        hw.insert("cpu".into(), json!(cpu));
    }
    found.iso_storage = text(&vars, &["iso_storage_pool", "iso_storage"]);
    let checksum =
        text(&vars, &["iso_checksum"]).map(|c| c.trim_start_matches("sha256:").to_owned());
    if let (Some(url), Some(sha)) = (
        text(&vars, &["iso_url", "iso_file_url"]),
        checksum.filter(|c| c.len() == 64),
    ) {
        found.iso = Some((url, sha));
    }
    if text(&vars, &["ssh_password", "build_password"]).is_some() {
        found.notes.push(format!(
            "{file}: the build's SSH password is not needed and was not copied: nixgold reaches the installer with a per-build key"
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let config = dir.join("http").join("configuration.nix");
    if let Ok(nix) = std::fs::read_to_string(&config) {
        let (body, state_version) = module_body(&nix);
        found.notes.push(format!(
            "{}: its settings became images.{name}.nixos.extra_config (imports and system.stateVersion left out: nixgold writes those)",
            config.display()
        ));
        found.extra_config = Some(body);
        found.state_version = state_version;
    }
    if dir.join("install.sh").exists() {
        found.notes.push(format!(
            "{}: replaced by nixgold's own install script (`nixgold render --image {name}` shows it)",
            dir.join("install.sh").display()
        ));
    }
    let mut image = Map::new();
    image.insert("hardware".into(), Value::Object(hw));
    found.image = Some((name, vmid, image));
    Ok(found)
}

/// The body of a NixOS module's attribute set, without `imports` and
/// `system.stateVersion` (returned apart).
pub fn module_body(nix: &str) -> (String, Option<String>) {
    use rnix::{NodeOrToken, SyntaxKind};
    let root = rnix::Root::parse(nix).syntax();
    let Some(set) = root
        .descendants()
        .find(|n| n.kind() == SyntaxKind::NODE_ATTR_SET)
    else {
        return (String::new(), None);
    };
    let mut lines = Vec::new();
    let mut state_version = None;
    for child in set.children_with_tokens() {
        match child {
            NodeOrToken::Token(t) if t.kind() == SyntaxKind::TOKEN_COMMENT => {
                lines.push(t.text().to_owned())
            }
            NodeOrToken::Node(n)
                if matches!(
                    n.kind(),
                    SyntaxKind::NODE_ATTRPATH_VALUE | SyntaxKind::NODE_INHERIT
                ) =>
            {
                let text = n.text().to_string();
                let path = n
                    .children()
                    .find(|c| c.kind() == SyntaxKind::NODE_ATTRPATH)
                    .map(|p| p.text().to_string())
                    .unwrap_or_default();
                if path == "system.stateVersion" {
                    state_version = text.split('"').nth(1).map(str::to_owned);
                } else if path != "imports" {
                    lines.push(text);
                }
            }
            _ => {}
        }
    }
    (lines.join("\n"), state_version)
}

/// `--from-terraform FILE`: VMs from a `.tfvars` or a `terraform.tfstate`.
pub fn terraform(path: &Path) -> Result<Found, String> {
    if path.extension().is_some_and(|e| e == "tfstate") {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let state: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a Terraform state: {e}", path.display()))?;
        return Ok(super::tfstate::vms(&state, &path.display().to_string()));
    }
    let vars = read_hcl(path)?;
    let file = path.display().to_string();
    let mut found = Found::default();
    connection(&vars, &mut found, &file);
    found.template = text(
        &vars,
        &["template_name", "clone_template", "template", "clone"],
    );
    found.bridge = text(&vars, &["bridge", "network_bridge", "vm_bridge"]);
    found.storage = text(&vars, &["storage", "storage_pool", "disk_storage"]);
    let shared = |vm: &mut Map<String, Value>, name: &str, found: &mut Found| {
        if let Some(keys) =
            pick(&vars, &["ssh_keys", "ssh_public_keys", "sshkeys"]).map(|(_, v)| keys_of(v))
        {
            vm.entry("ssh_keys").or_insert(json!(keys));
        }
        if let Some(user) = text(&vars, &["ci_user", "ciuser", "vm_user", "username"]) {
            vm.entry("user").or_insert(json!(user));
        }
        secret_password(&vars, vm, name, &file, found);
    };
    match vars.get("vms").and_then(Value::as_object) {
        Some(vms) => {
            for (name, spec) in vms {
                let Some(spec) = spec.as_object() else {
                    continue;
                };
                let (k, vmid, mut vm) = tf_vm(name, spec);
                secret_password(spec, &mut vm, &k, &file, &mut found);
                shared(&mut vm, &k, &mut found);
                found.vms.push((k, vmid, vm));
            }
        }
        None => {
            let name =
                text(&vars, &["vm_name", "name", "hostname"]).unwrap_or_else(|| "nixos".into());
            let (k, vmid, mut vm) = tf_vm(&name, &vars);
            shared(&mut vm, &k, &mut found);
            found.vms.push((k, vmid, vm));
        }
    }
    Ok(found)
}

/// A plaintext VM password becomes `{ env = "NAME_PASSWORD" }`.
fn secret_password(
    vars: &Map<String, Value>,
    vm: &mut Map<String, Value>,
    name: &str,
    file: &str,
    found: &mut Found,
) {
    let Some((var, _)) = pick(
        vars,
        &[
            "password",
            "ci_password",
            "cipassword",
            "vm_password",
            "user_password",
        ],
    ) else {
        return;
    };
    if vm.contains_key("password") {
        return;
    }
    let env = password_env(name);
    vm.insert("password".into(), json!({ "env": env }));
    found.notes.push(format!(
        "{file}: vm.{name}'s `{var}` is a plaintext password; it was not copied: the fleet reads env {env}"
    ));
}

fn keys_of(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a
            .iter()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect(),
        Value::String(s) => s
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// One VM of a tfvars map (or the top level of a single-VM tfvars).
fn tf_vm(name: &str, spec: &Map<String, Value>) -> (String, Option<u32>, Map<String, Value>) {
    let k = key(name);
    let vmid = int(spec, &["vmid", "vm_id", "id"]).and_then(|v| u32::try_from(v).ok());
    let mut vm = Map::new();
    if let Some(c) = int(spec, &["cores", "vm_cores", "cpu_cores"]) {
        vm.insert("cores".into(), json!(c));
    }
    if let Some(m) = int(spec, &["memory", "vm_memory"]) {
        vm.insert("memory".into(), json!(m));
    }
    if let Some(d) = text(spec, &["disk_size", "disk", "vm_disk_size"]).and_then(|d| disk(&d)) {
        vm.insert("disk".into(), json!(d));
    }
    let mut network = Map::new();
    match text(spec, &["ip", "ip_address", "ipv4_address", "address"]).filter(|ip| ip != "dhcp") {
        Some(ip) => {
            network.insert("ip".into(), json!(ip));
            if let Some(gw) = text(spec, &["gateway", "gw", "ipv4_gateway"]) {
                network.insert("gateway".into(), json!(gw));
            }
            if let Some((_, dns)) = pick(spec, &["dns", "nameservers", "dns_servers"]) {
                network.insert("dns".into(), json!(keys_of(dns)));
            }
        }
        None => {
            network.insert("dhcp".into(), json!(true));
        }
    }
    vm.insert("network".into(), Value::Object(network));
    if let Some((_, tags)) = pick(spec, &["tags"]) {
        let tags: Vec<String> = keys_of(tags)
            .iter()
            .flat_map(|t| t.split([';', ',']))
            .map(str::to_owned)
            .collect();
        vm.insert("tags".into(), json!(tags));
    }
    if let Some(b) =
        pick(spec, &["onboot", "on_boot", "start_on_boot"]).and_then(|(_, v)| v.as_bool())
    {
        vm.insert("onboot".into(), json!(b));
    }
    (k, vmid, vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_modules_body_loses_imports_and_gives_its_state_version() {
        let nix = "# top\n{ config, pkgs, ... }:\n{\n  imports = [ ./hardware-configuration.nix ];\n  # keep me\n  services.nginx.enable = true;\n  inherit (pkgs) lib;\n  system.stateVersion = \"23.11\";\n}\n";
        let (body, version) = module_body(nix);
        assert_eq!(
            body,
            "# keep me\nservices.nginx.enable = true;\ninherit (pkgs) lib;"
        );
        assert_eq!(version.as_deref(), Some("23.11"));
    }

    #[test]
    fn endpoints_and_sizes_take_the_fleets_form() {
        assert_eq!(
            endpoint("https://10.0.0.1:8006/api2/json/"),
            "https://10.0.0.1:8006"
        );
        assert_eq!(endpoint("10.0.0.1"), "https://10.0.0.1:8006");
        assert_eq!(disk("32768M").as_deref(), Some("32G"));
        assert_eq!(disk("30GB").as_deref(), Some("30G"));
    }
}
