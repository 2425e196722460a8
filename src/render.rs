//! Plans for people: terraform's grammar (`+`, `~`, `-/+`, `-`), a legend
//! of the symbols used, per-resource headers with the reason and impact,
//! field diffs (`similar` line diffs for multi-line values), `(sensitive)`
//! for secrets, a summary line, "No changes." when there are none. Pure:
//! returns strings. `--json` serialises the same `Plan`.

use std::fmt::Write as _;

use similar::{ChangeTag, TextDiff};

use crate::plan::{Action, Change, FieldDiff, Plan};

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
fn write_rollout(rollout: &crate::plan::Rollout, out: &mut String) {
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
        depends_on: _,
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

/// The plan's order (the order of `plan.changes`, which is the DAG's,
/// apply's start order and the text plan's): changes under the label of
/// their phase, each with what it waits for.
pub fn plan_order_text(plan: &Plan) -> String {
    let mut out = String::new();
    let mut phase = None;
    for c in &plan.changes {
        if phase != Some(c.phase()) {
            phase = Some(c.phase());
            let _ = writeln!(out, "{}. {}", c.phase().number(), c.phase().describe());
        }
        let after = if c.depends_on.is_empty() {
            String::new()
        } else {
            format!(" (after {})", join(&c.depends_on))
        };
        let _ = writeln!(out, "   {} {}{after}", c.action.symbol(), c.address);
    }
    if out.is_empty() {
        out.push_str("No changes.\n");
    }
    out
}

fn join(addresses: &[crate::address::Address]) -> String {
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The same as Graphviz DOT: the changes in the plan's order, one cluster
/// per run of a phase, an edge per dependency.
pub fn plan_order_dot(plan: &Plan) -> String {
    let mut out = String::from(
        "digraph nixgold_plan {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
    );
    let mut phase = None;
    for c in &plan.changes {
        if phase != Some(c.phase()) {
            if phase.is_some() {
                out.push_str("  }\n");
            }
            phase = Some(c.phase());
            let n = c.phase().number();
            let _ = writeln!(
                out,
                "  subgraph cluster_{n} {{\n    label=\"{n}. {}\";",
                c.phase().describe()
            );
        }
        let _ = writeln!(
            out,
            "    \"{}\" [label=\"{} {}\"];",
            c.address,
            c.action.symbol(),
            c.address
        );
    }
    if phase.is_some() {
        out.push_str("  }\n");
    }
    for c in &plan.changes {
        for d in &c.depends_on {
            let _ = writeln!(out, "  \"{d}\" -> \"{}\";", c.address);
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
