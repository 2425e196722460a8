//! Who may make a request, and the `/access` routes that manage users,
//! tokens, roles and ACLs. Every request passes [`authorize`] before its
//! handler: the route's schema `permissions` (a `perm` check, or what a
//! compound or `user => 'all'` route checks in its code), with the 403
//! pve-common's `raise_perm_exc` builds.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::access::{AclEntry, Token, UgKind, all_privileges};
use crate::config::PropertyString;
use crate::handlers::Call;
use crate::params::split_list;
use crate::routes::{Perm, RouteId, permission};
use crate::state::{ApiError, ApiResult, State};

/// Fills `{name}` placeholders of a permission path from the parameters.
fn fill(template: &str, call: &Call) -> String {
    let mut path = template.to_owned();
    for (k, v) in call.params {
        path = path.replace(&format!("{{{k}}}"), v);
    }
    path
}

/// Checks the route's permissions for the caller.
pub fn authorize(state: &State, route: RouteId, call: &Call) -> Result<(), ApiError> {
    let who = call.who.authid.as_str();
    let access = &state.access;
    match permission(route) {
        Perm::World | Perm::All => {}
        Perm::Check { path, privs, any } => access.check(who, &fill(path, call), privs, any)?,
        Perm::Compound => match route {
            // `clone_vm`: VM.Clone on the source, VM.Allocate on the new
            // VMID, Datastore.AllocateSpace on a target storage.
            RouteId::Clone => {
                access.check(who, &fill("/vms/{vmid}", call), &["VM.Clone"], false)?;
                access.check(who, &fill("/vms/{newid}", call), &["VM.Allocate"], false)?;
                if call.params.contains_key("storage") {
                    let path = fill("/storage/{storage}", call);
                    access.check(who, &path, &["Datastore.AllocateSpace"], false)?;
                }
            }
            RouteId::DownloadUrl => {
                let path = fill("/storage/{storage}", call);
                access.check(who, &path, &["Datastore.AllocateTemplate"], false)?;
                let node = fill("/nodes/{node}", call);
                if access
                    .check(who, "/", &["Sys.Audit", "Sys.Modify"], false)
                    .is_err()
                {
                    access.check(who, &node, &["Sys.AccessNetwork"], false)?;
                }
            }
            // `userid-param`/`userid-group`: the realm's Realm.AllocateUser
            // and User.Modify on /access/groups; a user may make its own
            // tokens.
            RouteId::UserCreate | RouteId::TokenCreate => {
                let userid = call.params.get("userid").map(String::as_str);
                let own = route == RouteId::TokenCreate && userid == Some(who);
                if !own {
                    access.check(who, "/access/groups", &["User.Modify"], false)?;
                }
            }
            // `perm-modify`: Permissions.Modify on the path (or on /access
            // for /access paths).
            _ => {
                let path = call.params.get("path").cloned().unwrap_or_default();
                access.check(who, &path, &["Permissions.Modify"], false)?;
            }
        },
    }
    match route {
        RouteId::QemuCreate => create_privileges(state, call),
        RouteId::ConfigPost | RouteId::ConfigPut => config_privileges(state, call),
        _ => Ok(()),
    }
}

/// The privilege one config key needs: qemu-server `API2/Qemu.pm`
/// `$check_vm_modify_config_perm` and its option groups (drives need
/// Disk, or CDROM for media; cloud-init keys Cloudinit or Network).
fn key_privileges(key: &str, value: Option<&str>) -> (&'static [&'static str], bool) {
    let base = key.trim_end_matches(|c: char| c.is_ascii_digit());
    let cdrom = value.is_some_and(|v| v.contains("media=cdrom"));
    match base {
        _ if crate::config::is_drive_key(key) && cdrom => (&["VM.Config.CDROM"], false),
        _ if crate::config::is_drive_key(key) => (&["VM.Config.Disk"], false),
        "cores" | "cpu" | "cpulimit" | "cpuunits" | "numa" | "smp" | "sockets" | "vcpus" => {
            (&["VM.Config.CPU"], false)
        }
        "memory" | "balloon" | "shares" | "allow-ksm" => (&["VM.Config.Memory"], false),
        "acpi" | "hotplug" | "kvm" | "machine" | "scsihw" | "smbios" | "tablet" | "vga"
        | "watchdog" | "audio" | "rng" => (&["VM.Config.HWType"], false),
        "boot" | "bootdisk" | "vmstatestorage" => (&["VM.Config.Disk"], false),
        "net" => (&["VM.Config.Network"], false),
        "cicustom" | "cipassword" | "citype" | "ciuser" | "ciupgrade" | "nameserver"
        | "searchdomain" | "sshkeys" | "ipconfig" => {
            (&["VM.Config.Cloudinit", "VM.Config.Network"], true)
        }
        "freeze" => (&["VM.PowerMgmt"], false),
        _ => (&["VM.Config.Options"], false),
    }
}

