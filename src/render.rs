//! Plans for people: terraform's grammar (`+`, `~`, `-/+`, `-`), a legend
//! of the symbols used, per-resource headers with the reason and impact,
//! field diffs (`similar` line diffs for multi-line values), `(sensitive)`
//! for secrets, a summary line, "No changes." when there are none. Pure:
//! returns strings. `--json` serialises the same `Plan`.

use std::fmt::Write as _;

use similar::{ChangeTag, TextDiff};

use crate::plan::{Action, Change, FieldDiff, Plan, Work};

/// The human rendering of `plan`, coloured like terraform's when `color`.
pub fn plan_text(plan: &Plan, color: bool) -> String {
    let text = plain_plan_text(plan);
    if color { paint(&text) } else { text }
}

/// ANSI SGR codes: terraform's palette.
const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

/// Colours a rendered plan line by line, as terraform does: the `+` of a
/// line green, `-` red, `~` yellow, `-/+` red and green; resource headers
/// (`#`) and the summary bold.
fn paint(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 4);
    for line in text.lines() {
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        let (sign, rest) = body.split_once(' ').unwrap_or((body, ""));
        let _ = match sign {
            "-/+" => writeln!(out, "{indent}{RED}-{RESET}/{GREEN}+{RESET} {rest}"),
            "+" => writeln!(out, "{indent}{GREEN}+{RESET} {rest}"),
            "-" => writeln!(out, "{indent}{RED}-{RESET} {rest}"),
            "~" => writeln!(out, "{indent}{YELLOW}~{RESET} {rest}"),
            "#" | "Plan:" | "No" => writeln!(out, "{indent}{BOLD}{body}{RESET}"),
            _ => writeln!(out, "{line}"),
        };
    }
    out
}

fn plain_plan_text(plan: &Plan) -> String {
    let mut out = String::new();
    if plan.is_empty() {
        out.push_str("No changes. The cluster matches the fleet.\n");
        write_kept(plan, &mut out);
        return out;
    }
    let used: Vec<Action> = [
        Action::Create,
        Action::Update,
        Action::Replace,
        Action::Destroy,
    ]
    .into_iter()
    .filter(|a| plan.count(*a) > 0)
    .collect();
    out.push_str("nixgold will perform these actions (symbols:");
    for a in &used {
        let word = match a {
            Action::Create => "create",
            Action::Update => "update in place",
            Action::Replace => "destroy and then create",
            Action::Destroy => "destroy",
        };
        let _ = write!(out, " {} {word};", a.symbol());
    }
    out.pop();
    out.push_str("):\n");
    for change in &plan.changes {
        write_change(change, &mut out);
    }
    let _ = writeln!(
        out,
        "\nPlan: {} to create, {} to update, {} to replace, {} to destroy.",
        plan.count(Action::Create),
        plan.count(Action::Update),
        plan.count(Action::Replace),
        plan.count(Action::Destroy)
    );
    if let Some(rollout) = &plan.rollout {
        write_rollout(rollout, &mut out);
    }
    write_kept(plan, &mut out);
    out
}

/// `Rollout: 3 batches …` and one line per batch.
fn write_rollout(rollout: &crate::rollout::Rollout, out: &mut String) {
    let n = rollout.batches.len();
    let _ = write!(
        out,
        "Rollout: {n} batch{} of the VMs that follow new generations, each behind its gates ({})",
        if n == 1 { "" } else { "es" },
        rollout.gates_text()
    );
    match rollout.pause {
        Some(pause) => {
            let _ = writeln!(out, ", {pause} apart:");
        }
        None => out.push_str(":\n"),
    }
    for (i, batch) in rollout.batches.iter().enumerate() {
        let _ = writeln!(out, "  batch {}: {}", i + 1, batch.join(", "));
    }
}

fn write_kept(plan: &Plan, out: &mut String) {
    for note in &plan.notes {
        let _ = writeln!(out, "Note: {note}");
    }
    for (generation, users) in &plan.retained {
        let _ = writeln!(
            out,
            "Note: {generation} is beyond rebuild.keep but stays: {} use it.",
            users.join(", ")
        );
    }
    for (address, vmid) in &plan.kept {
        let _ = writeln!(
            out,
            "Note: {address} (VMID {vmid}) is no longer in the fleet; it is kept. Pass --allow-destroy to destroy it."
        );
    }
}

pub(crate) fn write_change(change: &Change, out: &mut String) {
    let Change {
        address,
        action,
        fields,
        reason,
        impact,
        work: _,
        unchanged: _,
    } = change;
    let verb = match action {
        Action::Create => "will be created",
        Action::Update => "will be updated in place",
        Action::Replace => "must be replaced",
        Action::Destroy => "will be destroyed",
    };
    let _ = writeln!(out, "\n  # {address} {verb}");
    let _ = writeln!(out, "  # (because {reason}; {})", impact.describe());
    let _ = writeln!(out, "{:>3} {address} {{", action.symbol());
    let width = fields.iter().map(|f| f.field.len()).max().unwrap_or(0);
    for field in fields {
        write_field(field, *action, width, out);
    }
    out.push_str("    }\n");
}

