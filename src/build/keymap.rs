//! Typing on the build VM's console: QEMU key names for text on a US
//! layout, sent one `sendkey` per key.

use std::time::Duration;

use super::{BuildError, step_err};
use pve_api::Client;

/// QEMU key names for `text` on a US layout (shift chords for capitals
/// and symbols).
pub fn keys_for(text: &str) -> Result<Vec<String>, char> {
    text.chars()
        .map(|c| {
            let plain = |k: &str| Ok(k.to_owned());
            let shifted = |k: &str| Ok(format!("shift-{k}"));
            match c {
                'a'..='z' | '0'..='9' => Ok(c.to_string()),
                'A'..='Z' => shifted(&c.to_ascii_lowercase().to_string()),
                ' ' => plain("spc"),
                '\n' => plain("ret"),
                '-' => plain("minus"),
                '_' => shifted("minus"),
                '=' => plain("equal"),
                '+' => shifted("equal"),
                '/' => plain("slash"),
                '?' => shifted("slash"),
                '.' => plain("dot"),
                '>' => shifted("dot"),
                ',' => plain("comma"),
                '<' => shifted("comma"),
                ';' => plain("semicolon"),
                ':' => shifted("semicolon"),
                '\'' => plain("apostrophe"),
                '"' => shifted("apostrophe"),
                '[' => plain("bracket_left"),
                '{' => shifted("bracket_left"),
                ']' => plain("bracket_right"),
                '}' => shifted("bracket_right"),
                '\\' => plain("backslash"),
                '|' => shifted("backslash"),
                '`' => plain("grave_accent"),
                '~' => shifted("grave_accent"),
                '!' => shifted("1"),
                '@' => shifted("2"),
                '#' => shifted("3"),
                '$' => shifted("4"),
                '%' => shifted("5"),
                '^' => shifted("6"),
                '&' => shifted("7"),
                '*' => shifted("8"),
                '(' => shifted("9"),
                ')' => shifted("0"),
                other => Err(other),
            }
        })
        .collect()
}

/// The line typed to call home: it posts the VM's addresses and SSH port
/// (`NIXGOLD_SSH_PORT` is unset on a real installer, so 22) and runs the
/// returned script.
pub fn call_home_line(url: &str) -> String {
    format!("curl -fsS -d \"ip=$(hostname -I) port=${{NIXGOLD_SSH_PORT:-22}}\" {url} | sh\n")
}

/// Types `text` on the VM's console, one `sendkey` per key.
pub async fn type_text(
    client: &Client,
    node: &str,
    vmid: u32,
    text: &str,
    interval: Duration,
) -> Result<(), BuildError> {
    let keys = keys_for(text).map_err(|c| step_err("type", format!("no key for {c:?}")))?;
    for key in keys {
        client.sendkey(node, vmid, &key).await?;
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_sequence_types_with_shift_chords() {
        let keys = keys_for("A:\"$(x)\"|\n").unwrap();
        assert_eq!(
            keys,
            [
                "shift-a",
                "shift-semicolon",
                "shift-apostrophe",
                "shift-4",
                "shift-9",
                "x",
                "shift-0",
                "shift-apostrophe",
                "shift-backslash",
                "ret"
            ]
        );
        assert!(keys_for("é").is_err());
        assert!(keys_for(&call_home_line("http://10.0.0.1:4242/abc")).is_ok());
    }
}
