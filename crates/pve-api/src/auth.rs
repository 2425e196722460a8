//! Credentials and TLS settings. Secrets are wrapped in [`Secret`], whose
//! `Debug` and `Display` print `(sensitive)`, so they cannot leak through
//! logs, errors or panics.

use std::fmt;
use std::path::PathBuf;

/// A credential that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(sensitive)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(sensitive)")
    }
}

/// How the client authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `user@realm!tokenid` and its secret: stateless, no CSRF.
    Token { id: String, secret: Secret },
    /// A user and password: a ticket from `/access/ticket`, renewed before
    /// its two hours are up, and a CSRF token on every write.
    Password { username: String, password: Secret },
}

impl Credentials {
    /// Parses `user@realm!tokenid=secret` (the `PROXMOX_VE_API_TOKEN` form).
    pub fn token(full: &str) -> Result<Self, String> {
        let (id, secret) = full
            .rsplit_once('=')
            .filter(|(id, secret)| id.contains('@') && id.contains('!') && !secret.is_empty())
            .ok_or("an API token is written user@realm!tokenid=secret")?;
        Ok(Credentials::Token {
            id: id.to_owned(),
            secret: Secret::new(secret),
        })
    }
}

/// How the server certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// The system's trusted roots (the default).
    System,
    /// A CA (or the self-signed certificate itself) from a PEM file.
    CaFile(PathBuf),
    /// Only a certificate with this SHA-256 fingerprint (of its DER form).
    Fingerprint([u8; 32]),
    /// No verification at all. Only on explicit request; logged every run.
    Insecure,
}

impl Tls {
    /// Parses `AA:BB:…` or plain hex.
    pub fn fingerprint(text: &str) -> Result<Self, String> {
        let hex: String = text.chars().filter(|c| *c != ':').collect();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect::<Option<_>>()
            .ok_or("a fingerprint is 32 hex bytes")?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "a SHA-256 fingerprint is 32 bytes")?;
        Ok(Tls::Fingerprint(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let c = Credentials::token("root@pam!ci=topsecret").unwrap();
        assert!(!format!("{c:?}").contains("topsecret"));
        assert_eq!(Secret::new("x").to_string(), "(sensitive)");
        assert!(Credentials::token("nonsense").is_err());
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex = "ab".repeat(32);
        assert_eq!(
            Tls::fingerprint(&hex).unwrap(),
            Tls::Fingerprint([0xab; 32])
        );
        assert_eq!(
            Tls::fingerprint(&vec!["AB"; 32].join(":")).unwrap(),
            Tls::Fingerprint([0xab; 32])
        );
        assert!(Tls::fingerprint("abcd").is_err());
    }
}
