//! Response types, decoded tolerantly: Proxmox is Perl, so a number may
//! arrive as a string and a boolean as `0`/`1`, `"1"`, `""` or `true`, and
//! fields come and go between versions. Nothing here rejects an unknown
//! field; a VM config keeps every key it had.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Lenient scalars.
pub mod lenient {
    use super::*;

    fn as_u64(v: &Value) -> Option<u64> {
        match v {
            Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f as u64)),
            Value::String(s) => s
                .trim()
                .parse::<u64>()
                .ok()
                .or_else(|| s.trim().parse::<f64>().ok().map(|f| f as u64)),
            Value::Bool(b) => Some(u64::from(*b)),
            _ => None,
        }
    }

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let v = Value::deserialize(d)?;
        as_u64(&v).ok_or_else(|| serde::de::Error::custom(format!("expected a number, got {v}")))
    }

    pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(Option::<Value>::deserialize(d)?.as_ref().and_then(as_u64))
    }

    pub fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Ok(opt_u64(d)?.and_then(|n| u32::try_from(n).ok()))
    }

    pub fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        Ok(match Option::<Value>::deserialize(d)? {
            Some(Value::Bool(b)) => b,
            Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
            Some(Value::String(s)) => matches!(s.as_str(), "1" | "true" | "on" | "yes"),
            _ => false,
        })
    }

    pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(match Option::<Value>::deserialize(d)? {
            Some(Value::String(s)) => Some(s),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
    }

    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Ok(opt_string(d)?.unwrap_or_default())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Version {
    pub version: String,
    #[serde(default)]
    pub release: Option<String>,
    #[serde(default)]
    pub repoid: Option<String>,
}

/// One entry of `/cluster/resources`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClusterResource {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u32")]
    pub vmid: Option<u32>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub template: bool,
    #[serde(default)]
    pub lock: Option<String>,
    #[serde(default)]
    pub tags: Option<String>,
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub storage: Option<String>,
    #[serde(default)]
    pub plugintype: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub shared: bool,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub disk: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxdisk: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxmem: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Node {
    pub node: String,
    #[serde(default)]
    pub status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StorageInfo {
    pub storage: String,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub content: String,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub active: bool,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub shared: bool,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub total: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub avail: Option<u64>,
}

/// One volume of a storage's content.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Volume {
    pub volid: String,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub format: String,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub size: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u32")]
    pub vmid: Option<u32>,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub ctime: Option<u64>,
}

/// A VM config: every key as the string Proxmox means, plus its digest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmConfig {
    pub values: BTreeMap<String, String>,
    pub digest: String,
}

impl<'de> Deserialize<'de> for VmConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, Value>::deserialize(d)?;
        let mut values = BTreeMap::new();
        let mut digest = String::new();
        for (k, v) in map {
            let text = match v {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => if b { "1" } else { "0" }.to_owned(),
                Value::Null => continue,
                other => other.to_string(),
            };
            if k == "digest" {
                digest = text;
            } else {
                values.insert(k, text);
            }
        }
        Ok(VmConfig { values, digest })
    }
}

impl VmConfig {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn is_template(&self) -> bool {
        self.get("template").is_some_and(|t| t == "1")
    }

