//! Rollouts: VMs that follow new generations (`on_new_generation =
//! replace`) are replaced in batches, and a batch must pass the fleet's
//! health gates — the guest agent answers, a TCP port accepts, an HTTP GET
//! answers 2xx, each within its timeout — before the next one starts.
//!
//! The plan decides the batches (`plan::Rollout`: the replacements in
//! address order, cut by the fleet's `rollout.batch`); apply runs them in
//! order and asks [`check_batch`] after each (this module: the gates). A failing gate stops the rollout: the
//! VMs not yet replaced stay on their generation, so the next plan still
//! replaces them and the next apply resumes where this one stopped.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use pve_api::Client;

use crate::plan::{Change, Rollout, Work};

/// How often a gate asks again while it waits.
const GATE_POLL: Duration = Duration::from_millis(250);

/// One replaced VM of a batch: address, node, VMID.
pub type BatchVm = (String, String, u32);

/// Runs every gate on every VM of a batch; the first failure as
/// (address, what failed).
pub async fn check_batch(
    client: &Client,
    rollout: &Rollout,
    vms: &[BatchVm],
) -> Result<(), (String, String)> {
    for (address, node, vmid) in vms {
        check_vm(client, rollout, node, *vmid, rollout.addresses.get(address))
            .await
            .map_err(|e| (address.clone(), e))?;
    }
    Ok(())
}

async fn check_vm(
    client: &Client,
    rollout: &Rollout,
    node: &str,
    vmid: u32,
    address: Option<&IpAddr>,
) -> Result<(), String> {
    let g = &rollout.gates;
    if let Some(agent) = &g.agent {
        until(
            agent.timeout.get(),
            "the guest agent did not answer",
            || client.agent_ping(node, vmid),
        )
        .await?;
    }
    if g.tcp.is_none() && g.http.is_none() {
        return Ok(());
    }
    let ip = match address {
        Some(ip) => *ip,
        None => reported_address(client, node, vmid).await?,
    };
    if let Some(tcp) = &g.tcp {
        tcp_gate(ip, tcp.port, tcp.timeout.get()).await?;
    }
    if let Some(http) = &g.http {
        http_gate(ip, http.port, &http.path, http.timeout.get()).await?;
    }
    Ok(())
}

/// Retries `probe` until it succeeds or `timeout` passes; the error then
/// says what did not happen, and the last answer.
async fn until<T, E: std::fmt::Display, Fut>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Fut,
) -> Result<T, String>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match tokio::time::timeout(timeout, probe()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".to_owned(),
        };
        if Instant::now() + GATE_POLL > deadline {
            let seconds = timeout.as_secs_f64();
            return Err(format!("{what} within {seconds}s (last: {last})"));
        }
        tokio::time::sleep(GATE_POLL).await;
    }
}

/// The first IPv4 address the guest agent reports on an interface other
/// than `lo`.
async fn reported_address(client: &Client, node: &str, vmid: u32) -> Result<IpAddr, String> {
    let interfaces = client
        .agent_interfaces(node, vmid)
        .await
        .map_err(|e| format!("cannot learn its address from the guest agent: {e}"))?;
    interfaces
        .iter()
        .filter(|i| i.name != "lo")
        .flat_map(|i| &i.ip_addresses)
        .find_map(|a| a.ip_address.parse::<std::net::Ipv4Addr>().ok())
        .map(IpAddr::V4)
        .ok_or_else(|| "its guest agent reports no IPv4 address".to_owned())
}

/// A TCP connection to `ip:port` is accepted within `timeout`.
pub async fn tcp_gate(ip: IpAddr, port: u16, timeout: Duration) -> Result<(), String> {
    let what = format!("TCP port {port} on {ip} did not accept a connection");
    until(timeout, &what, || {
        tokio::net::TcpStream::connect((ip, port))
    })
    .await
    .map(drop)
}

/// `GET http://ip:port/path` answers with a 2xx status within `timeout`.
pub async fn http_gate(ip: IpAddr, port: u16, path: &str, timeout: Duration) -> Result<(), String> {
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("http://{ip}:{port}{path}");
    let what = format!("GET {url} did not answer 2xx");
    until(timeout, &what, || async {
        let status = http
            .get(&url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    })
    .await
}

/// The VMs of one batch, with where they live, from the plan's changes.
pub fn batch_vms(batch: &[String], changes: &[Change]) -> Vec<BatchVm> {
    batch
        .iter()
        .filter_map(|address| {
            changes
                .iter()
                .find(|c| c.address.to_string() == *address)
                .and_then(|c| match &c.work {
                    Work::ReplaceVm { new, .. } => {
                        Some((address.clone(), new.node.to_string(), new.vmid.get()))
                    }
                    _ => None,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::BatchSize;

    #[test]
    fn batch_sizes_from_a_count_or_a_rounded_up_percentage() {
        assert_eq!(BatchSize::Count { count: 2 }.of(6), 2);
        assert_eq!(BatchSize::Percent { percent: 34 }.of(6), 3);
        assert_eq!(BatchSize::Percent { percent: 1 }.of(6), 1);
        assert_eq!(BatchSize::Percent { percent: 100 }.of(6), 6);
    }

    #[tokio::test]
    async fn the_tcp_gate_passes_on_an_open_port_and_fails_on_a_closed_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let short = Duration::from_millis(600);
        tcp_gate(open.ip(), open.port(), short).await.unwrap();
        drop(listener);
        let e = tcp_gate(open.ip(), open.port(), short).await.unwrap_err();
        assert!(
            e.starts_with(&format!(
                "TCP port {} on 127.0.0.1 did not accept",
                open.port()
            )),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_http_gate_wants_a_2xx_status() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let healthy = String::from_utf8_lossy(&buf[..n]).starts_with("GET /healthz ");
                let status = if healthy {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let reply =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        let short = Duration::from_millis(600);
        http_gate(at.ip(), at.port(), "/healthz", short)
            .await
            .unwrap();
        let e = http_gate(at.ip(), at.port(), "/", short).await.unwrap_err();
        assert!(e.contains("did not answer 2xx") && e.contains("503"), "{e}");
    }
}