fn check_keys<'a>(
    state: &State,
    call: &Call,
    keys: impl Iterator<Item = (&'a str, Option<&'a str>)>,
) -> Result<(), ApiError> {
    let who = call.who.authid.as_str();
    let vm_path = fill("/vms/{vmid}", call);
    for (key, value) in keys.filter(|(k, _)| *k != "tags" && !k.starts_with("unused")) {
        let (privs, any) = key_privileges(key, value);
        state.access.check(who, &vm_path, privs, any)?;
        // A new disk takes space: `$check_storage_access`.
        let storage = value
            .filter(|_| crate::config::is_drive_key(key))
            .and_then(|v| PropertyString::parse(v, "file").ok()?.head)
            .and_then(|f| f.split_once(':').map(|(s, _)| s.to_owned()));
        if let Some(storage) = storage {
            let path = format!("/storage/{storage}");
            state
                .access
                .check(who, &path, &["Datastore.AllocateSpace"], false)?;
        }
    }
    Ok(())
}

fn config_keys<'a>(call: &'a Call) -> impl Iterator<Item = (&'a str, Option<&'a str>)> {
    call.params
        .iter()
        .filter(|(k, _)| !crate::handlers::NON_CONFIG.contains(&k.as_str()) && *k != "force")
        .map(|(k, v)| (k.as_str(), Some(v.as_str())))
}

/// `create_vm`: VM.Allocate on the new VMID, then what each key needs.
fn create_privileges(state: &State, call: &Call) -> Result<(), ApiError> {
    let path = fill("/vms/{vmid}", call);
    state
        .access
        .check(&call.who.authid, &path, &["VM.Allocate"], false)?;
    check_keys(state, call, config_keys(call))
}

/// `update_vm_api`: what each set, deleted or reverted key needs.
fn config_privileges(state: &State, call: &Call) -> Result<(), ApiError> {
    let listed = |name: &str| -> Vec<&str> {
        call.params
            .get(name)
            .map(|d| split_list(d).collect())
            .unwrap_or_default()
    };
    let deleted = listed("delete").into_iter().chain(listed("revert"));
    check_keys(
        state,
        call,
        config_keys(call).chain(deleted.map(|k| (k, None))),
    )
}

/// What the `/access` routes do.
pub fn handle(state: &mut State, route: RouteId, call: &Call) -> ApiResult {
    let get = |k: &str| call.params.get(k).map(String::as_str);
    match route {
        RouteId::Permissions => permissions(state, call),
        RouteId::UserCreate => {
            let userid = get("userid").unwrap_or_default();
            if state.access.users.contains_key(userid) {
                return Err(ApiError::fail(format!(
                    "create user failed: user '{userid}' already exists"
                )));
            }
            state
                .access
                .users
                .insert(userid.to_owned(), BTreeMap::new());
            Ok(Value::Null)
        }
        RouteId::TokenCreate => {
            let (userid, name) = (
                get("userid").unwrap_or_default(),
                get("tokenid").unwrap_or_default(),
            );
            let tokens = state
                .access
                .users
                .get_mut(userid)
                .ok_or_else(|| ApiError::fail(format!("no such user ('{userid}')")))?;
            if tokens.contains_key(name) {
                return Err(ApiError::fail("Token already exists."));
            }
            let privsep = get("privsep") != Some("0");
            // `TokenConfig`'s secret is a random UUID.
            let secret = crate::state::new_uuid();
            tokens.insert(
                name.to_owned(),
                Token {
                    privsep,
                    secret: secret.clone(),
                },
            );
            Ok(json!({
                "full-tokenid": format!("{userid}!{name}"),
                "info": {"privsep": u8::from(privsep)},
                "value": secret,
            }))
        }
        RouteId::AclPut => acl_put(state, call),
        RouteId::RoleCreate => {
            let roleid = get("roleid").unwrap_or_default();
            if state.access.role_exists(roleid) {
                return Err(ApiError::fail(format!("role '{roleid}' already exists")));
            }
            let valid = all_privileges();
            let privs: BTreeSet<String> = get("privs")
                .map(split_list)
                .into_iter()
                .flatten()
                .map(str::to_owned)
                .collect();
            if let Some(bad) = privs.iter().find(|p| !valid.contains(p.as_str())) {
                return Err(ApiError::fail(format!("invalid privilege '{bad}'")));
            }
            state.access.roles.insert(roleid.to_owned(), privs);
            Ok(Value::Null)
        }
        _ => unreachable!("only /access routes come here"),
    }
}

