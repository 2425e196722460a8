//! Plans for programs: `plan --json` and `show --json PLANFILE` in the shape
//! of `terraform show -json`, so tools written for terraform plans (policy
//! checks, pull-request bots) read nixgold's.
//!
//! Each change becomes one `resource_changes[]` entry with `address`,
//! `type`, `name` (and `index`, the node, where the address has one) and a
//! `change` object: `actions` (`["create"]`, `["update"]`,
//! `["delete", "create"]`, `["delete"]`), the whole resource `before` and
//! `after` with typed values (integers are numbers), `after_unknown` for what
//! only the apply learns, and `before_sensitive`/`after_sensitive` marking
//! secrets, whose values never appear. What terraform has no word for —
//! reason, impact, phase, depends_on, the rollout's batches — is under
//! `nixgold` keys, on each change and at the top. Build internals (configuration.nix, the install
//! script) are `nixgold render`'s output, never the plan's. The shape is
//! versioned by `format_version` and described by `schema/plan.schema.json`.

use serde_json::{Map, Value, json};

use crate::plan::{Action, Change, Plan, Rollout, Work};

/// The version of this JSON shape: the major changes when a consumer of
/// the previous one could misread the new one.
pub const FORMAT_VERSION: &str = "1.1";

/// The plan as terraform-plan consumers read it.
pub fn plan_json(plan: &Plan) -> Value {
    let changes: Vec<Value> = plan.changes.iter().map(resource_change).collect();
    json!({
        "format_version": FORMAT_VERSION,
        "nixgold_version": env!("CARGO_PKG_VERSION"),
        "fleet": plan.fleet,
        "applyable": !plan.is_empty(),
        "complete": true,
        "errored": false,
        "resource_changes": changes,
        "nixgold": {
            "summary": {
                "create": plan.count(Action::Create),
                "update": plan.count(Action::Update),
                "replace": plan.count(Action::Replace),
                "destroy": plan.count(Action::Destroy),
            },
            "kept": plan.kept.iter().map(|(address, vmid)| json!({ "address": address, "vmid": vmid })).collect::<Vec<_>>(),
            "retained": plan.retained.iter().map(|(generation, users)| json!({ "generation": generation, "used_by": users })).collect::<Vec<_>>(),
            "adopted": plan.adopted.iter().map(|b| json!({ "image": b.image, "generation": b.generation, "node": b.node, "vmid": b.vmid })).collect::<Vec<_>>(),
            "rollout": plan.rollout.as_ref().map(rollout),
            "notes": plan.notes,
            "live_fingerprint": plan.live_fingerprint,
            "lock_fingerprint": plan.lock_fingerprint,
            "api_calls": plan.api_calls,
        },
    })
}

/// The rollout's batches (addresses, in the order apply replaces them), the
/// pause between batches and the gates each batch passes (format 1.1).
fn rollout(rollout: &Rollout) -> Value {
    json!({
        "batches": rollout.batches,
        "pause": rollout.pause.map(|p| p.to_string()),
        "gates": rollout.gates,
    })
}

/// terraform's action list for a nixgold action (a replace destroys first).
pub fn actions(action: Action) -> &'static [&'static str] {
    match action {
        Action::Create => &["create"],
        Action::Update => &["update"],
        Action::Replace => &["delete", "create"],
        Action::Destroy => &["delete"],
    }
}

fn resource_change(change: &Change) -> Value {
    let address = &change.address;
    let mut entry = json!({
        "address": address,
        "mode": "managed",
        "type": format!("nixgold_{}", address.kind()),
        "name": address.name(),
        "change": change_json(change),
        "nixgold": {
            "reason": change.reason,
            "impact": change.impact,
            "impact_description": change.impact.describe(),
            "phase": change.phase().number(),
            "phase_name": change.phase().describe(),
            "depends_on": change.depends_on,
            "generation": address.generation_number(),
        },
    });
    if let Some(index) = address.node() {
        entry["index"] = index.into();
    }
    if change.action == Action::Replace {
        entry["action_reason"] = if change.reason.contains("--replace") {
            "replace_by_request"
        } else {
            "replace_because_cannot_update"
        }
        .into();
    }
    entry
}

fn change_json(change: &Change) -> Value {
    let mut before = Map::new();
    let mut after = Map::new();
    let mut sensitive = Map::new();
    for (key, value) in &change.unchanged {
        before.insert(key.clone(), typed(value));
        after.insert(key.clone(), typed(value));
    }
    for field in &change.fields {
        if field.sensitive {
            sensitive.insert(field.field.clone(), true.into());
            continue;
        }
        if let Some(b) = &field.before {
            before.insert(field.field.clone(), typed(b));
        }
        if let Some(a) = &field.after {
            after.insert(field.field.clone(), typed(a));
        }
    }
    if let Work::ReplaceVm { old_node, new } = &change.work {
        // What is destroyed: the VM at that VMID, where it is now.
        before.insert("vmid".into(), new.vmid.get().into());
        before.insert("node".into(), old_node.to_string().into());
    }
    let (before, after) = match change.action {
        Action::Create => (Value::Null, Value::Object(after)),
        Action::Destroy => (Value::Object(before), Value::Null),
        Action::Update | Action::Replace => (Value::Object(before), Value::Object(after)),
    };
    let unknown: Map<String, Value> = after_unknown(&change.work)
        .iter()
        .map(|k| ((*k).to_owned(), true.into()))
        .collect();
    json!({
        "actions": actions(change.action),
        "before": before,
        "after": after,
        "after_unknown": unknown,
        "before_sensitive": if change.action == Action::Create { Value::Bool(false) } else { json!({}) },
        "after_sensitive": if change.action == Action::Destroy { Value::Bool(false) } else { Value::Object(sensitive) },
    })
}

/// Attributes only the apply learns: a build reads the installed system
/// back, and Proxmox generates a new VM's MAC addresses.
fn after_unknown(work: &Work) -> &'static [&'static str] {
    match work {
        Work::BuildTemplate { .. } => &["nixos_version", "system_path"],
        Work::CreateVm(_) | Work::ReplaceVm { .. } => &["mac"],
        _ => &[],
    }
}

/// A value as JSON: integers become numbers, the rest stay strings. A VMID
/// this plan allocates reads `1000 (allocated)` in the text plan; its JSON
/// value is the number.
fn typed(value: &str) -> Value {
    let number = value.strip_suffix(" (allocated)").unwrap_or(value);
    number
        .parse::<i64>()
        .map_or_else(|_| Value::String(value.to_owned()), Value::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_numbers_and_the_rest_strings() {
        assert_eq!(typed("4096"), json!(4096));
        assert_eq!(typed("1000 (allocated)"), json!(1000));
        assert_eq!(typed("40G"), json!("40G"));
        assert_eq!(typed("virtio,bridge=vmbr0"), json!("virtio,bridge=vmbr0"));
    }
}
