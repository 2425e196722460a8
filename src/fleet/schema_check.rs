//! The fast path of fleet loading: proving a plain fleet value valid in Rust
//! against the schema data, and filling its defaults.
//!
//! The rules are those of `schema/fleet.ncl`'s contract interpreter, read
//! from the very same data (`schema/fleet.schema.json`, which
//! `tests/schema.rs` keeps equal to the export of `fleet.ncl`): the schema
//! has one source of truth and two readers. This reader only answers "valid,
//! here is the value with its defaults" or "not proven"; a fleet it does not
//! prove goes through the Nickel contract, whose errors carry the YAML line
//! and column, the field path and the hint. A test holds the two readers to
//! the same verdicts and the same defaults over every fleet in the repository.
//!
//! Interpreting the contract in Nickel costs about a millisecond per VM and
//! 50 KiB of heap; this costs microseconds, so a valid fleet of 10,000 VMs
//! loads in well under a second.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value};
use unicode_segmentation::UnicodeSegmentation;

/// The schema data, exported from `schema/fleet.ncl`.
const SCHEMA_JSON: &str = include_str!("../../schema/fleet.schema.json");

static ROOT: LazyLock<Node> = LazyLock::new(|| {
    let data: Value = serde_json::from_str(SCHEMA_JSON).expect("the schema file is JSON");
    Node::compile(&data)
});

/// `value` with every default filled in, when it satisfies the schema;
/// `None` when it does not, or when this reader cannot be sure it does.
pub fn prove(mut value: Value) -> Option<Value> {
    ROOT.check(&mut value).then_some(value)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Object,
    Array,
    String,
    Integer,
    Number,
    Boolean,
    OneOf,
    Any,
}

/// A schema node compiled once: children, compiled patterns, defaults.
#[derive(Debug)]
struct Node {
    kind: Kind,
    secret: bool,
    props: HashMap<String, Node>,
    /// The schema of fields not in `props` (`additionalProperties`).
    rest: Option<Box<Node>>,
    closed: bool,
    required: Vec<String>,
    /// Each property's default, completed with its own nested defaults.
    fill: Vec<(String, Value)>,
    names: Option<Regex>,
    items: Option<Box<Node>>,
    min_items: Option<usize>,
    unique: bool,
    pattern: Option<Regex>,
    choices: Option<Vec<Value>>,
    min_length: Option<usize>,
    max_length: Option<usize>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    /// `oneOf`: each alternative's required fields and its node.
    alternatives: Vec<(Vec<String>, Node)>,
}

fn regex_at(schema: &Value, key: &str) -> Option<Regex> {
    let pattern = schema.get(key)?.as_str()?;
    Some(Regex::new(pattern).expect("the schema's patterns compile"))
}

fn usize_at(schema: &Value, key: &str) -> Option<usize> {
    schema
        .get(key)
        .and_then(Value::as_u64)
        .and_then(|n| usize::try_from(n).ok())
}

