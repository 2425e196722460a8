//! `apply --json`: the run as JSON Lines on stdout, one event per line,
//! modelled on terraform's machine-readable UI (`terraform apply -json`).
//! Every line has `@level`, `@message` (the text a person would read),
//! `@timestamp` (RFC 3339) and `type`:
//!
//! - `version` — first: nixgold's version and this stream's `format_version`;
//! - `planned_change` — one per change of the plan (`address`, `actions`,
//!   `reason`, `impact`);
//! - `step_start`, `step_progress`, `step_retry`, `step_complete`
//!   (`elapsed_secs`), `step_errored` — apply's steps as they happen;
//! - `change_complete`, `change_errored`, `change_skipped` — each change's
//!   outcome once apply has finished;
//! - `change_summary` — last: counts per action, `failed`, `ok`.

use std::io::Write;

use serde_json::{Value, json};

use crate::apply::{ChangeReport, Event, Outcome};
use crate::plan::{Action, Plan};

/// Writes one event line to stdout.
fn emit(kind: &str, level: &str, message: String, fields: Value) {
    let mut line = json!({
        "@level": level,
        "@message": message,
        "@timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "type": kind,
    });
    if let (Some(line), Value::Object(fields)) = (line.as_object_mut(), fields) {
        line.extend(fields);
    }
    let mut stdout = std::io::stdout().lock();
    // Secret values never reach the stream (errors and build output may carry them).
    let _ = writeln!(stdout, "{}", crate::redact::redact(&line.to_string()));
    let _ = stdout.flush();
}

/// The opening lines: the version, then the plan's changes.
pub fn start(plan: &Plan) {
    emit(
        "version",
        "info",
        format!("nixgold {}", env!("CARGO_PKG_VERSION")),
        json!({ "nixgold": env!("CARGO_PKG_VERSION"), "format_version": crate::plan_json::FORMAT_VERSION }),
    );
    for c in &plan.changes {
        emit(
            "planned_change",
            "info",
            format!("{}: plan to {:?}", c.address, c.action).to_lowercase(),
            json!({
                "address": c.address,
                "actions": crate::plan_json::actions(c.action),
                "reason": c.reason,
                "impact": c.impact,
            }),
        );
    }
}

/// One of apply's events as it happens.
pub fn event(event: Event) {
    match event {
        Event::Started { address, step } => emit(
            "step_start",
            "info",
            format!("{address}: {step}…"),
            json!({ "address": address, "step": step }),
        ),
        Event::Progress { address, line } => emit(
            "step_progress",
            "info",
            format!("{address}: {line}"),
            json!({ "address": address, "line": line }),
        ),
        Event::Retrying {
            address,
            step,
            error,
        } => emit(
            "step_retry",
            "warn",
            format!("{address}: {step}: {error}; retrying"),
            json!({ "address": address, "step": step, "error": error }),
        ),
        Event::Finished {
            address,
            step,
            elapsed,
        } => emit(
            "step_complete",
            "info",
            format!("{address}: {step} done ({:.1}s)", elapsed.as_secs_f64()),
            json!({ "address": address, "step": step, "elapsed_secs": elapsed.as_secs_f64() }),
        ),
        Event::Failed {
            address,
            step,
            error,
        } => emit(
            "step_errored",
            "error",
            format!("{address}: {step} FAILED: {error}"),
            json!({ "address": address, "step": step, "error": error }),
        ),
    }
}

/// The closing lines: each change's outcome, then the summary.
pub fn finish(plan: &Plan, changes: &[ChangeReport]) {
    for c in changes {
        let actions = crate::plan_json::actions(c.action);
        match &c.outcome {
            Outcome::Done => emit(
                "change_complete",
                "info",
                format!("{}: done", c.address),
                json!({ "address": c.address, "actions": actions }),
            ),
            Outcome::Failed { step, error } => emit(
                "change_errored",
                "error",
                format!("{}: FAILED at {step}: {error}", c.address),
                json!({ "address": c.address, "actions": actions, "step": step, "error": error }),
            ),
            Outcome::Skipped { because } => emit(
                "change_skipped",
                "error",
                format!("{}: skipped ({because})", c.address),
                json!({ "address": c.address, "actions": actions, "because": because }),
            ),
        }
    }
    let failed = changes
        .iter()
        .filter(|c| c.outcome != Outcome::Done)
        .count();
    let count = |a| plan.count(a);
    emit(
        "change_summary",
        if failed == 0 { "info" } else { "error" },
        format!(
            "Apply {}: {} created, {} updated, {} replaced, {} destroyed, {failed} failed.",
            if failed == 0 {
                "complete"
            } else {
                "incomplete"
            },
            count(Action::Create),
            count(Action::Update),
            count(Action::Replace),
            count(Action::Destroy)
        ),
        json!({
            "operation": "apply",
            "create": count(Action::Create),
            "update": count(Action::Update),
            "replace": count(Action::Replace),
            "destroy": count(Action::Destroy),
            "failed": failed,
            "ok": failed == 0,
        }),
    );
}