    /// Memory in MiB, from `2048` or `current=2048,…` (a property string
    /// since PVE 8.1).
    pub fn memory_mib(&self) -> Option<u64> {
        let m = self.get("memory")?;
        m.split(',')
            .find_map(|p| {
                p.strip_prefix("current=")
                    .or((!p.contains('=')).then_some(p))
            })?
            .parse()
            .ok()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VmStatus {
    #[serde(default, deserialize_with = "lenient::opt_u32")]
    pub vmid: Option<u32>,
    pub status: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub qmpstatus: Option<String>,
    #[serde(default)]
    pub lock: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub template: bool,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub agent: bool,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub uptime: Option<u64>,
}

impl VmStatus {
    pub fn is_running(&self) -> bool {
        self.status == "running"
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TaskStatus {
    pub upid: String,
    pub status: String,
    #[serde(default)]
    pub exitstatus: Option<String>,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default, deserialize_with = "lenient::string")]
    pub id: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub tokenid: Option<String>,
}

impl TaskStatus {
    pub fn is_running(&self) -> bool {
        self.status == "running"
    }

    /// `OK` and `WARNINGS: n` are success; anything else is an error.
    pub fn succeeded(&self) -> bool {
        self.exitstatus
            .as_deref()
            .is_some_and(|e| e == "OK" || e.starts_with("WARNINGS: "))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LogLine {
    #[serde(deserialize_with = "lenient::u64")]
    pub n: u64,
    #[serde(default)]
    pub t: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PendingEntry {
    pub key: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub value: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub pending: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub delete: Option<u64>,
}

/// A guest NIC as qemu-guest-agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GuestInterface {
    pub name: String,
    #[serde(rename = "hardware-address", default)]
    pub hardware_address: Option<String>,
    #[serde(rename = "ip-addresses", default)]
    pub ip_addresses: Vec<GuestAddress>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GuestAddress {
    #[serde(rename = "ip-address")]
    pub ip_address: String,
    #[serde(rename = "ip-address-type")]
    pub kind: String,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub prefix: Option<u64>,
}

/// Decodes the `data` of `agent/network-get-interfaces`: `{"result": [...]}`,
/// or (old servers, HTTP 200) `{"result": {"error": {...}}}`.
pub fn decode_agent_interfaces(data: Value) -> Result<Vec<GuestInterface>, crate::ApiError> {
    if let Some(err) = data.get("result").and_then(|r| r.get("error")) {
        return Err(crate::ApiError::Server {
            status: 500,
            message: format!(
                "guest agent: {}",
                err.get("desc").and_then(Value::as_str).unwrap_or("error")
            ),
        });
    }
    serde_json::from_value(data.get("result").cloned().unwrap_or(Value::Array(vec![]))).map_err(
        |e| crate::ApiError::Decode {
            context: "agent/network-get-interfaces".into(),
            message: e.to_string(),
        },
    )
}

/// `agent/get-osinfo`: what qemu-ga reads from the guest's
/// `/etc/os-release` and `uname` (qemu qga/commands-posix.c
/// `qmp_guest_get_osinfo`; every field is optional there).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct OsInfo {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "pretty-name", default)]
    pub pretty_name: Option<String>,
    /// `VERSION_ID`: on NixOS the release (`24.05`), not the build.
    #[serde(rename = "version-id", default)]
    pub version_id: Option<String>,
    #[serde(rename = "kernel-release", default)]
    pub kernel_release: Option<String>,
}

/// Decodes `agent/get-osinfo`'s `{"result": {...}}` (or an agent error).
pub fn decode_osinfo(data: Value) -> Result<OsInfo, crate::ApiError> {
    let result = data.get("result").cloned().unwrap_or(Value::Null);
    if let Some(err) = result.get("error") {
        return Err(crate::ApiError::Server {
            status: 500,
            message: format!(
                "guest agent: {}",
                err.get("desc").and_then(Value::as_str).unwrap_or("error")
            ),
        });
    }
    serde_json::from_value(result).map_err(|e| crate::ApiError::Decode {
        context: "agent/get-osinfo".into(),
        message: e.to_string(),
    })
}

/// `agent/exec-status` of a process started with `agent/exec`. `exited`
/// is a JSON boolean (agent results pass through), tolerated as 0/1 too.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentExecStatus {
    #[serde(deserialize_with = "lenient::bool")]
    pub exited: bool,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub exitcode: Option<u64>,
    #[serde(rename = "out-data", default)]
    pub out_data: Option<String>,
    #[serde(rename = "err-data", default)]
    pub err_data: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub signal: Option<u64>,
}

/// How a command run through the guest agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentExit {
    /// The exit code; 128 + the signal for a killed process.
    pub code: u32,
    pub out: String,
    pub err: String,
}

/// `GET /pools/{poolid}`: a resource pool's comment and members.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PoolInfo {
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub members: Vec<Value>,
}
