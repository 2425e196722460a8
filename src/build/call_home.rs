//! The call-home listener: the installer posts its address to nixgold
//! and gets the access script back.

use std::time::Duration;

use super::{BuildError, step_err};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The local address this machine uses to reach the Proxmox endpoint: the
/// address the build VM calls unless `advertise` says otherwise.
pub fn advertise_address(endpoint_host: &str) -> Result<String, BuildError> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")
        .map_err(|e| step_err("call-home address", e.to_string()))?;
    let target = if endpoint_host.contains(':') {
        endpoint_host.to_owned()
    } else {
        format!("{endpoint_host}:8006")
    };
    socket.connect(target).map_err(|e| {
        step_err(
            "call-home address",
            format!("cannot route to the Proxmox endpoint: {e}"),
        )
    })?;
    Ok(socket
        .local_addr()
        .map_err(|e| step_err("call-home address", e.to_string()))?
        .ip()
        .to_string())
}

/// A call-home listener for one build: every POST to `/<token>` is
/// answered with `script` and yields the posted body (a retyped access
/// sequence calls again); anything else is a 404.
pub struct CallHome {
    pub url: String,
    bodies: tokio::sync::mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CallHome {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CallHome {
    pub async fn listen(listen: &str, advertise: &str, script: String) -> Result<Self, BuildError> {
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            step_err(
                "call-home listener",
                format!("cannot listen on {listen}: {e}"),
            )
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| step_err("call-home listener", e.to_string()))?
            .port();
        let token = crate::ids::random_hex(24);
        let url = format!("http://{advertise}:{port}/{token}");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = vec![0u8; 16 * 1024];
                let Ok(n) = stream.read(&mut buf).await else {
                    continue;
                };
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let authorised = req.starts_with(&format!("POST /{token} "));
                let (status, body) = if authorised {
                    ("200 OK", script.as_str())
                } else {
                    ("404 Not Found", "")
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(resp.as_bytes()).await;
                if authorised {
                    let posted = req
                        .split_once("\r\n\r\n")
                        .map(|(_, b)| b.to_owned())
                        .unwrap_or_default();
                    let _ = tx.send(posted);
                }
            }
        });
        Ok(CallHome {
            url,
            bodies: rx,
            task,
        })
    }

    /// The VM's (address, SSH port) once it called, if it does `within`.
    pub async fn wait(&mut self, within: Duration) -> Result<(String, u16), BuildError> {
        let posted = tokio::time::timeout(within, self.bodies.recv())
            .await
            .map_err(|_| step_err("call-home", "no call yet"))?
            .ok_or_else(|| step_err("call-home", "the listener stopped"))?;
        parse_call_home_body(&posted)
            .ok_or_else(|| step_err("call-home", format!("unexpected body {posted:?}")))
    }
}

/// `ip=10.0.0.5 fe80::1 port=22` → ("10.0.0.5", 22): the first IPv4.
pub fn parse_call_home_body(body: &str) -> Option<(String, u16)> {
    let ips = body.split("port=").next()?.trim().strip_prefix("ip=")?;
    let ip = ips.split_whitespace().find(|a| {
        a.parse::<std::net::Ipv4Addr>()
            .is_ok_and(|v4| !v4.is_link_local())
    })?;
    let port = body.split("port=").nth(1)?.trim().parse().ok()?;
    Some((ip.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_home_bodies_give_the_first_routable_ipv4() {
        assert_eq!(
            parse_call_home_body("ip=169.254.3.4 10.0.0.5 fe80::1  port=22"),
            Some(("10.0.0.5".into(), 22))
        );
        assert_eq!(parse_call_home_body("garbage"), None);
    }
}
