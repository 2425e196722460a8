//! The apply lock: one `apply` or `rollback` of a fleet at a time, across
//! machines and CI runners, held in the cluster itself.
//!
//! The lock is a Proxmox resource pool named `nixgold-lock-<fleet>` whose
//! comment says who holds it: lock ID, user, host, pid, command, since
//! when, and until when the lease runs. Creating a pool is atomic
//! cluster-wide (pve-manager `PVE/API2/Pool.pm` `create_pool` checks and
//! writes `user.cfg` inside a pmxcfs `cfs_lock_file`; see
//! docs/apply-lock.md), so of two runs that start together exactly one
//! gets it. The holder renews the lease while it works; a crashed holder's
//! lease runs out and the next run breaks it. `nixgold force-unlock ID`
//! breaks a lock by its ID, as `terraform force-unlock` does.
//!
//! The lock needs `Pool.Allocate` on `/pool/nixgold-lock-<fleet>` (reading
//! it, for `plan` and `drift`, `Pool.Audit`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pve_api::{ApiError, Client};

/// How long a lease runs before the holder must renew it. A holder that
/// crashed is taken over at most this long after its last renewal.
pub const LEASE: Duration = Duration::from_secs(300);

/// How often the holder renews its lease.
const RENEW_EVERY: Duration = Duration::from_secs(60);

/// How often a waiting run looks at the lock again.
const POLL: Duration = Duration::from_millis(500);

/// The comment's first word: the pool is a nixgold lock.
const MARK: &str = "nixgold-apply-lock";

/// The pool that locks `fleet`.
pub fn pool_id(fleet: &str) -> String {
    format!("nixgold-lock-{fleet}")
}

/// Who holds a lock, as its pool comment records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// What `force-unlock` takes.
    pub id: String,
    pub user: String,
    pub host: String,
    pub pid: u32,
    /// The nixgold command that took it (`apply`, `rollback`).
    pub command: String,
    /// Seconds since the epoch.
    pub since: u64,
    pub expires: u64,
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Holder {
    /// This process, taking the lock for `command` now.
    fn this_process(command: &str) -> Self {
        let since = now();
        let id = crate::ids::random_hex(16);
        Holder {
            id,
            user: std::env::var("USER")
                .or_else(|_| std::env::var("USERNAME"))
                .unwrap_or_else(|_| "unknown".into())
                .replace(char::is_whitespace, "_"),
            host: hostname(),
            pid: std::process::id(),
            command: command.to_owned(),
            since,
            expires: since + LEASE.as_secs(),
        }
    }

    /// The pool comment that records this holder.
    pub fn comment(&self) -> String {
        format!(
            "{MARK} id={} user={} host={} pid={} command={} since={} expires={}",
            self.id,
            self.user,
            self.host,
            self.pid,
            self.command,
            rfc3339(self.since),
            rfc3339(self.expires)
        )
    }

    /// Reads a pool comment written by [`Holder::comment`].
    pub fn parse(comment: &str) -> Option<Self> {
        let mut words = comment.split_whitespace();
        if words.next() != Some(MARK) {
            return None;
        }
        let fields: std::collections::BTreeMap<&str, &str> =
            words.filter_map(|w| w.split_once('=')).collect();
        let time = |k: &str| {
            humantime::parse_rfc3339(fields.get(k)?)
                .ok()?
                .duration_since(UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        };
        Some(Holder {
            id: (*fields.get("id")?).to_owned(),
            user: (*fields.get("user")?).to_owned(),
            host: (*fields.get("host")?).to_owned(),
            pid: fields.get("pid")?.parse().ok()?,
            command: (*fields.get("command")?).to_owned(),
            since: time("since")?,
            expires: time("expires")?,
        })
    }

    pub fn is_expired(&self) -> bool {
        self.expires <= now()
    }

    /// "ops@ci-runner-3 (pid 4711, `nixgold apply`) since … (lock ID …, expires …)".
    pub fn describe(&self) -> String {
        format!(
            "{}@{} (pid {}, `nixgold {}`) since {}; lock ID {}, lease until {}",
            self.user,
            self.host,
            self.pid,
            self.command,
            rfc3339(self.since),
            self.id,
            rfc3339(self.expires)
        )
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace))
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "fleet `{fleet}` is locked by another run: {}\n  hint: wait for it to finish (or pass --lock-timeout 5m to wait); if that run is gone, `nixgold force-unlock {}` breaks the lock",
        holder.describe(),
        holder.id
    )]
    Held { fleet: String, holder: Holder },
    #[error(
        "fleet `{fleet}` is still locked after waiting {}: {}\n  hint: if that run is gone, `nixgold force-unlock {}` breaks the lock",
        humantime::format_duration(*waited),
        holder.describe(),
        holder.id
    )]
    StillHeld {
        fleet: String,
        holder: Holder,
        waited: Duration,
    },
    #[error(
        "the pool `{pool}` exists but is not a nixgold apply lock (comment: {comment:?})\n  hint: nixgold locks fleet `{fleet}` with this pool; rename or remove that pool"
    )]
    NotALock {
        fleet: String,
        pool: String,
        comment: String,
    },
    #[error("fleet `{fleet}` is not locked; nothing to unlock")]
    NotLocked { fleet: String },
    #[error(
        "fleet `{fleet}` is locked under ID {}, not {given}: {}\n  hint: check that run is gone, then pass its lock ID",
        holder.id,
        holder.describe()
    )]
    WrongId {
        fleet: String,
        given: String,
        holder: Holder,
    },
    #[error(
        "cannot use the apply lock `{pool}`: {source}\n  hint: the API token needs Pool.Allocate on /pool/{pool} (see README, \"Running nixgold from several places\")"
    )]
    Api {
        pool: String,
        #[source]
        source: ApiError,
    },
}

