//! Proxmox's permission model, as pve-access-control implements it: users
//! and their API tokens (with or without privilege separation), roles (the
//! built-in ones `AccessControl.pm` `create_roles` derives from its
//! privilege groups, plus custom ones) and ACL entries on paths that
//! propagate down the tree. `root@pam` holds every privilege; a token
//! without `privsep` has its user's; a privilege-separated token has what
//! its own ACL entries give, intersected with its user's
//! (`RPCEnvironment.pm` `permissions`).
//!
//! Authentication is not here (`auth.rs`); this module answers "may this
//! identity do that on this path", and a failed check is the 403 that
//! pve-common's `raise_perm_exc` builds.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::state::ApiError;

/// `$privgroups` in `AccessControl.pm`: per category, the privileges of
/// the root-only, admin, user and audit levels.
const PRIVGROUPS: &[(&str, [&[&str]; 4])] = &[
    (
        "VM",
        [
            &[],
            &[
                "VM.Config.Disk",
                "VM.Config.CPU",
                "VM.Config.Memory",
                "VM.Config.Network",
                "VM.Config.HWType",
                "VM.Config.Options",
                "VM.Allocate",
                "VM.Clone",
                "VM.GuestAgent.Unrestricted",
                "VM.Migrate",
                "VM.Replicate",
                "VM.Snapshot",
                "VM.Snapshot.Rollback",
            ],
            &[
                "VM.Config.CDROM",
                "VM.Config.Cloudinit",
                "VM.Console",
                "VM.Backup",
                "VM.GuestAgent.FileRead",
                "VM.GuestAgent.FileSystemMgmt",
                "VM.GuestAgent.FileWrite",
                "VM.PowerMgmt",
            ],
            &["VM.Audit", "VM.GuestAgent.Audit"],
        ],
    ),
    (
        "Sys",
        [
            &[
                "Sys.PowerMgmt",
                "Sys.Modify",
                "Sys.Incoming",
                "Sys.AccessNetwork",
            ],
            &["Sys.Console", "Sys.Syslog"],
            &[],
            &["Sys.Audit"],
        ],
    ),
    (
        "Datastore",
        [
            &[],
            &["Datastore.Allocate", "Datastore.AllocateTemplate"],
            &["Datastore.AllocateSpace"],
            &["Datastore.Audit"],
        ],
    ),
    (
        "SDN",
        [
            &[],
            &["SDN.Allocate", "SDN.Audit"],
            &["SDN.Use"],
            &["SDN.Audit"],
        ],
    ),
    (
        "User",
        [
            &["Realm.Allocate"],
            &["User.Modify", "Group.Allocate", "Realm.AllocateUser"],
            &[],
            &[],
        ],
    ),
    (
        "Pool",
        [&[], &["Pool.Allocate"], &["Pool.Audit"], &["Pool.Audit"]],
    ),
    (
        "Mapping",
        [
            &[],
            &["Mapping.Modify"],
            &["Mapping.Use"],
            &["Mapping.Audit"],
        ],
    ),
];

/// Every valid privilege name (`$valid_privs`).
pub fn all_privileges() -> BTreeSet<&'static str> {
    let mut out: BTreeSet<&str> = PRIVGROUPS
        .iter()
        .flat_map(|(_, levels)| levels.iter().flat_map(|l| l.iter().copied()))
        .collect();
    out.insert("Permissions.Modify");
    out
}

/// The built-in roles, as `create_roles` derives them.
pub fn builtin_roles() -> BTreeMap<String, BTreeSet<&'static str>> {
    let mut roles: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    roles.insert("NoAccess".into(), BTreeSet::new());
    roles.insert("Administrator".into(), all_privileges());
    for (cat, [_, admin, user, audit]) in PRIVGROUPS {
        let below_root = admin.iter().chain(user.iter()).chain(audit.iter());
        for p in below_root {
            roles.entry(format!("PVE{cat}Admin")).or_default().insert(p);
            roles.entry("PVEAdmin".into()).or_default().insert(p);
        }
        if !user.is_empty() {
            for p in user.iter().chain(audit.iter()) {
                roles.entry(format!("PVE{cat}User")).or_default().insert(p);
            }
        }
        for p in *audit {
            roles.entry("PVEAuditor".into()).or_default().insert(p);
        }
    }
    if let Some(admin) = roles.get_mut("PVEAdmin") {
        admin.remove("Mapping.Modify");
    }
    roles.insert(
        "PVETemplateUser".into(),
        BTreeSet::from(["VM.Clone", "VM.Audit"]),
    );
    roles
}

