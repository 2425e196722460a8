//! Resource pools (`/pools`): the `pool:` lines of `user.cfg`, as
//! pve-manager's `PVE/API2/Pool.pm` (`create_pool`, `update_pool`,
//! `read_pool`, `delete_pool`, `index`) keeps them.
//!
//! Proxmox reads, checks and writes `user.cfg` inside
//! `PVE::AccessControl::lock_user_config`, a `cfs_lock_file` on pmxcfs: one
//! create of a pool id wins cluster-wide and every other one fails with
//! "create pool failed: pool '…' already exists". Here every handler runs
//! with the whole state locked, which gives the same guarantee.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::handlers::{Call, qemu_list_entry};
use crate::params::split_list;
use crate::state::{ApiError, ApiResult, State};

/// One pool: its comment and the guests it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub comment: Option<String>,
    pub vms: BTreeSet<u32>,
}

fn missing(poolid: &str) -> ApiError {
    ApiError::fail(format!("pool '{poolid}' does not exist"))
}

/// `lock_user_config`'s error prefix (`die "$errmsg: $err"`) on what
/// died inside it; parameter errors (400) come before and stay as they are.
fn failed(what: &str, err: ApiError) -> ApiError {
    if err.status == 500 {
        ApiError::fail(format!("{what}: {}", err.message))
    } else {
        err
    }
}

/// `POST /pools`.
pub fn create(state: &mut State, call: &Call) -> ApiResult {
    let poolid = call.get("poolid").unwrap_or_default();
    if state.pools.contains_key(poolid) {
        return Err(failed(
            "create pool failed",
            ApiError::fail(format!("pool '{poolid}' already exists")),
        ));
    }
    let comment = call
        .get("comment")
        .filter(|c| !c.is_empty())
        .map(str::to_owned);
    state.pools.insert(
        poolid.to_owned(),
        Pool {
            comment,
            vms: BTreeSet::new(),
        },
    );
    Ok(Value::Null)
}

/// `PUT /pools` and `PUT /pools/{poolid}`: the comment, and guests in or out.
pub fn update(state: &mut State, call: &Call) -> ApiResult {
    update_pool(state, call).map_err(|e| failed("update pools failed", e))
}

fn update_pool(state: &mut State, call: &Call) -> ApiResult {
    let poolid = call.get("poolid").unwrap_or_default().to_owned();
    let pool = state.pools.get(&poolid).ok_or_else(|| missing(&poolid))?;
    let mut next = pool.clone();
    if let Some(comment) = call.get("comment") {
        next.comment = Some(comment.to_owned()).filter(|c| !c.is_empty());
    }
    let delete = call.get("delete") == Some("1");
    let allow_move = call.get("allow-move") == Some("1");
    if call.get("storage").is_some() {
        return Err(ApiError::fail(
            "the simulator does not model storage pool members",
        ));
    }
    let mut moved = Vec::new();
    for vmid in split_list(call.get("vms").unwrap_or_default()) {
        let id: u32 = vmid.parse().map_err(|_| {
            ApiError::param(
                "vms",
                format!("invalid format - value '{vmid}' does not look like a valid VM ID"),
            )
        })?;
        if delete {
            if !next.vms.remove(&id) {
                return Err(ApiError::fail(format!("VM {id} is not a pool member")));
            }
            continue;
        }
        if next.vms.contains(&id) {
            return Err(ApiError::fail(format!("VM {id} is already a pool member")));
        }
        if let Some((other, _)) = state.pools.iter().find(|(_, p)| p.vms.contains(&id)) {
            if !allow_move {
                return Err(ApiError::fail(format!(
                    "VM {id} belongs already to pool '{other}'"
                )));
            }
            moved.push((other.clone(), id));
        }
        next.vms.insert(id);
    }
    for (other, id) in moved {
        if let Some(p) = state.pools.get_mut(&other) {
            p.vms.remove(&id);
        }
    }
    state.pools.insert(poolid, next);
    Ok(Value::Null)
}

/// `GET /pools/{poolid}`: comment and members (guests that still exist).
pub fn read(state: &State, call: &Call) -> ApiResult {
    let poolid = call.get("poolid").unwrap_or_default();
    let pool = state.pools.get(poolid).ok_or_else(|| missing(poolid))?;
    let mut out = json!({ "members": members(state, pool, call.get("type")) });
    if let Some(comment) = &pool.comment {
        out["comment"] = json!(comment);
    }
    Ok(out)
}

fn members(state: &State, pool: &Pool, kind: Option<&str>) -> Vec<Value> {
    if kind.is_some_and(|k| k != "qemu") {
        return Vec::new();
    }
    pool.vms
        .iter()
        .filter_map(|id| state.vms.get(id).map(|vm| (id, vm)))
        .map(|(id, vm)| {
            let mut entry = qemu_list_entry(state, *id, vm);
            entry["id"] = json!(format!("qemu/{id}"));
            entry["node"] = json!(vm.node);
            entry["type"] = json!("qemu");
            entry
        })
        .collect()
}

/// `GET /pools`: every pool, or (with `poolid`) that one with its members.
pub fn list(state: &State, call: &Call) -> ApiResult {
    if let Some(poolid) = call.get("poolid") {
        let pool = state.pools.get(poolid).ok_or_else(|| missing(poolid))?;
        let mut entry =
            json!({ "poolid": poolid, "members": members(state, pool, call.get("type")) });
        if let Some(comment) = &pool.comment {
            entry["comment"] = json!(comment);
        }
        return Ok(json!([entry]));
    }
    Ok(Value::Array(
        state
            .pools
            .iter()
            .map(|(poolid, pool)| {
                let mut entry = json!({ "poolid": poolid });
                if let Some(comment) = &pool.comment {
                    entry["comment"] = json!(comment);
                }
                entry
            })
            .collect(),
    ))
}

/// `DELETE /pools` and `DELETE /pools/{poolid}`: only an empty pool goes
/// (members that no longer exist do not count).
pub fn delete(state: &mut State, call: &Call) -> ApiResult {
    let poolid = call.get("poolid").unwrap_or_default();
    let result = match state.pools.get(poolid) {
        None => Err(missing(poolid)),
        Some(pool) => match pool.vms.iter().find(|id| state.vms.contains_key(id)) {
            Some(id) => Err(ApiError::fail(format!(
                "pool '{poolid}' is not empty (contains VM {id})"
            ))),
            None => Ok(()),
        },
    };
    result.map_err(|e| failed("delete pool failed", e))?;
    state.pools.remove(poolid);
    Ok(Value::Null)
}