/// What the lock pool says right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockState {
    Free,
    Held(Holder),
    /// A pool of that name that nixgold did not write.
    NotALock(String),
}

/// Reads the lock of `fleet` (one API call).
pub async fn read(client: &Client, fleet: &str) -> Result<LockState, LockError> {
    let pool = pool_id(fleet);
    match client.pool(&pool).await {
        Ok(info) => {
            let comment = info.comment.unwrap_or_default();
            Ok(Holder::parse(&comment).map_or(LockState::NotALock(comment), LockState::Held))
        }
        Err(e) if e.is_not_found() => Ok(LockState::Free),
        Err(source) => Err(LockError::Api { pool, source }),
    }
}

/// A lock this process holds; renewed in the background until released.
pub struct HeldLock {
    client: Client,
    fleet: String,
    holder: Holder,
    renewer: tokio::task::JoinHandle<()>,
}

impl HeldLock {
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// Gives the lock up: deletes the pool if it still carries our lock ID.
    pub async fn release(self) -> Result<(), LockError> {
        self.renewer.abort();
        let pool = pool_id(&self.fleet);
        match read(&self.client, &self.fleet).await? {
            LockState::Held(h) if h.id == self.holder.id => self
                .client
                .delete_pool(&pool)
                .await
                .map_err(|source| LockError::Api { pool, source }),
            _ => {
                tracing::warn!(
                    "the apply lock of fleet `{}` was taken over while this run held it",
                    self.fleet
                );
                Ok(())
            }
        }
    }
}

