//! The HTTP client: one connection pool, a bound on requests in flight,
//! token or ticket authentication (CSRF on writes, renewal before expiry),
//! Proxmox's envelope and error forms, and retries of idempotent reads on
//! transport failures. Writes are never retried here: whether a write may
//! be repeated is the caller's decision, after re-reading state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{Mutex, Semaphore};

use crate::auth::{Credentials, Tls};
use crate::error::ApiError;
use crate::types::*;
use crate::upid::Upid;

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `https://host:8006` (a trailing `/api2/json` is accepted).
    pub endpoint: String,
    pub credentials: Credentials,
    pub tls: Tls,
    /// Requests in flight at once, for this cluster.
    pub max_in_flight: usize,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Attempts for idempotent reads on transport errors.
    pub read_attempts: u32,
    /// First retry delay; doubles each attempt.
    pub retry_base: Duration,
    /// Age at which a ticket is renewed (tickets live two hours).
    pub ticket_renew_after: Duration,
}

impl ClientOptions {
    pub fn new(endpoint: impl Into<String>, credentials: Credentials, tls: Tls) -> Self {
        ClientOptions {
            endpoint: endpoint.into(),
            credentials,
            tls,
            max_in_flight: 16,
            request_timeout: Duration::from_secs(60),
            read_attempts: 4,
            retry_base: Duration::from_millis(200),
            ticket_renew_after: Duration::from_secs(90 * 60),
        }
    }
}

#[derive(Debug)]
struct Ticket {
    ticket: String,
    csrf: String,
    issued: Instant,
}

/// A Proxmox VE API client.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    base: String,
    opts: ClientOptions,
    ticket: Mutex<Option<Ticket>>,
    limiter: Semaphore,
    calls: AtomicU64,
    pacer: crate::pacer::TaskPacer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    fn is_read(self) -> bool {
        self == Method::Get
    }
}

/// Request parameters, in order.
pub type Params = Vec<(String, String)>;

fn p(k: &str, v: impl ToString) -> (String, String) {
    (k.to_owned(), v.to_string())
}

