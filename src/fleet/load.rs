//! Loading a fleet file: Nickel evaluates it (or the YAML/JSON it imports)
//! under the `Fleet` contract of `schema/fleet.ncl`, exports it to JSON, and
//! serde turns that into [`Fleet`].
//!
//! A fleet is first evaluated as it is and checked in Rust against the same
//! schema data ([`schema_check`]): a valid fleet of 10,000 VMs loads in a
//! fraction of a second instead of the contract's ten. Only a fleet that
//! check does not prove valid is evaluated under the contract, which then
//! explains what is wrong.
//!
//! One path for every format: a YAML fleet is imported by Nickel, so its
//! contract errors point at the YAML file's own line and column. This module
//! turns Nickel's diagnostics into [`Problem`]s; it does no semantic checks.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use codespan_reporting::files::Files;
use nickel_lang_core::error::IntoDiagnostics;
use nickel_lang_core::eval::cache::CacheImpl;
use nickel_lang_core::program::{Program, ProgramBuilder};
use nickel_lang_core::serialize::{ExportFormat, to_string};

use super::{Fleet, LoadedFleet, schema_check};
use crate::problem::Problem;

/// Name of the in-memory program that applies the contract to the fleet.
const WRAPPER_NAME: &str = "<nixgold>";

/// The contract's reasons for a secret written in the fleet
/// (schema/fleet.ncl): inline, or where a variable's name belongs.
const SECRET_REASONS: [&str; 2] = [
    "a secret is written inline",
    "a secret is written where a variable name belongs",
];

/// The schema, compiled into the binary so nixgold needs no files at run time.
pub const SCHEMA_SOURCE: &str = include_str!("../../schema/fleet.ncl");

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot read fleet file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: unsupported fleet file extension (use .ncl, .yaml, .yml or .json)",
        path.display()
    )]
    Format { path: PathBuf },
    #[error("{}", problems.iter().map(Problem::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid {
        problems: Vec<Problem>,
        /// Nickel's own report, with source snippets, for `-v`.
        report: String,
    },
    /// The schema accepted a value that the Rust model cannot represent: a
    /// bug in nixgold, not in the fleet.
    #[error("internal error: the fleet passed the schema but does not fit nixgold's model")]
    Model {
        #[source]
        source: serde_json::Error,
    },
}

