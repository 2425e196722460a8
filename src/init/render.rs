//! Writing a drafted fleet (a JSON value, keys in order) as Nickel or YAML
//! text a person then edits: one key a line, strings quoted, short lists
//! inline.

use serde_json::Value;

/// The output format, from the file name (`.yaml`/`.yml`, else Nickel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Nickel,
    Yaml,
}

impl Format {
    pub fn for_path(path: &std::path::Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => Format::Yaml,
            _ => Format::Nickel,
        }
    }
}

/// `header` lines become comments above the fleet.
pub fn render(value: &Value, format: Format, header: &[String]) -> String {
    let mut out: String = header.iter().map(|l| format!("# {l}\n")).collect();
    match format {
        Format::Nickel => {
            nickel(value, 0, &mut out);
            out.push('\n');
        }
        Format::Yaml => yaml_map(value, 0, &mut out),
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(scalar).collect();
            format!("[{}]", inner.join(", "))
        }
        other => other.to_string(),
    }
}

fn nickel_key(k: &str) -> String {
    let ident = k
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ident {
        k.to_owned()
    } else {
        Value::String(k.to_owned()).to_string()
    }
}

fn nickel(v: &Value, depth: usize, out: &mut String) {
    let Value::Object(map) = v else {
        out.push_str(&scalar(v));
        return;
    };
    if map.is_empty() {
        out.push_str("{}");
        return;
    }
    let pad = "  ".repeat(depth + 1);
    out.push_str("{\n");
    for (k, child) in map {
        out.push_str(&format!("{pad}{} = ", nickel_key(k)));
        nickel(child, depth + 1, out);
        out.push_str(",\n");
    }
    out.push_str(&"  ".repeat(depth));
    out.push('}');
}

fn yaml_map(v: &Value, depth: usize, out: &mut String) {
    let Value::Object(map) = v else { return };
    let pad = "  ".repeat(depth);
    for (k, child) in map {
        let key = if k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            k.clone()
        } else {
            Value::String(k.clone()).to_string()
        };
        match child {
            Value::Object(m) if !m.is_empty() => {
                out.push_str(&format!("{pad}{key}:\n"));
                yaml_map(child, depth + 1, out);
            }
            Value::Object(_) => out.push_str(&format!("{pad}{key}: {{}}\n")),
            other => out.push_str(&format!("{pad}{key}: {}\n", scalar(other))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_quote_strings_and_keep_key_order() {
        let v = serde_json::json!({ "fleet": "lab", "vms": { "web-01": { "tags": ["a"], "note": "x\"y" } }, "isos": {} });
        let n = render(&v, Format::Nickel, &["hi".into()]);
        assert_eq!(
            n,
            "# hi\n{\n  fleet = \"lab\",\n  vms = {\n    web-01 = {\n      tags = [\"a\"],\n      note = \"x\\\"y\",\n    },\n  },\n  isos = {},\n}\n"
        );
        let y = render(&v, Format::Yaml, &[]);
        assert_eq!(
            y,
            "fleet: \"lab\"\nvms:\n  web-01:\n    tags: [\"a\"]\n    note: \"x\\\"y\"\nisos: {}\n"
        );
    }
}