fn seg(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl Client {
    pub fn new(opts: ClientOptions) -> Result<Self, ApiError> {
        let tls = crate::tls::client_config(&opts.tls)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(opts.request_timeout)
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(opts.max_in_flight)
            .build()
            .map_err(|e| ApiError::Config {
                message: e.to_string(),
            })?;
        let endpoint = opts.endpoint.trim_end_matches('/');
        let endpoint = endpoint.strip_suffix("/api2/json").unwrap_or(endpoint);
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err(ApiError::Config {
                message: format!("endpoint {endpoint:?} must start with https:// (or http://)"),
            });
        }
        if matches!(opts.tls, Tls::Insecure) {
            tracing::warn!(
                "TLS verification is disabled for {endpoint}: the connection can be intercepted"
            );
        }
        let base = format!("{endpoint}/api2/json");
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                limiter: Semaphore::new(opts.max_in_flight.max(1)),
                opts,
                ticket: Mutex::new(None),
                calls: AtomicU64::new(0),
                pacer: Default::default(),
            }),
        })
    }

    /// The host (or `[v6]`) of the endpoint, e.g. to find the local address
    /// that routes to it.
    pub fn endpoint_host(&self) -> String {
        let rest = self.inner.base.split("://").nth(1).unwrap_or_default();
        let authority = rest.split('/').next().unwrap_or_default();
        match authority.rsplit_once(':') {
            Some((host, port))
                if port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':') =>
            {
                host.to_owned()
            }
            _ => authority.to_owned(),
        }
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
    }

    /// Who the client authenticates as: `user@realm!token` or `user@realm`.
    pub fn auth_id(&self) -> &str {
        match &self.inner.opts.credentials {
            Credentials::Token { id, .. } => id,
            Credentials::Password { username, .. } => username,
        }
    }

    /// API requests sent so far (retries included).
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }

    // ----- plumbing -------------------------------------------------------

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        params: Params,
    ) -> Result<T, ApiError> {
        let (data, _) = self.call_raw(method, path, &params).await?;
        serde_json::from_value(data).map_err(|e| ApiError::Decode {
            context: format!("{method:?} {path}"),
            message: e.to_string(),
        })
    }

    async fn call_raw(
        &self,
        method: Method,
        path: &str,
        params: &Params,
    ) -> Result<(Value, Option<u64>), ApiError> {
        let attempts = if method.is_read() {
            self.inner.opts.read_attempts.max(1)
        } else {
            1
        };
        let mut delay = self.inner.opts.retry_base;
        let mut attempt = 1;
        loop {
            match self.send_once(method, path, params).await {
                Err(e) if e.is_transport() && attempt < attempts => {
                    tracing::debug!("{method:?} {path}: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn auth_headers(&self, method: Method) -> Result<Vec<(&'static str, String)>, ApiError> {
        match &self.inner.opts.credentials {
            Credentials::Token { id, secret } => Ok(vec![(
                "Authorization",
                format!("PVEAPIToken={id}={}", secret.expose()),
            )]),
            Credentials::Password { username, password } => {
                let mut guard = self.inner.ticket.lock().await;
                let stale = guard
                    .as_ref()
                    .is_none_or(|t| t.issued.elapsed() > self.inner.opts.ticket_renew_after);
                if stale {
                    // Renew with the current ticket while it is valid, else log in.
                    let secret = guard
                        .as_ref()
                        .map_or_else(|| password.expose().to_owned(), |t| t.ticket.clone());
                    *guard = Some(self.login(username, &secret).await?);
                }
                let t = guard.as_ref().expect("a ticket was just obtained");
                let mut headers = vec![("Cookie", format!("PVEAuthCookie={}", t.ticket))];
                if method != Method::Get {
                    headers.push(("CSRFPreventionToken", t.csrf.clone()));
                }
                Ok(headers)
            }
        }
    }

    async fn login(&self, username: &str, secret: &str) -> Result<Ticket, ApiError> {
        let params = vec![p("username", username), p("password", secret)];
        let (data, _) = self
            .send_plain(Method::Post, "/access/ticket", &params, &[])
            .await?;
        let field = |k: &str| data.get(k).and_then(Value::as_str).map(str::to_owned);
        match (field("ticket"), field("CSRFPreventionToken")) {
            (Some(ticket), Some(csrf)) => Ok(Ticket {
                ticket,
                csrf,
                issued: Instant::now(),
            }),
            _ if data.get("NeedTFA").is_some() => Err(ApiError::Auth {
                status: 401,
                message: "the user needs a second factor (TFA); use an API token".to_owned(),
            }),
            _ => Err(ApiError::Decode {
                context: "POST /access/ticket".to_owned(),
                message: "no ticket in the answer".to_owned(),
            }),
        }
    }

    async fn send_once(
        &self,
        method: Method,
        path: &str,
        params: &Params,
    ) -> Result<(Value, Option<u64>), ApiError> {
        let headers = self.auth_headers(method).await?;
        let result = self.send_plain(method, path, params, &headers).await;
        if let (Err(ApiError::Auth { status: 401, .. }), Credentials::Password { .. }) =
            (&result, &self.inner.opts.credentials)
        {
            // An expired or revoked ticket: forget it so the next call logs in.
            *self.inner.ticket.lock().await = None;
        }
        result
    }

    async fn send_plain(
        &self,
        method: Method,
        path: &str,
        params: &Params,
        headers: &[(&'static str, String)],
    ) -> Result<(Value, Option<u64>), ApiError> {
        let _permit = self
            .inner
            .limiter
            .acquire()
            .await
            .expect("the limiter is never closed");
        self.inner.calls.fetch_add(1, Ordering::Relaxed);
        let url = format!("{}{path}", self.inner.base);
        let http = &self.inner.http;
        let mut req = match method {
            Method::Get => http.get(&url).query(params),
            Method::Delete => http.delete(&url).query(params),
            Method::Post => http.post(&url).form(params),
            Method::Put => http.put(&url).form(params),
        };
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        tracing::trace!("{method:?} {path}");
        let resp = req.send().await.map_err(|e| transport(&e))?;
        let status = resp.status().as_u16();
        let reason = resp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
            .or_else(|| resp.status().canonical_reason().map(str::to_owned))
            .unwrap_or_default();
        let bytes = resp.bytes().await.map_err(|e| transport(&e))?;
        if status != 200 {
            return Err(ApiError::from_body(status, &reason, &bytes));
        }
        let body: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode {
            context: format!("{method:?} {path}"),
            message: e.to_string(),
        })?;
        let total = body.get("total").and_then(Value::as_u64);
        Ok((body.get("data").cloned().unwrap_or(Value::Null), total))
    }

    // ----- cluster --------------------------------------------------------

    pub async fn version(&self) -> Result<Version, ApiError> {
        self.call(Method::Get, "/version", vec![]).await
    }

    /// `/cluster/resources`, optionally of one type (`vm`, `storage`, `node`).
    pub async fn cluster_resources(
        &self,
        kind: Option<&str>,
    ) -> Result<Vec<ClusterResource>, ApiError> {
        let params = kind.map(|k| vec![p("type", k)]).unwrap_or_default();
        self.call(Method::Get, "/cluster/resources", params).await
    }

    /// A free VMID as Proxmox sees it now. It reserves nothing: nixgold
    /// allocates from the fleet's ranges instead and does not use this to
    /// plan; it is here for completeness and diagnostics.
    pub async fn next_id(&self) -> Result<u32, ApiError> {
        let v: Value = self.call(Method::Get, "/cluster/nextid", vec![]).await?;
        v.as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .ok_or_else(|| ApiError::Decode {
                context: "GET /cluster/nextid".into(),
                message: format!("not a VMID: {v}"),
            })
    }

    /// The privileges the caller holds on `path` (`GET
    /// /access/permissions?path=…`: `{path: {privilege: 1, …}}`).
    pub async fn permissions(
        &self,
        path: &str,
    ) -> Result<std::collections::BTreeSet<String>, ApiError> {
        let v: Value = self
            .call(Method::Get, "/access/permissions", vec![p("path", path)])
            .await?;
        Ok(v.get(path)
            .and_then(Value::as_object)
            .map(|privs| privs.keys().cloned().collect())
            .unwrap_or_default())
    }

    /// The names of a node's bridges (`GET /nodes/{node}/network?type=any_bridge`).
    pub async fn bridges(&self, node: &str) -> Result<Vec<String>, ApiError> {
        let v: Value = self
            .call(
                Method::Get,
                &format!("/nodes/{}/network", seg(node)),
                vec![p("type", "any_bridge")],
            )
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i.get("iface").and_then(Value::as_str).map(str::to_owned))
            .collect())
    }

    pub async fn nodes(&self) -> Result<Vec<Node>, ApiError> {
        self.call(Method::Get, "/nodes", vec![]).await
    }

    pub async fn storages(
        &self,
        node: &str,
        content: Option<&str>,
    ) -> Result<Vec<StorageInfo>, ApiError> {
        let params = content.map(|c| vec![p("content", c)]).unwrap_or_default();
        self.call(
            Method::Get,
            &format!("/nodes/{}/storage", seg(node)),
            params,
        )
        .await
    }

    pub async fn storage_content(
        &self,
        node: &str,
        storage: &str,
        content: Option<&str>,
        vmid: Option<u32>,
    ) -> Result<Vec<Volume>, ApiError> {
        let mut params = Vec::new();
        if let Some(c) = content {
            params.push(p("content", c));
        }
        if let Some(v) = vmid {
            params.push(p("vmid", v));
        }
        self.call(
            Method::Get,
            &format!("/nodes/{}/storage/{}/content", seg(node), seg(storage)),
            params,
        )
        .await
    }

    /// Lets the node download `url` into `storage` as `filename`, verified
    /// against `sha256`.
    pub async fn download_url(
        &self,
        node: &str,
        storage: &str,
        url: &str,
        filename: &str,
        sha256: &str,
    ) -> Result<Upid, ApiError> {
        let params = vec![
            p("url", url),
            p("content", "iso"),
            p("filename", filename),
            p("checksum", sha256),
            p("checksum-algorithm", "sha256"),
        ];
        self.task(
            Method::Post,
            &format!("/nodes/{}/storage/{}/download-url", seg(node), seg(storage)),
            params,
        )
        .await
    }

    // ----- VMs ------------------------------------------------------------

    fn vm_path(node: &str, vmid: u32, rest: &str) -> String {
        format!("/nodes/{}/qemu/{vmid}{rest}", seg(node))
    }

    pub async fn create_vm(
        &self,
        node: &str,
        vmid: u32,
        config: &BTreeMap<String, String>,
    ) -> Result<Upid, ApiError> {
        let mut params = vec![p("vmid", vmid)];
        params.extend(config.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.task(Method::Post, &format!("/nodes/{}/qemu", seg(node)), params)
            .await
    }

    /// The config, pending values overlaid unless `current`.
    pub async fn vm_config(
        &self,
        node: &str,
        vmid: u32,
        current: bool,
    ) -> Result<VmConfig, ApiError> {
        let params = if current {
            vec![p("current", 1)]
        } else {
            vec![]
        };
        self.call(Method::Get, &Self::vm_path(node, vmid, "/config"), params)
            .await
    }

    /// Changes config keys in one write (async POST), guarded by `digest`.
    pub async fn update_config(
        &self,
        node: &str,
        vmid: u32,
        update: &ConfigUpdate,
    ) -> Result<Upid, ApiError> {
        self.task(
            Method::Post,
            &Self::vm_path(node, vmid, "/config"),
            update.params(),
        )
        .await
    }

    /// The same as a synchronous PUT (no task).
    pub async fn update_config_sync(
        &self,
        node: &str,
        vmid: u32,
        update: &ConfigUpdate,
    ) -> Result<(), ApiError> {
        let _: Value = self
            .call(
                Method::Put,
                &Self::vm_path(node, vmid, "/config"),
                update.params(),
            )
            .await?;
        Ok(())
    }

    pub async fn pending(&self, node: &str, vmid: u32) -> Result<Vec<PendingEntry>, ApiError> {
        self.call(Method::Get, &Self::vm_path(node, vmid, "/pending"), vec![])
            .await
    }

    pub async fn vm_status(&self, node: &str, vmid: u32) -> Result<VmStatus, ApiError> {
        self.call(
            Method::Get,
            &Self::vm_path(node, vmid, "/status/current"),
            vec![],
        )
        .await
    }

    pub async fn start(&self, node: &str, vmid: u32) -> Result<Upid, ApiError> {
        self.task(
            Method::Post,
            &Self::vm_path(node, vmid, "/status/start"),
            vec![],
        )
        .await
    }

    pub async fn stop(&self, node: &str, vmid: u32) -> Result<Upid, ApiError> {
        self.task(
            Method::Post,
            &Self::vm_path(node, vmid, "/status/stop"),
            vec![],
        )
        .await
    }

    pub async fn shutdown(
        &self,
        node: &str,
        vmid: u32,
        timeout_secs: u64,
        force_stop: bool,
    ) -> Result<Upid, ApiError> {
        let params = vec![
            p("timeout", timeout_secs),
            p("forceStop", u8::from(force_stop)),
        ];
        self.task(
            Method::Post,
            &Self::vm_path(node, vmid, "/status/shutdown"),
            params,
        )
        .await
    }

    pub async fn clone_vm(
        &self,
        node: &str,
        vmid: u32,
        request: &CloneRequest,
    ) -> Result<Upid, ApiError> {
        let CloneRequest {
            newid,
            name,
            full,
            storage,
            target,
            description,
            pool,
        } = request;
        let mut params = vec![p("newid", newid), p("full", u8::from(*full))];
        if let Some(n) = name {
            params.push(p("name", n));
        }
        if let Some(s) = storage {
            params.push(p("storage", s));
        }
        if let Some(t) = target {
            params.push(p("target", t));
        }
        if let Some(d) = description {
            params.push(p("description", d));
        }
        if let Some(pl) = pool {
            params.push(p("pool", pl));
        }
        self.task(Method::Post, &Self::vm_path(node, vmid, "/clone"), params)
            .await
    }

    /// Converts to a template (base volumes; never `template=1` in config).
    pub async fn template(&self, node: &str, vmid: u32) -> Result<Upid, ApiError> {
        self.task(
            Method::Post,
            &Self::vm_path(node, vmid, "/template"),
            vec![],
        )
        .await
    }

    /// Destroys the VM. `unreferenced_disks` also removes volumes named for
    /// this VMID that its config does not reference.
    pub async fn destroy(
        &self,
        node: &str,
        vmid: u32,
        purge: bool,
        unreferenced_disks: bool,
    ) -> Result<Upid, ApiError> {
        let mut params = vec![];
        if purge {
            params.push(p("purge", 1));
        }
        if unreferenced_disks {
            params.push(p("destroy-unreferenced-disks", 1));
        }
        self.task(Method::Delete, &Self::vm_path(node, vmid, ""), params)
            .await
    }

    // ----- pools ------------------------------------------------------------

    /// A resource pool (`GET /pools/{poolid}`; the per-id form every PVE
    /// version since 4 serves). A missing pool is [`ApiError::NotFound`].
    pub async fn pool(&self, poolid: &str) -> Result<PoolInfo, ApiError> {
        self.call(Method::Get, &format!("/pools/{}", seg(poolid)), vec![])
            .await
    }

    /// Creates a pool. Proxmox creates a pool id once cluster-wide: a second
    /// create fails with "pool '…' already exists".
    pub async fn create_pool(&self, poolid: &str, comment: &str) -> Result<(), ApiError> {
        let params = vec![p("poolid", poolid), p("comment", comment)];
        let _: Value = self.call(Method::Post, "/pools", params).await?;
        Ok(())
    }

    /// Replaces a pool's comment.
    pub async fn set_pool_comment(&self, poolid: &str, comment: &str) -> Result<(), ApiError> {
        let path = format!("/pools/{}", seg(poolid));
        let _: Value = self
            .call(Method::Put, &path, vec![p("comment", comment)])
            .await?;
        Ok(())
    }

    /// Deletes an empty pool.
    pub async fn delete_pool(&self, poolid: &str) -> Result<(), ApiError> {
        let path = format!("/pools/{}", seg(poolid));
        let _: Value = self.call(Method::Delete, &path, vec![]).await?;
        Ok(())
    }

    /// Grows `disk` to `size` (`40G`, or `+10G`). Asynchronous since PVE 8.
    pub async fn resize(
        &self,
        node: &str,
        vmid: u32,
        disk: &str,
        size: &str,
        digest: Option<&str>,
    ) -> Result<Option<Upid>, ApiError> {
        let mut params = vec![p("disk", disk), p("size", size)];
        if let Some(d) = digest {
            params.push(p("digest", d));
        }
        let (data, _) = self
            .call_raw(Method::Put, &Self::vm_path(node, vmid, "/resize"), &params)
            .await?;
        // PVE 7 answered null (synchronous); PVE 8+ a UPID.
        match data {
            Value::String(s) => s.parse().map(Some).map_err(|m| ApiError::Decode {
                context: "PUT resize".into(),
                message: m,
            }),
            _ => Ok(None),
        }
    }

    /// Types one key or chord on the console (`a`, `shift-a`, `ret`).
    pub async fn sendkey(&self, node: &str, vmid: u32, key: &str) -> Result<(), ApiError> {
        let _: Value = self
            .call(
                Method::Put,
                &Self::vm_path(node, vmid, "/sendkey"),
                vec![p("key", key)],
            )
            .await?;
        Ok(())
    }

    pub async fn agent_interfaces(
        &self,
        node: &str,
        vmid: u32,
    ) -> Result<Vec<GuestInterface>, ApiError> {
        let v: Value = self
            .call(
                Method::Get,
                &Self::vm_path(node, vmid, "/agent/network-get-interfaces"),
                vec![],
            )
            .await?;
        decode_agent_interfaces(v)
    }

    /// `agent/get-osinfo` (needs only `VM.GuestAgent.Audit`).
    pub async fn agent_osinfo(&self, node: &str, vmid: u32) -> Result<OsInfo, ApiError> {
        let v: Value = self
            .call(
                Method::Get,
                &Self::vm_path(node, vmid, "/agent/get-osinfo"),
                vec![],
            )
            .await?;
        decode_osinfo(v)
    }

    /// `agent/ping`: Ok once the guest's agent answers.
    pub async fn agent_ping(&self, node: &str, vmid: u32) -> Result<(), ApiError> {
        let _: Value = self
            .call(
                Method::Post,
                &Self::vm_path(node, vmid, "/agent/ping"),
                vec![],
            )
            .await?;
        Ok(())
    }

    /// Runs `command` (program and arguments) in the guest through the
    /// agent (`agent/exec`), then polls `agent/exec-status` until it
    /// exits; a command still running after `within` is a
    /// [`ApiError::Timeout`]. The arguments are sent as a repeated form
    /// key, which is how the API takes an array.
    pub async fn agent_run(
        &self,
        node: &str,
        vmid: u32,
        command: &[String],
        within: Duration,
    ) -> Result<AgentExit, ApiError> {
        let until = Instant::now() + within;
        let started: Value = self
            .call(
                Method::Post,
                &Self::vm_path(node, vmid, "/agent/exec"),
                command.iter().map(|c| p("command", c)).collect(),
            )
            .await?;
        let pid = started
            .get("pid")
            .and_then(Value::as_u64)
            .ok_or_else(|| ApiError::Decode {
                context: "agent/exec".into(),
                message: format!("no pid in {started}"),
            })?;
        let mut delay = Duration::from_millis(100);
        loop {
            let status: AgentExecStatus = self
                .call(
                    Method::Get,
                    &Self::vm_path(node, vmid, "/agent/exec-status"),
                    vec![p("pid", pid)],
                )
                .await?;
            if status.exited {
                let code = match (status.exitcode, status.signal) {
                    (Some(code), _) => code,
                    (None, Some(signal)) => 128 + signal,
                    (None, None) => 255,
                };
                return Ok(AgentExit {
                    code: u32::try_from(code).unwrap_or(u32::MAX),
                    out: status.out_data.unwrap_or_default(),
                    err: status.err_data.unwrap_or_default(),
                });
            }
            if Instant::now() + delay > until {
                return Err(ApiError::Timeout {
                    what: format!("agent/exec pid {pid} in VM {vmid}"),
                    seconds: within.as_secs(),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Rebuilds the cloud-init drive now (it is also rebuilt at cold start).
    pub async fn regenerate_cloudinit(&self, node: &str, vmid: u32) -> Result<(), ApiError> {
        let _: Value = self
            .call(
                Method::Put,
                &Self::vm_path(node, vmid, "/cloudinit"),
                vec![],
            )
            .await?;
        Ok(())
    }

    /// What the cloud-init drive holds (`user`, `network` or `meta`).
    pub async fn cloudinit_dump(
        &self,
        node: &str,
        vmid: u32,
        kind: &str,
    ) -> Result<String, ApiError> {
        self.call(
            Method::Get,
            &Self::vm_path(node, vmid, "/cloudinit/dump"),
            vec![p("type", kind)],
        )
        .await
    }

    // ----- tasks ----------------------------------------------------------

    async fn task(&self, method: Method, path: &str, params: Params) -> Result<Upid, ApiError> {
        let s: String = self.call(method, path, params).await?;
        s.parse().map_err(|m| ApiError::Decode {
            context: format!("{method:?} {path}"),
            message: m,
        })
    }

    pub async fn task_status(&self, upid: &Upid) -> Result<TaskStatus, ApiError> {
        let path = format!(
            "/nodes/{}/tasks/{}/status",
            seg(&upid.node),
            seg(&upid.to_string())
        );
        self.call(Method::Get, &path, vec![]).await
    }

    /// Lines `start..start+limit` of the task log (`limit` 0: all) and the total.
    pub async fn task_log(
        &self,
        upid: &Upid,
        start: u64,
        limit: u64,
    ) -> Result<(Vec<LogLine>, u64), ApiError> {
        let path = format!(
            "/nodes/{}/tasks/{}/log",
            seg(&upid.node),
            seg(&upid.to_string())
        );
        let params = vec![p("start", start), p("limit", limit)];
        let (data, total) = self.call_raw(Method::Get, &path, &params).await?;
        let lines: Vec<LogLine> = serde_json::from_value(data).map_err(|e| ApiError::Decode {
            context: "task log".into(),
            message: e.to_string(),
        })?;
        let total = total.unwrap_or(lines.len() as u64);
        Ok((lines, total))
    }

    /// Polls a task until it stops, paced by what tasks of its type took
    /// before (see `pacer`). Deliberately no
    /// deadline: callers wrap it (see [`Client::wait_task_for`]). `OK` and
    /// `WARNINGS: n` succeed; anything else is [`ApiError::Task`] with the
    /// log's last lines.
    pub async fn wait_task(&self, upid: &Upid) -> Result<TaskStatus, ApiError> {
        let started = std::time::Instant::now();
        loop {
            let status = self.task_status(upid).await?;
            if !status.is_running() {
                self.inner.pacer.observe(&upid.kind, started.elapsed());
                if status.succeeded() {
                    return Ok(status);
                }
                let tail = self.log_tail(upid, 10).await;
                return Err(ApiError::Task {
                    upid: upid.to_string(),
                    exitstatus: status
                        .exitstatus
                        .unwrap_or_else(|| "unexpected status".to_owned()),
                    log_tail: tail,
                });
            }
            self.inner.pacer.pause(&upid.kind, started.elapsed()).await;
        }
    }

    /// Stops a running task (`DELETE …/tasks/{upid}`); the worker cleans up
    /// what it started.
    pub async fn stop_task(&self, upid: &Upid) -> Result<(), ApiError> {
        let path = format!(
            "/nodes/{}/tasks/{}",
            seg(&upid.node),
            seg(&upid.to_string())
        );
        let _: Value = self.call(Method::Delete, &path, vec![]).await?;
        Ok(())
    }

    /// [`Client::wait_task`] with a deadline.
    pub async fn wait_task_for(
        &self,
        upid: &Upid,
        deadline: Duration,
    ) -> Result<TaskStatus, ApiError> {
        tokio::time::timeout(deadline, self.wait_task(upid))
            .await
            .unwrap_or_else(|_| {
                Err(ApiError::TaskTimeout {
                    upid: upid.to_string(),
                    seconds: deadline.as_secs(),
                })
            })
    }

    /// The last `lines` lines of a task's log (empty when it cannot be read).
    pub async fn log_tail(&self, upid: &Upid, lines: u64) -> Vec<String> {
        let Ok((_, total)) = self.task_log(upid, 0, 1).await else {
            return Vec::new();
        };
        let start = total.saturating_sub(lines);
        self.task_log(upid, start, lines)
            .await
            .map(|(l, _)| l.into_iter().map(|l| l.t).collect())
            .unwrap_or_default()
    }
}

fn transport(e: &reqwest::Error) -> ApiError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    ApiError::Transport {
        status: None,
        message,
    }
}

/// One config write: keys to set, keys to delete, the digest it expects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigUpdate {
    pub set: BTreeMap<String, String>,
    pub delete: Vec<String>,
    /// The digest read before; a concurrent change makes the write fail.
    pub digest: Option<String>,
}

impl ConfigUpdate {
    fn params(&self) -> Params {
        let mut params: Params = self
            .set
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !self.delete.is_empty() {
            params.push(p("delete", self.delete.join(",")));
        }
        if let Some(d) = &self.digest {
            params.push(p("digest", d));
        }
        params
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.delete.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneRequest {
    pub newid: u32,
    pub name: Option<String>,
    /// Full copy; false for a linked clone of a template.
    pub full: bool,
    /// Target storage (full clones only).
    pub storage: Option<String>,
    /// Target node (needs shared storage).
    pub target: Option<String>,
    pub description: Option<String>,
    pub pool: Option<String>,
}
