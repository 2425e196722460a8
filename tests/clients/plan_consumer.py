"""Reads a plan the way terraform-plan consumers do (policy checks, PR
comment bots): validate against the committed schema, then walk
`resource_changes`, group by `change.actions`, diff `before`/`after`
attribute by attribute, and mask what `*_sensitive` marks.

Usage: plan_consumer.py SCHEMA PLAN.json  (prints one summary line per
resource and a totals line; exits non-zero if the plan is unreadable).
"""
import json
import sys

import jsonschema

schema = json.load(open(sys.argv[1]))
plan = json.load(open(sys.argv[2]))
jsonschema.Draft202012Validator(schema).validate(plan)

major = plan["format_version"].split(".")[0]
if major != "1":
    sys.exit(f"unsupported format_version {plan['format_version']}")

ACTION = {
    ("create",): "create",
    ("update",): "update",
    ("delete", "create"): "replace",
    ("create", "delete"): "replace",
    ("delete",): "delete",
    ("no-op",): "no-op",
    ("read",): "read",
}
totals = {}
for rc in plan["resource_changes"]:
    change = rc["change"]
    kind = ACTION[tuple(change["actions"])]
    totals[kind] = totals.get(kind, 0) + 1
    before = change["before"] or {}
    after = change["after"] or {}
    sensitive = change["after_sensitive"] or {}
    unknown = change["after_unknown"] or {}
    diffs = []
    for key in sorted(set(before) | set(after) | set(sensitive) | set(unknown)):
        if sensitive.get(key):
            diffs.append(f"{key}=(sensitive)")
        elif unknown.get(key):
            diffs.append(f"{key}=(known after apply)")
        elif before.get(key) != after.get(key):
            diffs.append(f"{key}:{json.dumps(before.get(key))}->{json.dumps(after.get(key))}")
    print(f"{kind} {rc['type']}.{rc['name']} {rc['address']} {' '.join(diffs)}")
print("totals " + " ".join(f"{k}={v}" for k, v in sorted(totals.items())))
