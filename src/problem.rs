//! A user's mistake in a fleet or lockfile: where, which field, why, and
//! what to do. Contract errors (from Nickel) and semantic errors (from
//! `validate`) both end up as a `Problem`, so they print alike.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based line and column, when the problem has a source position.
    pub position: Option<(usize, usize)>,
    /// Dotted field path, e.g. `vms.web-01.network.gateway`.
    pub field: String,
    pub reason: String,
    pub hints: Vec<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Problem {
            file,
            position,
            field,
            reason,
            hints,
        } = self;
        write!(f, "error: {}", file.display())?;
        if let Some((line, col)) = position {
            write!(f, ":{line}:{col}")?;
        }
        if !field.is_empty() {
            write!(f, ": {field}")?;
        }
        write!(f, ": {reason}")?;
        for hint in hints {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}