impl Node {
    fn compile(schema: &Value) -> Node {
        let kind = match schema.get("type").and_then(Value::as_str) {
            _ if schema.get("oneOf").is_some() => Kind::OneOf,
            Some("object") => Kind::Object,
            Some("array") => Kind::Array,
            Some("string") => Kind::String,
            Some("integer") => Kind::Integer,
            Some("number") => Kind::Number,
            Some("boolean") => Kind::Boolean,
            _ => Kind::Any,
        };
        let empty = Map::new();
        let properties = schema
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let props: HashMap<String, Node> = properties
            .iter()
            .map(|(k, child)| (k.clone(), Node::compile(child)))
            .collect();
        let fill = properties
            .iter()
            .filter_map(|(k, child)| {
                let default = child.get("default")?.clone();
                Some((k.clone(), props[k].complete(default)))
            })
            .collect();
        let additional = schema.get("additionalProperties");
        Node {
            kind,
            secret: schema.get("x-secret").is_some(),
            rest: additional
                .filter(|a| a.is_object())
                .map(|a| Box::new(Node::compile(a))),
            closed: additional == Some(&Value::Bool(false)),
            required: schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).map(str::to_owned))
                .into_iter()
                .flatten()
                .collect(),
            fill,
            names: schema
                .get("propertyNames")
                .and_then(|n| regex_at(n, "pattern")),
            items: schema.get("items").map(|i| Box::new(Node::compile(i))),
            min_items: usize_at(schema, "minItems"),
            unique: schema.get("uniqueItems") == Some(&Value::Bool(true)),
            pattern: regex_at(schema, "pattern"),
            choices: schema.get("enum").and_then(Value::as_array).cloned(),
            min_length: usize_at(schema, "minLength"),
            max_length: usize_at(schema, "maxLength"),
            minimum: schema.get("minimum").and_then(Value::as_f64),
            maximum: schema.get("maximum").and_then(Value::as_f64),
            alternatives: schema
                .get("oneOf")
                .and_then(Value::as_array)
                .map(|alts| alts.iter().map(Node::alternative).collect())
                .unwrap_or_default(),
            props,
        }
    }

    fn alternative(alt: &Value) -> (Vec<String>, Node) {
        let node = Node::compile(alt);
        (node.required.clone(), node)
    }

    /// The node of field `k` of a record this node describes.
    fn child(&self, k: &str) -> Option<&Node> {
        self.props.get(k).or(self.rest.as_deref())
    }

    /// The first alternative whose required fields `record` has.
    fn alternative_for(&self, record: &Map<String, Value>) -> Option<&Node> {
        self.alternatives
            .iter()
            .find(|(required, _)| required.iter().all(|r| record.contains_key(r)))
            .map(|(_, node)| node)
    }

    /// `value` with every nested default filled in, unchecked (defaults are
    /// valid by construction).
    fn complete(&self, mut value: Value) -> Value {
        match (self.kind, &mut value) {
            (Kind::OneOf, Value::Object(record)) => {
                if let Some(alt) = self.alternative_for(record) {
                    return alt.complete(value);
                }
            }
            (Kind::Object, Value::Object(record)) => {
                for (k, v) in record.iter_mut() {
                    if let Some(child) = self.child(k) {
                        *v = child.complete(v.take());
                    }
                }
                self.fill_absent(record);
            }
            (Kind::Array, Value::Array(list)) => {
                if let Some(items) = &self.items {
                    for v in list.iter_mut() {
                        *v = items.complete(v.take());
                    }
                }
            }
            _ => {}
        }
        value
    }

    fn fill_absent(&self, record: &mut Map<String, Value>) {
        for (k, default) in &self.fill {
            if !record.contains_key(k) {
                record.insert(k.clone(), default.clone());
            }
        }
    }

    /// True when `value` satisfies this node; fills its defaults meanwhile.
    fn check(&self, value: &mut Value) -> bool {
        if self.secret && value.is_string() {
            return false;
        }
        match self.kind {
            Kind::OneOf => match value {
                Value::Object(record) => self
                    .alternative_for(record)
                    .is_some_and(|alt| alt.check(value)),
                _ => false,
            },
            Kind::Object => value.as_object_mut().is_some_and(|r| self.check_object(r)),
            Kind::Array => value.as_array_mut().is_some_and(|l| self.check_array(l)),
            Kind::String => value.as_str().is_some_and(|s| self.check_string(s)),
            Kind::Integer => is_integer(value) && self.check_number(value),
            Kind::Number => value.is_number() && self.check_number(value),
            Kind::Boolean => value.is_boolean(),
            Kind::Any => true,
        }
    }

    fn check_object(&self, record: &mut Map<String, Value>) -> bool {
        let fields_ok = self.required.iter().all(|r| record.contains_key(r))
            && record.keys().all(|k| {
                (!self.closed || self.props.contains_key(k))
                    && self.names.as_ref().is_none_or(|names| names.is_match(k))
            });
        if !fields_ok {
            return false;
        }
        let children_ok = record
            .iter_mut()
            .all(|(k, v)| self.child(k).is_none_or(|child| child.check(v)));
        self.fill_absent(record);
        children_ok
    }

    fn check_array(&self, list: &mut [Value]) -> bool {
        if self.min_items.is_some_and(|min| list.len() < min) {
            return false;
        }
        if self.unique {
            let scalars: Vec<&Value> = list
                .iter()
                .filter(|v| !v.is_object() && !v.is_array())
                .collect();
            let twice = scalars
                .iter()
                .enumerate()
                .any(|(i, v)| scalars[..i].contains(v));
            if twice {
                return false;
            }
        }
        match &self.items {
            Some(items) => list.iter_mut().all(|v| items.check(v)),
            None => true,
        }
    }

    fn check_string(&self, s: &str) -> bool {
        // Lengths count grapheme clusters, as Nickel's `std.string.length`.
        let length = || s.graphemes(true).count();
        self.min_length.is_none_or(|min| length() >= min)
            && self.max_length.is_none_or(|max| length() <= max)
            && self.pattern.as_ref().is_none_or(|p| p.is_match(s))
            && self
                .choices
                .as_ref()
                .is_none_or(|c| c.iter().any(|v| v.as_str() == Some(s)))
    }

    fn check_number(&self, value: &Value) -> bool {
        let Some(n) = value.as_f64() else {
            return false;
        };
        self.minimum.is_none_or(|min| n >= min)
            && self.maximum.is_none_or(|max| n <= max)
            && self.choices.as_ref().is_none_or(|c| c.contains(value))
    }
}

