//! The SSH client a build uses: host key pinned on first contact.

use super::{BuildError, step_err};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An SSH session with the build VM; the host key is pinned on first
/// contact per phase (installer, installed system).
pub struct Ssh {
    handle: russh::client::Handle<Pin>,
}

struct Pin {
    seen: Arc<Mutex<Option<String>>>,
}

impl russh::client::Handler for Pin {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let text = format!("{key:?}");
        let mut seen = self.seen.lock().expect("pin");
        match seen.as_ref() {
            None => {
                *seen = Some(text);
                Ok(true)
            }
            Some(pinned) => Ok(*pinned == text),
        }
    }
}

impl Ssh {
    pub async fn connect(
        host: &str,
        port: u16,
        key: &russh::keys::PrivateKey,
        pin: Arc<Mutex<Option<String>>>,
    ) -> Result<Self, BuildError> {
        let config = Arc::new(russh::client::Config {
            inactivity_timeout: Some(Duration::from_secs(3600)),
            ..Default::default()
        });
        let mut handle = russh::client::connect(config, (host, port), Pin { seen: pin })
            .await
            .map_err(|e| step_err("ssh", format!("{host}:{port}: {e}")))?;
        let auth = handle
            .authenticate_publickey(
                "root",
                russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key.clone()), None),
            )
            .await
            .map_err(|e| step_err("ssh", e.to_string()))?;
        if !auth.success() {
            return Err(step_err(
                "ssh",
                format!("{host}:{port} refused the build key"),
            ));
        }
        Ok(Ssh { handle })
    }

    /// Runs `command` with `stdin`; returns (exit code, output). Each output
    /// line is also passed to `on_line`.
    pub async fn run(
        &self,
        command: &str,
        stdin: &str,
        mut on_line: impl FnMut(&str),
    ) -> Result<(u32, String), BuildError> {
        let mut ch = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| step_err("ssh", e.to_string()))?;
        ch.exec(true, command)
            .await
            .map_err(|e| step_err("ssh", e.to_string()))?;
        if !stdin.is_empty() {
            ch.data(stdin.as_bytes())
                .await
                .map_err(|e| step_err("ssh", e.to_string()))?;
        }
        ch.eof().await.map_err(|e| step_err("ssh", e.to_string()))?;
        let mut output = String::new();
        let mut code = None;
        while let Some(msg) = ch.wait().await {
            match msg {
                russh::ChannelMsg::Data { data } => {
                    let text = String::from_utf8_lossy(&data);
                    for line in text.lines() {
                        on_line(line);
                    }
                    output.push_str(&text);
                }
                russh::ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status),
                _ => {}
            }
        }
        let program = command.split_whitespace().next().unwrap_or(command);
        let code = code.ok_or_else(|| {
            step_err(
                "ssh",
                format!("the connection closed before `{program}` finished"),
            )
        })?;
        Ok((code, output))
    }
}

pub(super) async fn connect_retry(
    host: &str,
    port: u16,
    key: &russh::keys::PrivateKey,
    pin: Arc<Mutex<Option<String>>>,
    within: Duration,
) -> Result<Ssh, BuildError> {
    let until = Instant::now() + within;
    let mut delay = Duration::from_millis(100);
    loop {
        // An address nobody answers on would hang in TCP's own timeout.
        let attempt = until
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(100), Duration::from_secs(10));
        let connected = tokio::time::timeout(attempt, Ssh::connect(host, port, key, pin.clone()))
            .await
            .unwrap_or_else(|_| {
                Err(step_err(
                    "ssh",
                    format!("{host}:{port}: no answer within {}s", attempt.as_secs()),
                ))
            });
        match connected {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() + delay > until => return Err(e),
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(3));
            }
        }
    }
}