/// `GET /access/permissions` (pve-access-control `API2/AccessControl.pm`
/// `permissions`): the caller's privileges (or another identity's, with
/// Sys.Audit on /access), on one path or on every path an ACL names,
/// each privilege mapped to its propagate flag (1).
fn permissions(state: &State, call: &Call) -> ApiResult {
    let who = call.who.authid.as_str();
    let target = call.params.get("userid").map_or(who, String::as_str);
    let own = target == who || target.split_once('!').is_some_and(|(u, _)| u == who);
    if !own {
        state.access.check(who, "/access", &["Sys.Audit"], false)?;
    }
    let paths: BTreeSet<String> = match call.params.get("path") {
        Some(p) => BTreeSet::from([p.clone()]),
        None => {
            let mut all: BTreeSet<String> =
                state.access.acl.iter().map(|e| e.path.clone()).collect();
            all.extend([
                "/".to_owned(),
                "/access".into(),
                "/nodes".into(),
                "/storage".into(),
                "/vms".into(),
            ]);
            all
        }
    };
    let mut out = serde_json::Map::new();
    for path in paths {
        let privs: serde_json::Map<String, Value> = state
            .access
            .permissions(target, &path)
            .into_iter()
            .map(|p| (p, json!(1)))
            .collect();
        out.insert(path, Value::Object(privs));
    }
    Ok(Value::Object(out))
}

/// `PUT /access/acl`: adds (or with `delete=1` removes) each role for each
/// user and token on `path`.
fn acl_put(state: &mut State, call: &Call) -> ApiResult {
    let get = |k: &str| call.params.get(k).map(String::as_str);
    let path = get("path").unwrap_or_default().to_owned();
    let propagate = get("propagate") != Some("0");
    let delete = get("delete") == Some("1");
    let mut who: Vec<(UgKind, String)> = Vec::new();
    for u in get("users").map(split_list).into_iter().flatten() {
        if !state.access.users.contains_key(u) && u != "root@pam" {
            return Err(ApiError::fail(format!("user '{u}' does not exist")));
        }
        who.push((UgKind::User, u.to_owned()));
    }
    for t in get("tokens").map(split_list).into_iter().flatten() {
        if state.access.token(t).is_none() {
            return Err(ApiError::fail(format!("no such token '{t}'")));
        }
        who.push((UgKind::Token, t.to_owned()));
    }
    if who.is_empty() {
        return Err(ApiError::fail(
            "either 'users', 'groups' or 'tokens' is required",
        ));
    }
    for role in get("roles").map(split_list).into_iter().flatten() {
        if !state.access.role_exists(role) {
            return Err(ApiError::fail(format!("role '{role}' does not exist")));
        }
        for (kind, ugid) in &who {
            state.access.acl.retain(|e| {
                !(e.path == path && e.kind == *kind && e.ugid == *ugid && e.role == role)
            });
            if !delete {
                state.access.acl.push(AclEntry {
                    path: path.clone(),
                    kind: *kind,
                    ugid: ugid.clone(),
                    role: role.to_owned(),
                    propagate,
                });
            }
        }
    }
    Ok(Value::Null)
}
