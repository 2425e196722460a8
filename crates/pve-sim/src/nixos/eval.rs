//! The subset of Nix that a rendered `configuration.nix` is written in,
//! read with rnix: attribute paths and literal values, per module.
//!
//! This is not a Nix evaluator. A module is the attribute set a lambda
//! returns (the file itself, and each lambda in its `imports` list, as
//! nixgold merges `extra_config`). Nested attribute sets are flattened into
//! option paths; values are literals (booleans, integers, strings without
//! interpolation, lists of those), `pkgs.NAME` packages, or "something
//! else" (`lib.mkForce …`, `let`, interpolated strings), which the facts
//! neither check nor trust.

use rnix::ast::{self, HasEntry};

/// One segment of an option path, as NixOS names it (quotes removed).
pub type Path = Vec<String>;

/// A literal value of a definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Str(String),
    List(Vec<Value>),
    /// `pkgs.NAME` (NAME may be dotted).
    Package(String),
    /// Any other expression, by its source text.
    Other(String),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::List(items) => {
                f.write_str("[ ")?;
                for i in items {
                    write!(f, "{i} ")?;
                }
                f.write_str("]")
            }
            Value::Package(p) => write!(f, "«derivation {p}»"),
            Value::Other(text) => f.write_str(text),
        }
    }
}

/// One definition: an option path set to a value in a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub path: Path,
    pub value: Value,
    /// Where NixOS says the definition is: `/etc/nixos/configuration.nix`,
    /// or `…:anon-N` for the N-th lambda module of its `imports`.
    pub module: String,
}

/// Where `nixos-install` reads the configuration.
pub const CONFIGURATION: &str = "/etc/nixos/configuration.nix";

/// Every definition of a configuration file, in source order.
pub fn definitions(text: &str) -> Result<Vec<Definition>, String> {
    let parse = rnix::Root::parse(text);
    if let Some(e) = parse.errors().first() {
        return Err(format!("syntax error in configuration.nix: {e}"));
    }
    let mut out = Vec::new();
    let body = parse.tree().expr().map(lambda_body);
    match body {
        Some(ast::Expr::AttrSet(set)) => {
            let mut anon = 0;
            walk(&set, &[], CONFIGURATION, &mut anon, &mut out);
        }
        _ => {
            return Err(
                "configuration.nix is not a module (a function returning an attribute set)".into(),
            );
        }
    }
    Ok(out)
}

/// `{ … }: BODY` → BODY, through parentheses.
fn lambda_body(expr: ast::Expr) -> ast::Expr {
    match expr {
        ast::Expr::Lambda(l) => l.body().map_or(ast::Expr::Lambda(l), lambda_body),
        ast::Expr::Paren(p) => p.expr().map_or(ast::Expr::Paren(p), lambda_body),
        other => other,
    }
}

fn walk(
    set: &ast::AttrSet,
    prefix: &[String],
    module: &str,
    anon: &mut usize,
    out: &mut Vec<Definition>,
) {
    for entry in set.attrpath_values() {
        let Some(segments) = entry
            .attrpath()
            .map(|p| p.attrs().map(attr_name).collect::<Option<Vec<_>>>())
        else {
            continue;
        };
        let Some(segments) = segments else {
            continue;
        };
        let mut path = prefix.to_vec();
        path.extend(segments);
        let Some(value) = entry.value() else {
            continue;
        };
        if prefix.is_empty() && path == ["imports"] {
            imports(&value, anon, out);
            continue;
        }
        match value {
            ast::Expr::AttrSet(inner) if inner.rec_token().is_none() => {
                walk(&inner, &path, module, anon, out)
            }
            other => out.push(Definition {
                path,
                value: literal(&other),
                module: module.to_owned(),
            }),
        }
    }
}

/// The lambda modules of an `imports` list (paths are not followed).
fn imports(list: &ast::Expr, anon: &mut usize, out: &mut Vec<Definition>) {
    let ast::Expr::List(list) = list else {
        return;
    };
    for item in list.items() {
        if let ast::Expr::AttrSet(set) = lambda_body(item) {
            *anon += 1;
            let module = format!("{CONFIGURATION}:anon-{anon}");
            walk(&set, &[], &module, &mut 0, out);
        }
    }
}

