//! A simulator on 127.0.0.1:0 and a raw HTTP client for it. The tests
//! speak the wire protocol directly (reqwest), never nixgold's client.

#![allow(dead_code)] // each test file uses a subset

use std::time::Duration;

use pve_sim::{ClusterSpec, Credentials, ServerHandle, SimOptions, Simulator};
use serde_json::Value;

pub const TOKEN: &str = "root@pam!test=0d6c3e9a-5c1b-4a8e-9f11-2b7d7c1e4f00";
pub const PASSWORD: &str = "correct horse";
/// A well-formed public key: the simulator checks keys as `ssh-keygen -l` would.
pub const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF4uCRRocy7VnWKg3xDEVQ9/84PtcagPU5KyqtjJnFsK";

pub struct Sim {
    pub sim: Simulator,
    pub handle: ServerHandle,
    pub http: reqwest::Client,
}

pub struct Reply {
    pub status: u16,
    pub reason: String,
    pub body: Value,
    pub raw: String,
}

impl Reply {
    pub fn data(&self) -> &Value {
        &self.body["data"]
    }
}

pub fn fast() -> SimOptions {
    SimOptions::fast(Duration::from_millis(30))
}

pub async fn start(spec: ClusterSpec, opts: SimOptions) -> Sim {
    let sim = Simulator::new(
        spec,
        opts,
        Credentials::token(TOKEN)
            .unwrap()
            .with_user("root@pam", PASSWORD),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handle = sim.serve(listener);
    Sim {
        sim,
        handle,
        http: reqwest::Client::new(),
    }
}

pub async fn default_sim() -> Sim {
    start(ClusterSpec::default(), fast()).await
}

impl Sim {
    pub fn url(&self, path: &str) -> String {
        format!("{}/api2/json{path}", self.handle.url())
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let resp = req.send().await.expect("request is answered");
        let status = resp.status().as_u16();
        let reason = resp
            .status()
            .canonical_reason()
            .unwrap_or_default()
            .to_owned();
        let raw = resp.text().await.unwrap();
        let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
        Reply {
            status,
            reason,
            body,
            raw,
        }
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        req.header("Authorization", format!("PVEAPIToken={TOKEN}"))
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.auth(self.http.get(self.url(path)))).await
    }

    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> Reply {
        self.send(self.auth(self.http.post(self.url(path)).form(form)))
            .await
    }

    pub async fn put(&self, path: &str, form: &[(&str, &str)]) -> Reply {
        self.send(self.auth(self.http.put(self.url(path)).form(form)))
            .await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(self.auth(self.http.delete(self.url(path)))).await
    }

    /// Polls a task until it stops; returns its exit status.
    pub async fn wait(&self, upid: &str) -> String {
        let node = upid.split(':').nth(1).unwrap();
        let path = format!("/nodes/{node}/tasks/{}/status", urlencode(upid));
        for _ in 0..400 {
            let r = self.get(&path).await;
            assert_eq!(r.status, 200, "{}", r.raw);
            if r.data()["status"] == "stopped" {
                return r.data()["exitstatus"].as_str().unwrap().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("task {upid} did not stop");
    }

    /// POST that must start a task; waits for it and returns its exit status.
    pub async fn run(&self, path: &str, form: &[(&str, &str)]) -> String {
        let r = self.post(path, form).await;
        assert_eq!(r.status, 200, "{path}: {}", r.raw);
        self.wait(r.data().as_str().unwrap()).await
    }

    /// Creates VM `vmid` on `pve` with a disk on tank and waits for it.
    pub async fn create_vm(&self, vmid: u32, extra: &[(&str, &str)]) {
        let id = vmid.to_string();
        let mut form = vec![
            ("vmid", id.as_str()),
            ("name", "vm"),
            ("memory", "2048"),
            ("cores", "2"),
            ("scsi0", "tank:8"),
            ("net0", "virtio,bridge=vmbr0"),
        ];
        form.extend_from_slice(extra);
        assert_eq!(self.run("/nodes/pve/qemu", &form).await, "OK");
    }

    pub async fn config(&self, vmid: u32) -> Value {
        let r = self.get(&format!("/nodes/pve/qemu/{vmid}/config")).await;
        assert_eq!(r.status, 200, "{}", r.raw);
        r.data().clone()
    }
}

pub fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Sends a raw HTTP/1.1 request and returns the status line and body:
/// reqwest does not expose the reason phrase, where Proxmox puts errors.
pub async fn raw(addr: std::net::SocketAddr, request: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.lines().next().unwrap_or_default().to_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub fn raw_get(path: &str, auth: Option<&str>) -> String {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!("GET /api2/json{path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
}