/// Takes the lock of `fleet` for `command`. A lock held by someone else
/// fails at once, or with `wait` > 0 is waited for that long; an expired
/// lease is broken. `waiting` is told about the holder once, when waiting
/// starts or a lease is broken.
pub async fn acquire(
    client: &Client,
    fleet: &str,
    command: &str,
    wait: Duration,
    waiting: impl Fn(&str),
) -> Result<HeldLock, LockError> {
    let pool = pool_id(fleet);
    let started = std::time::Instant::now();
    let mut told = false;
    loop {
        let me = Holder::this_process(command);
        match client.create_pool(&pool, &me.comment()).await {
            Ok(()) => return Ok(hold(client, fleet, me)),
            Err(e) if e.to_string().contains("already exists") => {}
            Err(source) => return Err(LockError::Api { pool, source }),
        }
        let holder = match read(client, fleet).await? {
            LockState::Free => continue,
            LockState::NotALock(comment) => {
                return Err(LockError::NotALock {
                    fleet: fleet.to_owned(),
                    pool,
                    comment,
                });
            }
            LockState::Held(holder) => holder,
        };
        if holder.is_expired() {
            waiting(&format!(
                "breaking the expired apply lock of {}",
                holder.describe()
            ));
            break_lock(client, fleet, &holder).await?;
            continue;
        }
        let waited = started.elapsed();
        if wait.is_zero() {
            return Err(LockError::Held {
                fleet: fleet.to_owned(),
                holder,
            });
        }
        if waited >= wait {
            return Err(LockError::StillHeld {
                fleet: fleet.to_owned(),
                holder,
                waited,
            });
        }
        if !told {
            waiting(&format!(
                "waiting up to {} for the apply lock held by {}",
                humantime::format_duration(wait),
                holder.describe()
            ));
            told = true;
        }
        tokio::time::sleep(POLL.min(wait - waited)).await;
    }
}

/// Deletes the lock pool if it still records `holder` (read again just
/// before, so a lock taken in between is not broken).
async fn break_lock(client: &Client, fleet: &str, holder: &Holder) -> Result<(), LockError> {
    let pool = pool_id(fleet);
    match read(client, fleet).await? {
        LockState::Held(now) if now == *holder => match client.delete_pool(&pool).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() || e.to_string().contains("does not exist") => Ok(()),
            Err(source) => Err(LockError::Api { pool, source }),
        },
        _ => Ok(()),
    }
}

fn hold(client: &Client, fleet: &str, holder: Holder) -> HeldLock {
    let renewer = tokio::spawn(renew(client.clone(), fleet.to_owned(), holder.clone()));
    HeldLock {
        client: client.clone(),
        fleet: fleet.to_owned(),
        holder,
        renewer,
    }
}

/// Pushes the lease forward every [`RENEW_EVERY`] while the lock is ours.
async fn renew(client: Client, fleet: String, mut holder: Holder) {
    let pool = pool_id(&fleet);
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        match read(&client, &fleet).await {
            Ok(LockState::Held(h)) if h.id == holder.id => {}
            Ok(_) => {
                tracing::warn!("the apply lock of fleet `{fleet}` was taken over; not renewing it");
                return;
            }
            Err(e) => {
                tracing::warn!("cannot read the apply lock to renew it: {e}");
                continue;
            }
        }
        holder.expires = now() + LEASE.as_secs();
        if let Err(e) = client.set_pool_comment(&pool, &holder.comment()).await {
            tracing::warn!("cannot renew the apply lock of fleet `{fleet}`: {e}");
        }
    }
}

/// `force-unlock ID`: breaks the lock of `fleet` if it is held under `id`.
pub async fn force_unlock(client: &Client, fleet: &str, id: &str) -> Result<Holder, LockError> {
    match read(client, fleet).await? {
        LockState::Free => Err(LockError::NotLocked {
            fleet: fleet.to_owned(),
        }),
        LockState::NotALock(comment) => Err(LockError::NotALock {
            fleet: fleet.to_owned(),
            pool: pool_id(fleet),
            comment,
        }),
        LockState::Held(holder) if holder.id != id => Err(LockError::WrongId {
            fleet: fleet.to_owned(),
            given: id.to_owned(),
            holder,
        }),
        LockState::Held(holder) => {
            break_lock(client, fleet, &holder).await?;
            Ok(holder)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_survives_its_comment() {
        let h = Holder::this_process("apply");
        assert_eq!(Holder::parse(&h.comment()), Some(h.clone()));
        assert!(!h.is_expired());
        assert_eq!(h.id.len(), 16);
        assert!(Holder::parse("a pool someone made").is_none());
        assert!(Holder::parse("nixgold-apply-lock id=x").is_none());
    }
}