/// Who an ACL entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UgKind {
    User,
    Token,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclEntry {
    pub path: String,
    pub kind: UgKind,
    /// `user@realm` or `user@realm!token`.
    pub ugid: String,
    pub role: String,
    pub propagate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub privsep: bool,
    /// The secret (a simulator keeps it to authenticate the token).
    pub secret: String,
}

/// `user.cfg`: users, their tokens, custom roles and the ACL.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessConfig {
    /// `user@realm` → its tokens by name.
    pub users: BTreeMap<String, BTreeMap<String, Token>>,
    /// Custom roles (built-in ones are not stored).
    pub roles: BTreeMap<String, BTreeSet<String>>,
    pub acl: Vec<AclEntry>,
}

/// A 403 with pve-common's text: `Permission check failed (what)`.
pub fn denied(what: &str) -> ApiError {
    ApiError::new(403, format!("Permission check failed ({what})"))
}

impl AccessConfig {
    fn role_privs(&self, role: &str) -> BTreeSet<String> {
        match self.roles.get(role) {
            Some(privs) => privs.clone(),
            None => builtin_roles()
                .remove(role)
                .map(|p| p.into_iter().map(str::to_owned).collect())
                .unwrap_or_default(),
        }
    }

    pub fn role_exists(&self, role: &str) -> bool {
        self.roles.contains_key(role) || builtin_roles().contains_key(role)
    }

    /// The token of `authid` (`user@realm!name`), if it exists.
    pub fn token(&self, authid: &str) -> Option<&Token> {
        let (user, name) = authid.split_once('!')?;
        self.users.get(user)?.get(name)
    }

    /// `AccessControl.pm` `roles`: walks `path` from `/`; at each level the
    /// token's own entries, else the user's, replace what was inherited,
    /// keeping only entries that propagate or sit on the path itself.
    fn roles(&self, ugid: &str, kind: UgKind, path: &str) -> BTreeMap<String, bool> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let mut roles = BTreeMap::new();
        for depth in 0..=parts.len() {
            let here = format!("/{}", parts[..depth].join("/"));
            let last = depth == parts.len();
            let set: BTreeMap<String, bool> = self
                .acl
                .iter()
                .filter(|e| e.kind == kind && e.ugid == ugid && e.path == here)
                .filter(|e| last || e.propagate)
                .map(|e| (e.role.clone(), e.propagate))
                .collect();
            if !set.is_empty() {
                roles = set;
            }
        }
        if roles.contains_key("NoAccess") {
            return BTreeMap::from([("NoAccess".to_owned(), roles["NoAccess"])]);
        }
        roles
    }

    /// `RPCEnvironment.pm` `permissions`: the privileges `authid` holds on
    /// `path`.
    pub fn permissions(&self, authid: &str, path: &str) -> BTreeSet<String> {
        if authid == "root@pam" {
            return all_privileges().into_iter().map(str::to_owned).collect();
        }
        let privs_of = |roles: BTreeMap<String, bool>| -> BTreeSet<String> {
            roles.keys().flat_map(|r| self.role_privs(r)).collect()
        };
        match authid.split_once('!') {
            Some((user, _)) => {
                let Some(token) = self.token(authid) else {
                    return BTreeSet::new();
                };
                let user_privs = self.permissions(user, path);
                if !token.privsep {
                    return user_privs;
                }
                let own = privs_of(self.roles(authid, UgKind::Token, path));
                own.intersection(&user_privs).cloned().collect()
            }
            None => privs_of(self.roles(authid, UgKind::User, path)),
        }
    }

    /// `check` (all of `privs`) or `check_any`; `Err` is the 403.
    pub fn check(
        &self,
        authid: &str,
        path: &str,
        privs: &[&str],
        any: bool,
    ) -> Result<(), ApiError> {
        let have = self.permissions(authid, path);
        let ok = if any {
            privs.iter().any(|p| have.contains(*p))
        } else {
            match privs.iter().find(|p| !have.contains(**p)) {
                Some(missing) => return Err(denied(&format!("{path}, {missing}"))),
                None => true,
            }
        };
        if ok {
            Ok(())
        } else {
            Err(denied(&format!("{path}, {}", privs.join("|"))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_roles_follow_the_privilege_groups() {
        let roles = builtin_roles();
        assert!(roles["PVEAuditor"].contains("VM.Audit"));
        assert!(!roles["PVEAuditor"].contains("VM.Allocate"));
        assert!(roles["PVEVMAdmin"].contains("VM.PowerMgmt"));
        assert!(!roles["PVEVMAdmin"].contains("Sys.Audit"));
        assert!(roles["PVEDatastoreUser"].contains("Datastore.AllocateSpace"));
        assert!(!roles["PVEAdmin"].contains("Sys.Modify"), "root-only");
        assert!(!roles["PVEAdmin"].contains("Mapping.Modify"));
    }
}
