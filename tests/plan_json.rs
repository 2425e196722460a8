//! Plans for programs and saved plans, on the embedded simulator:
//! `plan --json` validates against `schema/plan.schema.json` and a
//! terraform-plan consumer (`tests/clients/plan_consumer.py`) reads it;
//! `apply --json` is JSON Lines ending with a summary; `show` shows a saved
//! plan and the managed state; a saved plan refuses another target and
//! flags that would change it; the text plan is coloured only when asked.

mod common;

use std::path::Path;

use common::{nixgold, repo, run};

fn sim(dir: &Path, args: &[&str]) -> (i32, String, String) {
    run(nixgold(dir)
        .env("NIXGOLD_SIM_DIR", dir.join("sim"))
        .env("NIXGOLD_SIM_FAST", "1")
        .env("NIXOS_PROD_01_PASSWORD", "change-me")
        .env_remove("NIXGOLD_SIM")
        .args(args))
}

/// Runs the consumer script on `plan`; None when Python's jsonschema is
/// missing outside CI.
fn consume(dir: &Path, plan: &str) -> Option<String> {
    if !common::python_has("jsonschema") {
        return None;
    }
    let file = dir.join("consumed-plan.json");
    std::fs::write(&file, plan).unwrap();
    let out = std::process::Command::new("python3")
        .arg(repo().join("tests/clients/plan_consumer.py"))
        .arg(repo().join("schema/plan.schema.json"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the consumer rejects the plan: {}\n{plan}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn plan_json_has_terraforms_shape_and_a_consumer_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = repo().join("fleets/example.ncl");
    let fleet = fleet.to_str().unwrap();
    let (code, out, err) = sim(dir.path(), &["--sim", "--json", "plan", fleet]);
    assert_eq!(code, 0, "{err}");
    let plan = json(&out);
    assert_eq!(plan["format_version"], "1.1");
    assert_eq!(plan["nixgold"]["rollout"], serde_json::Value::Null);
    let vm = &plan["resource_changes"][2];
    assert_eq!(vm["address"], "vm.nixos-prod-01");
    assert_eq!(vm["type"], "nixgold_vm");
    assert_eq!(vm["change"]["actions"], serde_json::json!(["create"]));
    assert_eq!(vm["change"]["before"], serde_json::Value::Null);
    assert_eq!(vm["change"]["after"]["memory"], 8192, "typed values");
    assert_eq!(vm["change"]["after_sensitive"]["cipassword"], true);
    assert!(vm["change"]["after"].get("cipassword").is_none());
    assert_eq!(vm["nixgold"]["reason"], "not in the cluster");
    assert!(
        !out.contains("install_script") && !out.contains("nixos-install"),
        "build internals are `render`'s, not the plan's"
    );
    if let Some(read) = consume(dir.path(), &out) {
        assert!(read.ends_with("totals create=3\n"), "{read}");
        assert!(read.contains("cipassword=(sensitive)"), "{read}");
    }

    // Apply, then change the VM's memory: an update with whole objects.
    let (code, events, err) = sim(
        dir.path(),
        &["--sim", "--json", "apply", fleet, "--auto-approve"],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = events.lines().map(json).collect();
    assert_eq!(lines[0]["type"], "version");
    assert!(lines.iter().any(|l| l["type"] == "step_start"));
    assert!(
        lines.iter().any(|l| l["type"] == "step_start"
            && l["step"]
                .as_str()
                .unwrap()
                .contains("1/9 create the build VM")),
        "the build's steps are counted"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "change_summary", "{events}");
    assert_eq!(
        (last["create"].as_u64(), last["ok"].as_bool()),
        (Some(3), Some(true))
    );

    let edited = std::fs::read_to_string(fleet)
        .unwrap()
        .replace("memory = 8192", "memory = 4096");
    std::fs::write(dir.path().join("fleet.ncl"), edited).unwrap();
    let (code, out, err) = sim(dir.path(), &["--sim", "--json", "plan", "fleet.ncl"]);
    assert_eq!(code, 0, "{err}");
    let change = &json(&out)["resource_changes"][0]["change"];
    assert_eq!(change["actions"], serde_json::json!(["update"]));
    assert_eq!(
        (
            change["before"]["memory"].as_u64(),
            change["after"]["memory"].as_u64()
        ),
        (Some(8192), Some(4096))
    );
    assert_eq!(
        change["before"]["cores"], 4,
        "whole objects, not only the diff"
    );
    assert_eq!(change["after"]["cores"], 4);
    if let Some(read) = consume(dir.path(), &out) {
        assert!(
            read.contains("update nixgold_vm.nixos-prod-01 vm.nixos-prod-01 memory:8192->4096\n"),
            "{read}"
        );
    }
}

#[test]
fn saved_plans_are_shown_and_apply_only_where_they_were_planned() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = repo().join("fleets/example.ncl");
    let fleet = fleet.to_str().unwrap();
    let (code, _, err) = sim(dir.path(), &["--sim", "plan", fleet, "--out", "p.json"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("apply it with `nixgold --sim apply p.json`"),
        "the hint keeps --sim: {err}"
    );

    let (code, text, _) = sim(dir.path(), &["show", "p.json"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("Plan: 3 to create, 0 to update, 0 to replace, 0 to destroy."),
        "{text}"
    );
    assert!(text.contains("Saved for the embedded simulator"), "{text}");
    let (code, out, _) = sim(dir.path(), &["show", "p.json", "--json"]);
    assert_eq!(code, 0);
    let shown = json(&out);
    assert_eq!(shown["resource_changes"].as_array().unwrap().len(), 3);
    assert_eq!(
        shown["nixgold"]["saved"]["target"]["cluster"]["kind"],
        "simulator"
    );
    assert_eq!(shown["nixgold"]["saved"]["target"]["fleet"], "homelab");

    // Forgetting --sim must not send the plan to the fleet's endpoint.
    let (code, _, err) = sim(dir.path(), &["apply", "p.json"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("refusing to apply p.json: it was made for the embedded simulator")
            && err.contains("this run targets the Proxmox endpoint https://192.168.1.10:8006")
            && err.contains("hint: `nixgold --sim apply p.json`"),
        "{err}"
    );
    // Another simulator is another cluster.
    let other = run(nixgold(dir.path())
        .env("NIXGOLD_SIM_DIR", dir.path().join("other-sim"))
        .env("NIXGOLD_SIM_FAST", "1")
        .args(["--sim", "apply", "p.json"]));
    assert_eq!(other.0, 1);
    assert!(other.2.contains("other-sim"), "{}", other.2);
    assert!(
        !dir.path().join("other-sim").exists(),
        "refused before starting it"
    );
    for flag in [
        ["--target", "vm.nixos-prod-01"],
        ["--replace", "vm.nixos-prod-01"],
    ] {
        let (code, _, err) = sim(dir.path(), &["--sim", "apply", "p.json", flag[0], flag[1]]);
        assert_eq!(code, 1);
        assert!(
            err.contains(&format!("{} cannot change a saved plan", flag[0])),
            "{err}"
        );
    }

    let (code, out, err) = sim(dir.path(), &["--sim", "apply", "p.json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Apply complete: 3 created"), "{out}");
    let (code, state, _) = sim(dir.path(), &["--sim", "show", fleet]);
    assert_eq!(code, 0);
    assert!(
        state.contains("sim/example.lock"),
        "the fleet's own lockfile: {state}"
    );
    assert!(
        state.contains("image.nixos-golden-template: current generation 1"),
        "{state}"
    );
    let (code, state, _) = sim(dir.path(), &["--sim", "show", fleet, "--json"]);
    assert_eq!(code, 0);
    let resources = &json(&state)["values"]["root_module"]["resources"];
    assert!(
        resources
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["address"] == "image.nixos-golden-template" && r["values"]["current"] == 1),
        "{state}"
    );
}

#[test]
fn the_plan_is_coloured_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = repo().join("fleets/example.ncl");
    let fleet = fleet.to_str().unwrap();
    let (_, plain, _) = sim(dir.path(), &["--sim", "plan", fleet]);
    assert!(!plain.contains('\x1b'), "NO_COLOR and a pipe: no colour");
    let (_, coloured, _) = sim(dir.path(), &["--sim", "--color", "always", "plan", fleet]);
    assert!(
        coloured.contains("\x1b[32m+\x1b[0m vm.nixos-prod-01 {"),
        "{coloured}"
    );
    assert!(
        coloured.contains("\x1b[1m# vm.nixos-prod-01 will be created\x1b[0m"),
        "{coloured}"
    );
    assert!(coloured.contains("\x1b[1mPlan: 3 to create"), "{coloured}");
    let strip = coloured
        .replace("\x1b[32m", "")
        .replace("\x1b[1m", "")
        .replace("\x1b[0m", "");
    assert_eq!(strip, plain, "colour changes nothing but colour");
    let (_, never, _) = sim(dir.path(), &["--sim", "--color", "never", "plan", fleet]);
    assert_eq!(never, plain);
}
