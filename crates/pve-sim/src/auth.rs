//! Authentication as pve-http-server does it: API tokens in the
//! `Authorization` header (no CSRF), or tickets from `POST /access/ticket`
//! sent as the `PVEAuthCookie` cookie, with a `CSRFPreventionToken` header
//! on every non-GET request. Tickets expire after two hours.

use std::collections::BTreeMap;

use base64::Engine;
use sha2::{Digest, Sha256};

/// Ticket lifetime.
pub const TICKET_LIFETIME_SECS: u64 = 2 * 3600;

#[derive(Debug, Clone)]
pub struct Auth {
    /// `user@realm!tokenname` → secret.
    pub tokens: BTreeMap<String, String>,
    /// `user@realm` → password.
    pub users: BTreeMap<String, String>,
    key: [u8; 32],
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `user@realm`, or `user@realm!token` for tokens (as in UPIDs).
    pub authid: String,
    pub via_ticket: bool,
}

/// The headers authentication reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Headers<'a> {
    pub authorization: Option<&'a str>,
    pub cookie: Option<&'a str>,
    pub csrf: Option<&'a str>,
}

/// Why a request was not authenticated: the 401 reason phrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unauthorized(pub &'static str);

impl Auth {
    pub fn new(tokens: BTreeMap<String, String>, users: BTreeMap<String, String>) -> Self {
        Auth {
            tokens,
            users,
            key: rand::random(),
        }
    }

    fn sign(&self, data: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(data.as_bytes());
        base64::engine::general_purpose::STANDARD.encode(h.finalize())
    }

    pub fn ticket(&self, user: &str, now: u64) -> (String, String) {
        let data = format!("PVE:{user}:{now:08X}");
        let ticket = format!("{data}::{}", self.sign(&data));
        let csrf_data = format!("{now:08X}:{user}");
        let csrf = format!("{now:08X}:{}", self.sign(&csrf_data));
        (ticket, csrf)
    }

    /// The user a valid, unexpired ticket was issued to.
    pub fn check_ticket(&self, ticket: &str, now: u64) -> Option<String> {
        let (data, sig) = ticket.split_once("::")?;
        let mut parts = data.splitn(3, ':');
        let (Some("PVE"), Some(user), Some(time)) = (parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let issued = u64::from_str_radix(time, 16).ok()?;
        (self.sign(data) == sig
            && now.saturating_sub(issued) < TICKET_LIFETIME_SECS
            && issued <= now + 300)
            .then(|| user.to_owned())
    }

    fn check_csrf(&self, token: &str, user: &str) -> bool {
        token
            .split_once(':')
            .is_some_and(|(time, sig)| self.sign(&format!("{time}:{user}")) == sig)
    }

    /// Authenticates a request from its headers; `api_token` checks a
    /// token made through the API (`user.cfg`) when it is not a configured
    /// one.
    pub fn authenticate(
        &self,
        headers: Headers,
        method: &str,
        now: u64,
        api_token: &dyn Fn(&str, &str) -> bool,
    ) -> Result<Identity, Unauthorized> {
        let Headers {
            authorization,
            cookie,
            csrf,
        } = headers;
        if let Some(value) = authorization.and_then(|a| a.strip_prefix("PVEAPIToken")) {
            let value = value.trim_start_matches(['=', ' ']);
            let value = value.split(';').next().unwrap_or_default();
            let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
            let (tokenid, secret) = value
                .rsplit_once('=')
                .ok_or(Unauthorized("authentication failure"))?;
            let valid = match self.tokens.get(tokenid) {
                Some(s) => s == secret,
                None => api_token(tokenid, secret),
            };
            return if valid {
                Ok(Identity {
                    authid: tokenid.to_owned(),
                    via_ticket: false,
                })
            } else {
                Err(Unauthorized("authentication failure"))
            };
        }
        let ticket = authorization
            .and_then(|a| a.strip_prefix("PVEAuthCookie="))
            .map(str::to_owned)
            .or_else(|| {
                cookie?.split(';').find_map(|c| {
                    c.trim().strip_prefix("PVEAuthCookie=").map(|t| {
                        percent_encoding::percent_decode_str(t)
                            .decode_utf8_lossy()
                            .into_owned()
                    })
                })
            })
            .ok_or(Unauthorized("No ticket"))?;
        let user = self
            .check_ticket(&ticket, now)
            .ok_or(Unauthorized("authentication failure"))?;
        if method != "GET" && !csrf.is_some_and(|c| self.check_csrf(c, &user)) {
            return Err(Unauthorized("Permission denied - invalid csrf token"));
        }
        Ok(Identity {
            authid: user,
            via_ticket: true,
        })
    }

    /// `POST /access/ticket`: a password, or a still valid ticket (renewal).
    pub fn login(&self, username: &str, password: &str, now: u64) -> Option<String> {
        if self.users.get(username).is_some_and(|p| p == password) {
            return Some(username.to_owned());
        }
        self.check_ticket(password, now).filter(|u| u == username)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(
            BTreeMap::from([("root@pam!ci".to_owned(), "s3cret".to_owned())]),
            BTreeMap::from([("root@pam".to_owned(), "pw".to_owned())]),
        )
    }

    fn none(_: &str, _: &str) -> bool {
        false
    }

    fn token(authorization: &str) -> Headers<'_> {
        Headers {
            authorization: Some(authorization),
            ..Headers::default()
        }
    }

    fn cookie<'a>(cookie: &'a str, csrf: Option<&'a str>) -> Headers<'a> {
        Headers {
            cookie: Some(cookie),
            csrf,
            ..Headers::default()
        }
    }

    #[test]
    fn tokens_need_no_csrf_and_split_at_the_last_equals() {
        let a = auth();
        let id = a
            .authenticate(token("PVEAPIToken=root@pam!ci=s3cret"), "POST", 0, &none)
            .unwrap();
        assert_eq!(id.authid, "root@pam!ci");
        assert!(
            a.authenticate(token("PVEAPIToken=root@pam!ci=wrong"), "GET", 0, &none)
                .is_err()
        );
    }

    #[test]
    fn tickets_need_csrf_on_writes_and_expire() {
        let a = auth();
        let (ticket, csrf) = a.ticket("root@pam", 1000);
        let c = format!("PVEAuthCookie={ticket}");
        assert!(a.authenticate(cookie(&c, None), "GET", 1000, &none).is_ok());
        assert_eq!(
            a.authenticate(cookie(&c, None), "POST", 1000, &none),
            Err(Unauthorized("Permission denied - invalid csrf token"))
        );
        assert!(
            a.authenticate(cookie(&c, Some(&csrf)), "POST", 1000, &none)
                .is_ok()
        );
        assert!(
            a.authenticate(cookie(&c, None), "GET", 1000 + TICKET_LIFETIME_SECS, &none)
                .is_err()
        );
        assert_eq!(
            a.login("root@pam", &ticket, 1001).as_deref(),
            Some("root@pam")
        );
    }
}