fn write_field(field: &FieldDiff, action: Action, width: usize, out: &mut String) {
    let FieldDiff {
        field: name,
        before,
        after,
        sensitive,
    } = field;
    let pad = width - name.len();
    if *sensitive {
        let _ = writeln!(out, "      {name}{:pad$} = (sensitive)", "");
        return;
    }
    let multiline = before.as_deref().is_some_and(|b| b.contains('\n'))
        || after.as_deref().is_some_and(|a| a.contains('\n'));
    match (before, after) {
        (Some(b), Some(a)) if multiline => {
            let _ = writeln!(out, "    ~ {name} =");
            for op in TextDiff::from_lines(b.as_str(), a.as_str()).iter_all_changes() {
                let sign = match op.tag() {
                    ChangeTag::Delete => "-",
                    ChangeTag::Insert => "+",
                    ChangeTag::Equal => " ",
                };
                let _ = write!(out, "        {sign} {}", op.value());
                if !op.value().ends_with('\n') {
                    out.push('\n');
                }
            }
        }
        (Some(b), Some(a)) => {
            let _ = writeln!(
                out,
                "    ~ {name}{:pad$} = {} -> {}",
                "",
                quote(b),
                quote(a)
            );
        }
        (None, Some(a)) if multiline => {
            let sign = if action == Action::Update { "+" } else { " " };
            let _ = writeln!(out, "    {sign} {name}{:pad$} =", "");
            for line in a.lines() {
                let _ = writeln!(out, "          {line}");
            }
        }
        (None, Some(a)) => {
            let sign = if action == Action::Update { "+" } else { " " };
            let _ = writeln!(out, "    {sign} {name}{:pad$} = {}", "", quote(a));
        }
        (Some(b), None) => {
            let _ = writeln!(out, "    - {name}{:pad$} = {}", "", quote(b));
        }
        (None, None) => {}
    }
}

fn quote(v: &str) -> String {
    if v.parse::<i64>().is_ok() {
        v.to_owned()
    } else {
        format!("{v:?}")
    }
}

/// The phase a change runs in, as apply orders them.
pub(crate) fn phase(change: &Change) -> (usize, &'static str) {
    match &change.work {
        Work::DestroyVm { .. } => (1, "destroy VMs"),
        Work::DownloadIso { .. } => (2, "download ISOs"),
        Work::BuildTemplate { .. } => (3, "build generations"),
        Work::DestroyTemplate { .. } => (5, "retire old generations"),
        _ => (4, "clone and configure VMs"),
    }
}

/// What `change` waits for inside the plan.
pub(crate) fn waits_for<'a>(change: &'a Change, plan: &'a Plan) -> Vec<&'a str> {
    match &change.work {
        Work::CreateVm(w) | Work::UpdateVm(w) | Work::ReplaceVm { new: w, .. } => w
            .after
            .iter()
            .filter(|a| plan.changes.iter().any(|c| &c.address == *a))
            .map(String::as_str)
            .collect(),
        Work::DestroyTemplate { after, .. } => after.iter().map(String::as_str).collect(),
        Work::BuildTemplate { build, .. } => plan
            .changes
            .iter()
            .filter(|c| matches!(&c.work, Work::DownloadIso { node, .. } if *node == build.node))
            .map(|c| c.address.as_str())
            .collect(),
        _ => Vec::new(),
    }
}

/// The plan's execution order: phases in order, and what waits for what.
pub fn plan_order_text(plan: &Plan) -> String {
    let mut out = String::new();
    let mut phases: Vec<(usize, &str)> = plan.changes.iter().map(phase).collect();
    phases.sort();
    phases.dedup();
    for (n, name) in phases {
        let _ = writeln!(out, "{n}. {name}");
        for c in plan.changes.iter().filter(|c| phase(c).0 == n) {
            let waits = waits_for(c, plan);
            let after = if waits.is_empty() {
                String::new()
            } else {
                format!(" (after {})", waits.join(", "))
            };
            let _ = writeln!(out, "   {} {}{after}", c.action.symbol(), c.address);
        }
    }
    if out.is_empty() {
        out.push_str("No changes.\n");
    }
    out
}

/// The same as Graphviz DOT: one cluster per phase, an edge per wait.
pub fn plan_order_dot(plan: &Plan) -> String {
    let mut out = String::from(
        "digraph nixgold_plan {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
    );
    let mut phases: Vec<(usize, &str)> = plan.changes.iter().map(phase).collect();
    phases.sort();
    phases.dedup();
    for (n, name) in &phases {
        let _ = writeln!(out, "  subgraph cluster_{n} {{\n    label=\"{n}. {name}\";");
        for c in plan.changes.iter().filter(|c| phase(c).0 == *n) {
            let _ = writeln!(
                out,
                "    \"{}\" [label=\"{} {}\"];",
                c.address,
                c.action.symbol(),
                c.address
            );
        }
        out.push_str("  }\n");
    }
    for c in &plan.changes {
        for w in waits_for(c, plan) {
            let _ = writeln!(out, "  \"{w}\" -> \"{}\";", c.address);
        }
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_values_get_a_line_diff() {
        let mut out = String::new();
        write_field(
            &FieldDiff {
                field: "sshkeys".into(),
                before: Some("a\nb".into()),
                after: Some("a\nc".into()),
                sensitive: false,
            },
            Action::Update,
            7,
            &mut out,
        );
        assert!(
            out.contains("        - b")
                && out.contains("        + c")
                && out.contains("          a"),
            "{out}"
        );
    }
}
