//! What an image's generation installs: the rendered `configuration.nix`
//! and the install script that runs in the live installer.
//!
//! Rendering returns strings and does no I/O. Every rendered configuration
//! is checked with a real Nix parser (`rnix`) before anyone sees it, so a
//! syntax error in the user's raw Nix is reported against the fleet, not
//! discovered twenty minutes into a build.

mod configuration;
mod install;

pub use configuration::configuration_nix;
pub use install::install_script;

/// A Nix syntax error in rendered text: 1-based line and column, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixSyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parses `text` with rnix; returns every syntax error.
pub fn check_nix(text: &str) -> Vec<NixSyntaxError> {
    rnix::Root::parse(text)
        .errors()
        .iter()
        .map(|e| {
            let offset = match e {
                rnix::ParseError::Unexpected(r)
                | rnix::ParseError::UnexpectedExtra(r)
                | rnix::ParseError::UnexpectedWanted(_, r, _)
                | rnix::ParseError::UnexpectedDoubleBind(r)
                | rnix::ParseError::DuplicatedArgs(r, _) => usize::from(r.start()),
                _ => text.len(),
            };
            let before = &text[..offset.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            NixSyntaxError {
                line,
                column,
                message: e.to_string(),
            }
        })
        .collect()
}

/// A Nix string literal for `s`.
fn nix_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '$' if chars.peek() == Some(&'{') => out.push_str("\\$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_strings_escape_interpolation_and_quotes() {
        assert_eq!(nix_str(r#"a "b" ${c} $d \e"#), r#""a \"b\" \${c} $d \\e""#);
        assert!(check_nix(&format!("{{ x = {}; }}", nix_str("${oops} \"q\""))).is_empty());
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let errors = check_nix("{\n  a = 1\n  b = 2;\n}\n");
        assert!(!errors.is_empty());
        assert_eq!(errors[0].line, 3, "{errors:?}");
    }
}
