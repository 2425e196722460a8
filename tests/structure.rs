//! The shape of `src/`: no cycles between its top-level modules, and no
//! function longer than 100 lines. Both are read from the source text, as
//! a reader sees it: the dependencies are the `crate::MODULE` paths in a
//! module's files outside their `mod tests` (doc links count too); a
//! function's length is from its `fn` line to the brace that closes it,
//! counting braces outside string and char literals and comments.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FN_LINES: usize = 100;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src_files() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (rel, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// `text` with the contents of string and char literals and of `//`
/// comments replaced by spaces (line breaks kept).
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let prev_ident = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == 'r' && !prev_ident && matches!(chars.get(i + 1), Some('"' | '#')) {
            let hashes = chars[i + 1..].iter().take_while(|c| **c == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let end: String = std::iter::once('"')
                .chain("#".repeat(hashes).chars())
                .collect();
            let start = i + 2 + hashes;
            let rest: String = chars[start..].iter().collect();
            let len = rest
                .find(&end)
                .map_or(rest.len(), |e| rest[..e].chars().count());
            let stop = (start + len + end.len()).min(chars.len());
            out.extend(chars[i..stop].iter().map(|c| blank(*c)));
            i = stop;
        } else if c == '"' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != '"' {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            let stop = (j + 1).min(chars.len());
            out.extend(chars[i..stop].iter().map(|c| blank(*c)));
            i = stop;
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            out.push_str("   ");
            i += 3;
        } else if c == '\'' && chars.get(i + 1) == Some(&'\\') && chars.get(i + 3) == Some(&'\'') {
            out.push_str("    ");
            i += 4;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// The name of the function a line declares (`pub(crate) async fn x(`).
fn fn_name(line: &str) -> Option<String> {
    let mut rest = line.trim_start();
    for prefix in [
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "const ",
        "async ",
        "unsafe ",
    ] {
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
    }
    let name: String = rest
        .strip_prefix("fn ")?
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

#[test]
fn no_function_in_src_is_longer_than_100_lines() {
    let mut long = Vec::new();
    for (file, text) in src_files() {
        let lines: Vec<String> = code_only(&text).lines().map(str::to_owned).collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(name) = fn_name(line) else {
                continue;
            };
            let (mut depth, mut opened) = (0i32, false);
            for (j, l) in lines[i..].iter().enumerate() {
                depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
                opened |= l.contains('{');
                if !opened && l.trim_end().ends_with(';') {
                    break;
                }
                if opened && depth <= 0 {
                    if j + 1 > MAX_FN_LINES {
                        long.push(format!("{file}:{} {name}: {} lines", i + 1, j + 1));
                    }
                    break;
                }
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_top_level_modules_of_src_depend_on_each_other_without_cycles() {
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, text) in src_files() {
        let module = file.split(['/', '.']).next().unwrap().to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let found = text.split("crate::").skip(1).map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect::<String>()
        });
        deps.entry(module.clone())
            .or_default()
            .extend(found.filter(|d| *d != module));
    }
    // A module is in a cycle when it can reach itself.
    let mut cycles = Vec::new();
    for start in deps.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = deps[start].iter().collect();
        while let Some(m) = todo.pop() {
            if m == start {
                cycles.push(start.clone());
                break;
            }
            if seen.insert(m.clone()) {
                todo.extend(deps.get(m).into_iter().flatten());
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules in a dependency cycle: {cycles:?}\n{deps:#?}"
    );
}