fn is_integer(value: &Value) -> bool {
    value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::fleet::load::evaluate;

    /// Fleets beyond the repository's: each one exercises a rule where the
    /// two readers could drift apart.
    const EXTRA: [(&str, &str); 9] = [
        (
            "static-vm.yaml",
            "  network: { ip: 10.0.0.5/24, gateway: 10.0.0.1, dns: [10.0.0.1] }\n",
        ),
        ("secret-inline.yaml", "  password: hunter2\n"),
        ("tag-twice.yaml", "  tags: [web, web]\n"),
        (
            "tags-ok.yaml",
            "  tags: [web, db]\n  cores: 4\n  memory: 4096\n",
        ),
        ("non-ascii.yaml", "  description: \"café ☕\"\n"),
        ("bad-enum.yaml", "  clone: thin\n"),
        ("float-cores.yaml", "  cores: 2.5\n"),
        ("no-alternative.yaml", "  network: { bridge: vmbr1 }\n"),
        (
            "env-ref.yaml",
            "  password: { env: VM_PASSWORD }\n  user: ops\n",
        ),
    ];

    const BASE: &str = "fleet: t\nproxmox: { endpoint: \"https://pve:8006\", nodes: [pve] }\n\
        isos: { nixos: { channel: nixos-24.05 } }\n\
        images: { golden: { iso: nixos, vmid_range: { first: 9000, last: 9009 }, nixos: { state_version: \"24.05\" } } }\n\
        vms:\n web:\n  image: golden\n";

    fn corpus(extra: &Path) -> Vec<PathBuf> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        for dir in [repo.join("fleets"), repo.join("tests/fleets/broken")] {
            for entry in std::fs::read_dir(dir).unwrap() {
                files.push(entry.unwrap().path());
            }
        }
        for (name, vm) in EXTRA {
            let file = extra.join(name);
            std::fs::write(&file, format!("{BASE}{vm}")).unwrap();
            files.push(file);
        }
        files.retain(|f| f.extension().is_some_and(|e| e != "lock"));
        files
    }

    /// Whatever the contract rejects is not proven; whatever it accepts is
    /// proven, with exactly the contract's defaults.
    #[test]
    fn proves_what_the_contract_accepts_with_the_same_defaults() {
        let extra = tempfile::tempdir().unwrap();
        let (mut accepted, mut rejected) = (0, 0);
        for file in corpus(extra.path()) {
            let proven = evaluate(&file, "fleet")
                .ok()
                .and_then(|json| prove(serde_json::from_str(&json).unwrap()));
            match evaluate(&file, "fleet | nixgold_schema.Fleet") {
                Ok(json) => {
                    let contract: Value = serde_json::from_str(&json).unwrap();
                    assert_eq!(proven, Some(contract), "{}", file.display());
                    accepted += 1;
                }
                Err(_) => {
                    assert_eq!(proven, None, "{} is proven", file.display());
                    rejected += 1;
                }
            }
        }
        assert!(accepted >= 15 && rejected >= 15, "{accepted} / {rejected}");
    }

    #[test]
    fn a_valid_fleet_of_ten_thousand_vms_is_proven_with_each_vms_defaults() {
        let mut vms = Map::new();
        for i in 0..10_000 {
            vms.insert(
                format!("vm-{i:05}"),
                serde_json::json!({ "image": "golden", "tags": ["web"] }),
            );
        }
        let fleet = serde_json::json!({
            "fleet": "big",
            "proxmox": { "endpoint": "https://pve:8006", "nodes": ["pve"] },
            "vms": vms,
        });
        let proven = prove(fleet).expect("valid");
        let vm = &proven["vms"]["vm-09999"];
        assert_eq!(vm["clone"], "full");
        assert_eq!(vm["network"], serde_json::json!({ "dhcp": true }));
        assert_eq!(proven["proxmox"]["tls"]["insecure"], false);
    }
}