impl FleetError {
    /// Problems to show the user, when the error is the user's to fix.
    pub fn problems(&self) -> &[Problem] {
        match self {
            FleetError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

/// How deeply records and lists may nest in a fleet file. A real fleet
/// nests about six levels; Nickel's evaluator and export recurse once per
/// level, so thousands of levels would overflow the stack and abort.
pub const MAX_NESTING: usize = 200;

/// The stack fleet evaluation runs on: deep enough for any fleet within
/// [`MAX_NESTING`], and for Nickel code that builds nesting by recursion.
const EVAL_STACK: usize = 256 << 20;

/// The fleet's name, or the file's stem when it does not load (for the
/// labels of a textfile that reports a failed run).
pub fn name_or_stem(path: &Path) -> String {
    load(path).map_or_else(
        |_| {
            path.file_stem()
                .map_or("fleet".into(), |s| s.to_string_lossy().into_owned())
        },
        |l| l.fleet.fleet,
    )
}

/// Loads and contract-checks a fleet file. Semantic validation is separate
/// (`validate::validate`) so it can report every problem at once.
pub fn load(path: &Path) -> Result<LoadedFleet, FleetError> {
    if let Ok(text) = std::fs::read_to_string(path)
        && let Some(problem) = too_deep(path, &text)
    {
        return Err(FleetError::Invalid {
            problems: vec![problem],
            report: String::new(),
        });
    }
    let json = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("fleet-eval".into())
            .stack_size(EVAL_STACK)
            .spawn_scoped(scope, || match proven(path) {
                Some(value) => Ok(value),
                None => contract_checked(path),
            })
            .map_err(|source| FleetError::Read {
                path: path.to_owned(),
                source,
            })?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    let fleet: Fleet =
        serde_json::from_value(json).map_err(|source| FleetError::Model { source })?;
    Ok(LoadedFleet {
        path: path.to_owned(),
        fleet,
    })
}

/// The fleet at `path` evaluated as it is and proven valid in Rust, with
/// its defaults filled in ([`schema_check`]); `None` when that proves
/// nothing, and the contract must judge (and explain) it.
fn proven(path: &Path) -> Option<serde_json::Value> {
    let json = evaluate(path, "fleet").ok()?;
    schema_check::prove(serde_json::from_str(&json).ok()?)
}

/// The fleet at `path` under the Nickel contract: the slow path, whose
/// errors carry source positions, field paths and hints.
fn contract_checked(path: &Path) -> Result<serde_json::Value, FleetError> {
    match evaluate(path, "fleet | nixgold_schema.Fleet") {
        Ok(json) => serde_json::from_str(&json).map_err(|source| FleetError::Model { source }),
        Err(FleetError::Invalid { problems, report }) => Err(FleetError::Invalid {
            problems: all_problems(path, problems),
            report,
        }),
        Err(other) => Err(other),
    }
}

/// Exports the JSON Schema data of `schema/fleet.ncl` (what
/// `schema/fleet.schema.json` must contain), pretty-printed.
pub fn json_schema() -> String {
    let source = format!("(\n{SCHEMA_SOURCE}\n).json_schema");
    let mut program: Program<CacheImpl> = ProgramBuilder::new()
        .add_source_string(source, "<nixgold schema>")
        .build()
        .expect("the embedded schema is a valid program");
    let value = program
        .eval_full_for_export()
        .expect("the embedded schema evaluates");
    let compact = to_string(ExportFormat::Json, &value).expect("the schema exports to JSON");
    let parsed: serde_json::Value = serde_json::from_str(&compact).expect("exported JSON parses");
    serde_json::to_string_pretty(&parsed).expect("JSON values serialise") + "\n"
}

/// At most this many contract problems are reported at once.
const MAX_PROBLEMS: usize = 50;

/// A contract problem as `schema/fleet.ncl`'s `Problems` reports it.
#[derive(serde::Deserialize)]
struct Found {
    path: Vec<String>,
    message: String,
    notes: Vec<String>,
}

/// Every contract problem of the fleet at `path`, given the first one the
/// contract stopped at: `Problems` lists them all as data, and `locate`
/// checks each one's node alone so that Nickel's error gives its position.
/// Problems come in source order; the first alone when listing fails.
fn all_problems(path: &Path, first: Vec<Problem>) -> Vec<Problem> {
    let Ok(json) = evaluate(path, "fleet | nixgold_schema.Problems") else {
        return first;
    };
    let found: Vec<Found> = serde_json::from_str(&json).unwrap_or_default();
    if found.len() < 2 {
        return first;
    }
    let mut problems: Vec<Problem> = found
        .iter()
        .take(MAX_PROBLEMS)
        .map(|f| {
            let keys: Vec<String> = f
                .path
                .iter()
                .map(|k| format!("\"{}\"", nickel_string_escape(k)))
                .collect();
            let expr = format!("nixgold_schema.locate [{}] fleet", keys.join(", "));
            match evaluate(path, &expr) {
                Err(FleetError::Invalid { problems, .. }) if !problems.is_empty() => {
                    problems.into_iter().next().expect("not empty")
                }
                _ => problem(path.to_owned(), None, &f.message, f.notes.clone()),
            }
        })
        .collect();
    problems.sort_by_key(|p| (p.position.is_none(), p.position));
    problems.dedup();
    problems
}

/// A problem from a contract message `field.path: reason`.
fn problem(
    file: PathBuf,
    position: Option<(usize, usize)>,
    message: &str,
    hints: Vec<String>,
) -> Problem {
    let (field, reason) = match message.split_once(": ") {
        Some((field, reason)) if !field.contains(' ') => (field.to_owned(), reason.to_owned()),
        _ => (String::new(), message.to_owned()),
    };
    Problem {
        file,
        position,
        field,
        reason,
        hints,
    }
}

/// Evaluates `expr` — in which `fleet` is the fleet file at `path` and
/// `nixgold_schema` is `schema/fleet.ncl` — and exports it as JSON.
pub(super) fn evaluate(path: &Path, expr: &str) -> Result<String, FleetError> {
    match path.extension().and_then(OsStr::to_str) {
        Some("ncl" | "yaml" | "yml" | "json") => {}
        _ => {
            return Err(FleetError::Format {
                path: path.to_owned(),
            });
        }
    }
    let absolute = std::fs::canonicalize(path).map_err(|source| FleetError::Read {
        path: path.to_owned(),
        source,
    })?;
    let source = format!(
        "let nixgold_schema = (\n{SCHEMA_SOURCE}\n) in\nlet fleet = import \"{}\" in\n{expr}\n",
        nickel_string_escape(&absolute.to_string_lossy())
    );
    let mut program: Program<CacheImpl> = ProgramBuilder::new()
        .add_source_string(source, WRAPPER_NAME)
        .build()
        .expect("an in-memory source always builds");
    let outcome = program
        .eval_full_for_export()
        .map_err(|e| e.into_diagnostics(&mut program.files()))
        .and_then(|value| {
            to_string(ExportFormat::Json, &value).map_err(|e| {
                nickel_lang_core::error::Error::export_error(program.pos_table().clone(), e)
                    .into_diagnostics(&mut program.files())
            })
        });
    outcome.map_err(|diagnostics| {
        let files = program.files();
        invalid(path, &absolute, &files, diagnostics)
    })
}

fn invalid(
    user_path: &Path,
    absolute: &Path,
    files: &nickel_lang_core::files::Files,
    diagnostics: Vec<codespan_reporting::diagnostic::Diagnostic<nickel_lang_core::files::FileId>>,
) -> FleetError {
    let mut report = Vec::new();
    {
        let mut writer = codespan_reporting::term::termcolor::NoColor::new(&mut report);
        let config = codespan_reporting::term::Config::default();
        for d in &diagnostics {
            // A failure to format the report only loses the -v detail.
            let _ = codespan_reporting::term::emit_to_write_style(&mut writer, &config, files, d);
        }
    }
    let report = String::from_utf8_lossy(&report).into_owned();
    // The first diagnostic is the one Nickel considers primary; the rest are
    // the contract stack, which the user does not need in the short form.
    let problems = diagnostics
        .iter()
        .take(1)
        .map(|d| {
            // Prefer a label in the user's files over one in the wrapper
            // program that applies the contract.
            let located = d
                .labels
                .iter()
                .filter_map(|l| {
                    let name = Files::name(files, l.file_id).ok()?.to_string();
                    let loc = Files::location(files, l.file_id, l.range.start).ok()?;
                    Some((name, (loc.line_number, loc.column_number)))
                })
                .min_by_key(|(name, _)| name == WRAPPER_NAME)
                .filter(|(name, _)| name != WRAPPER_NAME)
                .map(|(name, pos)| {
                    let file = if Path::new(&name) == absolute {
                        user_path.to_owned()
                    } else {
                        PathBuf::from(name)
                    };
                    (file, pos)
                });
            let (file, position) = match located {
                Some((file, pos)) => (file, Some(pos)),
                None => (user_path.to_owned(), None),
            };
            // Nickel puts its own headline first and the contract's message
            // on the last line.
            let message = d.message.lines().last().unwrap_or_default().trim();
            problem(file, position, message, d.notes.clone())
        })
        .collect::<Vec<Problem>>();
    // The snippet of a misplaced secret, or of anything written where a
    // secret reference belongs, may print the secret itself.
    let report = if problems
        .iter()
        .any(|p| SECRET_REASONS.contains(&p.reason.as_str()) || is_secret_field(&p.field))
    {
        "(source snippet withheld: it contains a secret)".to_owned()
    } else {
        report
    };
    FleetError::Invalid { problems, report }
}

/// The first place where `text` nests records or lists (`{`, `[`, `(`)
/// deeper than [`MAX_NESTING`], outside strings and comments.
fn too_deep(path: &Path, text: &str) -> Option<Problem> {
    let (mut depth, mut line, mut column) = (0usize, 1usize, 0usize);
    let mut chars = text.chars();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        column += 1;
        match c {
            '\n' => (line, column) = (line + 1, 0),
            '\\' if in_string => {
                chars.next();
                column += 1;
            }
            '"' => in_string = !in_string,
            '#' if !in_string => {
                // A comment: skip to the end of the line.
                for c in chars.by_ref() {
                    if c == '\n' {
                        (line, column) = (line + 1, 0);
                        break;
                    }
                }
            }
            '{' | '[' | '(' if !in_string => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(Problem {
                        file: path.to_owned(),
                        position: Some((line, column)),
                        field: String::new(),
                        reason: format!("records and lists nest deeper than {MAX_NESTING} levels"),
                        hints: vec!["a fleet nests a few levels; flatten the structure".into()],
                    });
                }
            }
            '}' | ']' | ')' if !in_string => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// True when `field` (`vms.web-01.password.env`) is, or is inside, a field
/// the schema marks `x-secret`.
fn is_secret_field(field: &str) -> bool {
    static PATHS: std::sync::LazyLock<Vec<Vec<String>>> = std::sync::LazyLock::new(|| {
        let schema: serde_json::Value =
            serde_json::from_str(&json_schema()).expect("the schema is JSON");
        let mut paths = Vec::new();
        secret_paths(&schema, &mut Vec::new(), &mut paths);
        paths
    });
    let segments: Vec<&str> = field.split('.').collect();
    PATHS.iter().any(|path| {
        path.len() <= segments.len() && path.iter().zip(&segments).all(|(p, s)| p == "*" || p == s)
    })
}

/// Collects the paths of the schema's `x-secret` nodes (`*` for any key or
/// list index).
fn secret_paths(node: &serde_json::Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if node.get("x-secret").is_some() {
        out.push(at.clone());
        return;
    }
    let mut visit = |child: &serde_json::Value, key: &str| {
        at.push(key.to_owned());
        secret_paths(child, at, out);
        at.pop();
    };
    if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
        for (key, child) in props {
            visit(child, key);
        }
    }
    for key in ["additionalProperties", "items"] {
        if let Some(child) = node.get(key).filter(|c| c.is_object()) {
            visit(child, "*");
        }
    }
}

fn nickel_string_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace("%{", "%\\{")
}
