//! `schema/fleet.schema.json` is generated from `schema/fleet.ncl`, the same
//! source the contracts come from; this test fails when it is out of date,
//! and checks that an ordinary JSON Schema validator accepts the examples.

mod common;

use common::{nixgold, repo, run};

#[test]
fn checked_in_json_schema_is_up_to_date() {
    let checked_in = std::fs::read_to_string(repo().join("schema/fleet.schema.json")).unwrap();
    let generated = nixgold::fleet::load::json_schema();
    assert!(
        checked_in == generated,
        "schema/fleet.schema.json is out of date: run `cargo run -- schema > schema/fleet.schema.json`"
    );
    let (code, stdout, _) = run(nixgold(&repo()).arg("schema"));
    assert_eq!(code, 0);
    assert_eq!(stdout, generated);
}

#[test]
fn a_json_schema_validator_agrees_with_the_contracts() {
    // Python's `jsonschema` stands in for what a YAML editor does.
    if !common::python_has("jsonschema, yaml") {
        return;
    }
    let script = r#"
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
validator = jsonschema.Draft202012Validator(schema)
ok = list(validator.iter_errors(yaml.safe_load(open(sys.argv[2]))))
bad = list(validator.iter_errors(yaml.safe_load(open(sys.argv[3]))))
# Every default must satisfy its own schema: the Fleet contract fills
# defaults in without checking them again.
def defaults(node, path):
    if isinstance(node, dict):
        if "default" in node:
            yield path, node
        for k, v in node.items():
            yield from defaults(v, path + [k])
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from defaults(v, path + [str(i)])
wrong = [".".join(p) for p, node in defaults(schema, [])
         if list(jsonschema.Draft202012Validator(node).iter_errors(node["default"]))]
print(len(ok), len(bad), len(wrong), " ".join(wrong))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(repo().join("schema/fleet.schema.json"))
        .arg(repo().join("fleets/example.yaml"))
        .arg(repo().join("tests/fleets/broken/unknown-field.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts: Vec<usize> = text
        .split_whitespace()
        .take(3)
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(counts[0], 0, "the editor schema rejects the valid example");
    assert!(counts[1] > 0, "the editor schema accepts an unknown field");
    assert_eq!(counts[2], 0, "defaults that break their own schema: {text}");
}
