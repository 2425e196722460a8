//! What can go wrong talking to Proxmox, classified so callers can decide:
//! retry (transport, lock contention), re-plan (digest mismatch), or stop.
//!
//! Proxmox puts the error text in the HTTP reason phrase and, since
//! libpve-http-server-perl 5.2.0, also in the body's `message`; older
//! servers send only `{"data":null}`. Both are read. Messages never contain
//! credentials: the client never formats a request body into an error.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 500 "Configuration file … does not exist" and other missing things.
    #[error("not found: {message}")]
    NotFound { message: String },
    /// 401/403: bad credentials, or a missing privilege (named by Proxmox).
    #[error("authentication/permission error ({status}): {message}")]
    Auth { status: u16, message: String },
    /// 403 "Permission check failed (PATH, PRIVILEGE)": the token lacks a
    /// privilege on a path. Retrying cannot help; granting it does.
    #[error(
        "permission denied: {privilege} on {path} is missing\n  hint: grant it to the token, e.g. `pveum acl modify {path} --tokens USER@REALM!TOKEN --roles ROLE` with a role holding {privilege} (`nixgold doctor` lists everything the fleet needs)"
    )]
    Permission { path: String, privilege: String },
    /// 400 with per-parameter reasons.
    #[error("{message}{}", format_errors(errors))]
    Params {
        message: String,
        errors: BTreeMap<String, String>,
    },
    /// "can't lock file … got timeout", "VM is locked (…)", storage locks.
    #[error("lock contention: {message}")]
    Locked { message: String },
    /// The config changed since it was read (stale `digest`).
    #[error("configuration changed since it was read: {message}")]
    Conflict { message: String },
    /// 595/596/599 from pveproxy, connection refused/reset, timeouts.
    #[error("transport error{}: {message}", status.map(|s| format!(" ({s})")).unwrap_or_default())]
    Transport {
        status: Option<u16>,
        message: String,
    },
    /// Any other refusal.
    #[error("proxmox error ({status}): {message}")]
    Server { status: u16, message: String },
    /// A task ended with an error; carries the log's tail.
    #[error("task {upid} failed: {exitstatus}{}", tail_text(log_tail))]
    Task {
        upid: String,
        exitstatus: String,
        log_tail: Vec<String>,
    },
    /// Waiting for a task ran past the caller's deadline.
    #[error("task {upid} did not finish within {seconds}s")]
    TaskTimeout { upid: String, seconds: u64 },
    /// Waiting for anything else (a command run by the guest agent) ran
    /// past the caller's deadline.
    #[error("{what} did not finish within {seconds}s")]
    Timeout { what: String, seconds: u64 },
    /// A response that does not decode (a nixgold bug or an API change).
    #[error("cannot decode the answer to {context}: {message}")]
    Decode { context: String, message: String },
    /// The client is misconfigured (bad endpoint, unreadable CA file, …).
    #[error("client configuration: {message}")]
    Config { message: String },
}

fn format_errors(errors: &BTreeMap<String, String>) -> String {
    errors
        .iter()
        .map(|(k, v)| format!("\n  {k}: {}", v.trim_end()))
        .collect()
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n  log: {}", tail.join("\n  log: "))
    }
}

impl ApiError {
    /// Classifies an HTTP error from its status, the reason phrase and the
    /// body's `message` and `errors`.
    pub fn from_response(
        status: u16,
        reason: &str,
        message: Option<&str>,
        errors: BTreeMap<String, String>,
    ) -> Self {
        let message = message
            .map(|m| m.trim_end().to_owned())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| reason.trim().to_owned());
        match status {
            400 => ApiError::Params { message, errors },
            403 => match permission_check(&message) {
                Some((path, privilege)) => ApiError::Permission { path, privilege },
                None => ApiError::Auth { status, message },
            },
            401 => ApiError::Auth { status, message },
            595 | 596 | 599 => ApiError::Transport {
                status: Some(status),
                message,
            },
            _ if is_lock_message(&message) => ApiError::Locked { message },
            _ if message.contains("checksum mismatch")
                || message.contains("file changed by other user") =>
            {
                ApiError::Conflict { message }
            }
            500 if message.contains("does not exist") => ApiError::NotFound { message },
            _ => ApiError::Server { status, message },
        }
    }

    /// Classifies a non-200 answer from its status line and raw body (which
    /// may be empty, `{"data":null}`, or carry `message` and `errors`).
    pub fn from_body(status: u16, reason: &str, body: &[u8]) -> Self {
        let body: serde_json::Value =
            serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
        let message = body.get("message").and_then(serde_json::Value::as_str);
        let errors: BTreeMap<String, String> = body
            .get("errors")
            .and_then(serde_json::Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        ApiError::from_response(status, reason, message, errors)
    }

    /// Worth retrying (with backoff) for an idempotent read.
    pub fn is_transport(&self) -> bool {
        matches!(self, ApiError::Transport { .. })
    }

    /// Lock contention: retrying later usually succeeds.
    pub fn is_lock_contention(&self) -> bool {
        match self {
            ApiError::Locked { .. } => true,
            ApiError::Task { exitstatus, .. } => is_lock_message(exitstatus),
            _ => false,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::NotFound { .. })
    }
}

/// The path and privilege of pve-common's `raise_perm_exc` text,
/// `Permission check failed (/vms/400, VM.Config.Cloudinit)`.
fn permission_check(message: &str) -> Option<(String, String)> {
    let inner = message
        .strip_prefix("Permission check failed (")?
        .strip_suffix(')')?;
    let (path, privilege) = inner.split_once(", ")?;
    Some((path.to_owned(), privilege.to_owned()))
}

fn is_lock_message(message: &str) -> bool {
    (message.contains("can't lock file") && message.contains("got timeout"))
        || message.contains("got lock request timeout")
        || message.starts_with("VM is locked")
        || message.starts_with("CT is locked")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_proxmox_errors() {
        let e = |s, m: &str| ApiError::from_response(s, m, None, BTreeMap::new());
        assert!(
            e(
                500,
                "Configuration file 'nodes/pve/qemu-server/101.conf' does not exist"
            )
            .is_not_found()
        );
        assert!(
            e(
                500,
                "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout"
            )
            .is_lock_contention()
        );
        assert!(e(500, "VM is locked (clone)").is_lock_contention());
        assert!(e(500, "CT is locked (disk)").is_lock_contention());
        assert!(e(596, "Connection timed out").is_transport());
        assert!(matches!(
            e(401, "authentication failure"),
            ApiError::Auth { .. }
        ));
        assert_eq!(
            e(
                403,
                "Permission check failed (/vms/400, VM.Config.Cloudinit)"
            ),
            ApiError::Permission {
                path: "/vms/400".into(),
                privilege: "VM.Config.Cloudinit".into()
            }
        );
        assert!(!e(403, "Permission check failed (/vms/400, VM.Audit)").is_transport());
        assert!(matches!(
            e(500, "checksum mismatch (file change by other user?)"),
            ApiError::Conflict { .. }
        ));
        // The body's message wins over the reason phrase when present.
        let m = ApiError::from_response(500, "short", Some("long message\n"), BTreeMap::new());
        assert_eq!(m.to_string(), "proxmox error (500): long message");
    }
}
