//! Secret values nixgold has read, and their removal from everything it
//! prints.
//!
//! Every value of a secret reference — the fleet's `{ env = … }` and
//! `{ file = … }` references, and the environment variables nixgold reads
//! credentials from — is registered here as soon as it is known. Errors,
//! log lines (`-v` included), build progress and build logs pass through
//! [`redact`] before they are written, so a secret that turns up in a
//! message (an API error echoing a parameter, a command line, a Nickel
//! snippet) is printed as `(redacted)`.

use std::borrow::Cow;
use std::sync::RwLock;

/// Shorter values are not redacted: they would blank out ordinary words.
const MIN_LEN: usize = 4;

const MARK: &str = "(redacted)";

/// Environment variables whose values are credentials (connect.rs reads
/// them).
pub const CREDENTIAL_ENV: [&str; 2] = ["PROXMOX_VE_API_TOKEN", "PROXMOX_VE_PASSWORD"];

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Remembers `value` as a secret. An API token `user@realm!id=secret` also
/// registers its secret part on its own.
pub fn register(value: &str) {
    let mut parts = vec![value];
    if let Some((id, secret)) = value.rsplit_once('=')
        && id.contains('!')
    {
        parts.push(secret);
    }
    let mut secrets = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    for part in parts {
        if part.chars().count() >= MIN_LEN && !secrets.iter().any(|s| s == part) {
            secrets.push(part.to_owned());
        }
    }
    // Longest first, so a secret that contains another goes whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `text` with every registered secret replaced by `(redacted)`.
pub fn redact(text: &str) -> Cow<'_, str> {
    let secrets = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let mut out = Cow::Borrowed(text);
    for secret in secrets.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), MARK));
        }
    }
    out
}

/// A `tracing` writer that redacts each line before it reaches stderr.
pub struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_secrets_and_token_secrets_are_redacted() {
        register("root@pam!ci=0f9e8d7c-6b5a-4321-abcd-ef0123456789");
        register("abc");
        let text = "token root@pam!ci=0f9e8d7c-6b5a-4321-abcd-ef0123456789 or 0f9e8d7c-6b5a-4321-abcd-ef0123456789, abc";
        assert_eq!(redact(text), "token (redacted) or (redacted), abc");
        assert_eq!(redact("nothing here"), "nothing here");
    }
}