fn attr_name(attr: ast::Attr) -> Option<String> {
    match attr {
        ast::Attr::Ident(i) => i.ident_token().map(|t| t.text().to_owned()),
        ast::Attr::Str(s) => plain_string(&s),
        ast::Attr::Dynamic(_) => None,
    }
}

fn plain_string(s: &ast::Str) -> Option<String> {
    s.normalized_parts()
        .into_iter()
        .map(|p| match p {
            ast::InterpolPart::Literal(l) => Some(l),
            ast::InterpolPart::Interpolation(_) => None,
        })
        .collect()
}

fn literal(expr: &ast::Expr) -> Value {
    use rowan::ast::AstNode as _;
    let other = || Value::Other(expr.syntax().text().to_string());
    match expr {
        ast::Expr::Ident(i) => match i.ident_token().as_ref().map(|t| t.text()) {
            Some("true") => Value::Bool(true),
            Some("false") => Value::Bool(false),
            _ => other(),
        },
        ast::Expr::Literal(l) => match l.kind() {
            ast::LiteralKind::Integer(i) => i.value().map_or_else(|_| other(), Value::Int),
            _ => other(),
        },
        ast::Expr::Str(s) => plain_string(s).map_or_else(other, Value::Str),
        ast::Expr::List(l) => Value::List(l.items().map(|i| literal(&i)).collect()),
        ast::Expr::Paren(p) => p.expr().map_or_else(other, |e| literal(&e)),
        ast::Expr::Select(s) => match (s.expr(), s.attrpath(), s.default_expr()) {
            (Some(ast::Expr::Ident(base)), Some(path), None)
                if base.ident_token().is_some_and(|t| t.text() == "pkgs") =>
            {
                path.attrs()
                    .map(attr_name)
                    .collect::<Option<Vec<_>>>()
                    .map_or_else(other, |p| Value::Package(p.join(".")))
            }
            _ => other(),
        },
        _ => other(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_sets_flatten_into_option_paths_per_module() {
        let defs = definitions(
            r#"{ config, lib, pkgs, ... }: {
  imports = [ ./hardware-configuration.nix ({ lib, ... }: { services.openssh.enable = lib.mkForce false; x.y = 1; }) ];
  services.openssh = { enable = true; settings.PermitRootLogin = "prohibit-password"; };
  fileSystems."/boot".device = "/dev/disk/by-label/boot";
  environment.systemPackages = [ pkgs.vim pkgs.python3Packages.requests ];
  networking.hostName = "a${"b"}";
}"#,
        )
        .unwrap();
        let find = |p: &[&str]| {
            defs.iter()
                .filter(|d| d.path == p)
                .map(|d| (d.module.as_str(), d.value.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            find(&["services", "openssh", "enable"]),
            vec![
                (
                    "/etc/nixos/configuration.nix:anon-1",
                    Value::Other("lib.mkForce false".into())
                ),
                ("/etc/nixos/configuration.nix", Value::Bool(true)),
            ]
        );
        assert_eq!(
            find(&["fileSystems", "/boot", "device"])[0].1,
            Value::Str("/dev/disk/by-label/boot".into())
        );
        assert_eq!(
            find(&["environment", "systemPackages"])[0].1,
            Value::List(vec![
                Value::Package("vim".into()),
                Value::Package("python3Packages.requests".into())
            ])
        );
        assert!(matches!(
            find(&["networking", "hostName"])[0].1,
            Value::Other(_)
        ));
        assert_eq!(find(&["x", "y"])[0].1, Value::Int(1));
    }

    #[test]
    fn a_syntax_error_is_nix_s_own() {
        let err = definitions("{ ... }: { a = 1 }").unwrap_err();
        assert!(
            err.starts_with("syntax error in configuration.nix: "),
            "{err}"
        );
    }
}
