//! The HTTP side: pveproxy's wire behaviour in front of the handlers.
//!
//! `/api2/json/...` only; the `{"data": …}` envelope; errors in the reason
//! phrase *and* the body's `message`; 400 with `errors`; 401 (delayed, empty
//! body) from the authentication check; 501 for unknown paths and for a
//! body on GET/DELETE. In front of that: the performance model (bounded
//! workers, service time, latency) and request-level faults. A small
//! control plane under `/_sim/` lets scripts inject faults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::Inner;
use crate::auth::Identity;
use crate::handlers::{Call, handle, result_total};
use crate::options::{FaultAction, FaultRule};
use crate::routes::{RouteId, find};
use crate::state::{ApiError, TaskFault, lock_timeout_message, now_ms};

/// Largest accepted request body (libpve-http-server-perl ≥ 5.2.1).
const MAX_BODY: usize = 512 * 1024;

/// Returned by the service to close a connection without answering.
#[derive(Debug)]
pub struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by fault injection")
    }
}
impl std::error::Error for Dropped {}

type Reply = Response<Full<Bytes>>;

pub async fn accept_loop(
    inner: Arc<Inner>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let inner = inner.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(inner.clone(), req));
            let builder = hyper::server::conn::http1::Builder::new();
            let result = match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => builder.serve_connection(TokioIo::new(s), service).await,
                    Err(e) => {
                        tracing::debug!("TLS handshake failed: {e}");
                        return;
                    }
                },
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
}

fn reply(status: u16, reason: &str, body: Option<Value>) -> Reply {
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // Only the first line of a message fits in the status line; Proxmox
    // replaces a message with CR/LF by a plain reason.
    let phrase: String = reason
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .collect();
    if let Ok(p) = hyper::ext::ReasonPhrase::try_from(phrase.into_bytes()) {
        response.extensions_mut().insert(p);
    }
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        "application/json;charset=UTF-8".parse().expect("header"),
    );
    headers.insert("server", "pve-api-daemon/3.0".parse().expect("header"));
    headers.insert("cache-control", "max-age=0".parse().expect("header"));
    headers.insert("pragma", "no-cache".parse().expect("header"));
    response
}

fn error_reply(e: &ApiError) -> Reply {
    let mut body = json!({ "data": null, "message": format!("{}\n", e.message) });
    if !e.errors.is_empty() {
        body["errors"] = json!(e.errors);
    }
    reply(e.status, &e.message, Some(body))
}

fn not_implemented(method: &str, path: &str) -> Reply {
    error_reply(&ApiError::new(
        501,
        format!("Method '{method} {path}' not implemented"),
    ))
}

async fn respond(inner: Arc<Inner>, req: Request<Incoming>) -> Result<Reply, Dropped> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    if let Some(control) = path.strip_prefix("/_sim/") {
        return Ok(control_plane(&inner, &method, control, req).await);
    }
    let Some(api_path) = path.strip_prefix("/api2/json") else {
        return Ok(not_implemented(&method, &path));
    };
    let api_path = if api_path.is_empty() { "/" } else { api_path }.to_owned();

    // The request travels to the server, waits for a free worker, which
    // is busy with it for the service time and while its handler runs
    // (a synchronous call waits there for a config lock), and the answer
    // travels back: pveproxy's workers are event-driven and pvedaemon's
    // busy only while they run the call, never while bytes are on the
    // wire (`workers.rs` keeps the queue). (The issue that calibrated this
    // model counts 2,006 plan reads as 1.5 s of server time: 2,006 × 3 ms
    // over 4 workers.)
    let opts = &inner.opts;
    tokio::time::sleep(opts.latency).await;
    let turn = inner.workers.take(opts.service_time).await;
    tokio::time::sleep_until(turn.ends).await;
    let held = inner.workers.hold(&turn);
    let result = serve_one(&inner, req, &method, &api_path).await;
    drop(held);
    tokio::time::sleep(opts.latency).await;
    result
}

/// One request on its worker: the faults a rule injects, the handler, and
/// the guests' view of what changed.
async fn serve_one(
    inner: &Arc<Inner>,
    req: Request<Incoming>,
    method: &str,
    api_path: &str,
) -> Result<Reply, Dropped> {
    let mut injected = Injected::default();
    match inner.opts.faults.take(method, api_path) {
        Some(FaultAction::Drop) => return Err(Dropped),
        Some(FaultAction::Status(code)) => {
            let reason = match code {
                595 => {
                    "Errors during connection establishment, proxy handshake: Connection refused"
                }
                596 => "Connection timed out",
                599 => "Too many redirections",
                _ => "injected fault",
            };
            return Ok(reply(code, reason, Some(json!({ "data": null }))));
        }
        Some(FaultAction::Slow(delay)) => tokio::time::sleep(delay).await,
        Some(FaultAction::LockTimeout) => injected.lock_timeout = true,
        Some(FaultAction::TaskFail(msg)) => injected.task = Some(TaskFault::Fail(msg)),
        Some(FaultAction::TaskHang) => injected.task = Some(TaskFault::Hang),
        Some(FaultAction::AgentNotRunning) => injected.agent_down = true,
        Some(FaultAction::WrongKey) => injected.wrong_key = true,
        // A guest's fault (`SSH reboot => new-lease`): nothing for HTTP.
        Some(FaultAction::NewLease) | None => {}
    }
    let result = serve_api(inner, req, method, api_path, injected).await;
    // The guests see power changes and typed keys after each request.
    crate::guest::sync(inner, true).await;
    Ok(result)
}

/// Faults a rule injected into one request, for the handlers.
#[derive(Default)]
struct Injected {
    task: Option<TaskFault>,
    lock_timeout: bool,
    agent_down: bool,
    wrong_key: bool,
}

async fn serve_api(
    inner: &Arc<Inner>,
    req: Request<Incoming>,
    method: &str,
    api_path: &str,
    injected: Injected,
) -> Reply {
    let Injected {
        task: task_fault,
        lock_timeout,
        agent_down,
        wrong_key,
    } = injected;
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorization = header("authorization");
    let cookie = header("cookie");
    let csrf = header("csrfpreventiontoken");
    let content_type = header("content-type").unwrap_or_default();
    let query = req.uri().query().unwrap_or_default().to_owned();

    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error_reply(&ApiError::new(413, "request too large")),
    };
    if !body.is_empty() && !matches!(method, "POST" | "PUT") {
        return error_reply(&ApiError::new(
            501,
            format!("Unexpected content for method '{method}'"),
        ));
    }

    // Path segments are unescaped (a UPID travels percent-encoded).
    let decoded: Vec<String> = api_path
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let route = match find(method, &decoded.join("/")) {
        Ok(r) => r,
        Err(_) => return not_implemented(method, api_path),
    };
    let (route, captured) = route;

    let mut params = match parse_params(&query, &body, &content_type) {
        Ok(p) => p,
        Err(e) => return error_reply(&e),
    };
    for (name, value) in captured {
        match params.get(name) {
            Some(existing) if existing != &value => {
                return error_reply(&ApiError::param(
                    name,
                    "duplicate parameter (already defined in URI) with conflicting values!",
                ));
            }
            _ => {
                params.insert(name.to_owned(), value);
            }
        }
    }

    inner.record(crate::JournalEntry {
        method: method.to_owned(),
        route: route.path,
        params: params.clone(),
    });

    let who = if route.public {
        Identity {
            authid: String::new(),
            via_ticket: false,
        }
    } else {
        let headers = crate::auth::Headers {
            authorization: authorization.as_deref(),
            cookie: cookie.as_deref(),
            csrf: csrf.as_deref(),
        };
        let api_token = |id: &str, secret: &str| {
            let state = inner.state.lock().expect("state");
            state.access.token(id).is_some_and(|t| t.secret == secret)
        };
        match inner
            .auth
            .authenticate(headers, method, now_ms() / 1000, &api_token)
        {
            Ok(who) => who,
            Err(unauthorized) => {
                tokio::time::sleep(inner.opts.auth_failure_delay).await;
                return reply(401, unauthorized.0, None);
            }
        }
    };

    let errors = crate::params::validate(&route.params, &params);
    if !errors.is_empty() {
        return error_reply(&ApiError::params(errors));
    }

    if route.id == RouteId::TicketPost {
        return login(inner, &params).await;
    }

    // The guest model answers the agent routes, after the same permission
    // check every handler gets (pve-access-control `RPCEnvironment.pm`
    // checks a method's `permissions` before it runs).
    if crate::guest::answers(route.id) {
        let call = Call {
            params: &params,
            who: &who,
            task_fault: None,
            lock_timeout: false,
            wrong_key: false,
        };
        let state = inner.state.lock().expect("state");
        if let Err(e) = crate::access_routes::authorize(&state, route.id, &call) {
            return error_reply(&e);
        }
    }
    if let Some(result) = crate::guest::agent(inner, route.id, &params, agent_down).await {
        return match result {
            Ok(data) => reply(200, "OK", Some(json!({ "data": data }))),
            Err(e) => error_reply(&e),
        };
    }

    // Synchronous calls take the VM's config lock and wait for it.
    let lock_vmid = match route.id {
        RouteId::ConfigPut | RouteId::Sendkey | RouteId::CloudinitPut => {
            params.get("vmid").and_then(|v| v.parse().ok())
        }
        _ => None,
    };
    if let Some(vmid) = lock_vmid {
        if lock_timeout {
            tokio::time::sleep(inner.opts.vm_lock_timeout).await;
            return error_reply(&ApiError::fail(lock_timeout_message(vmid)));
        }
        let deadline = now_ms() + inner.opts.vm_lock_timeout.as_millis() as u64;
        loop {
            let busy = {
                let mut state = inner.state.lock().expect("state");
                state.advance(&inner.opts);
                state.vm_busy_until(vmid)
            };
            match busy {
                None => break,
                Some(_) if now_ms() >= deadline => {
                    return error_reply(&ApiError::fail(lock_timeout_message(vmid)));
                }
                Some(until) => {
                    let wait = until.min(deadline).saturating_sub(now_ms()).max(5);
                    tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                }
            }
        }
    }

    let call = Call {
        params: &params,
        who: &who,
        task_fault,
        lock_timeout,
        wrong_key,
    };
    let outcome = {
        let mut state = inner.state.lock().expect("state");
        state.advance(&inner.opts);
        let result = handle(&mut state, &inner.opts, route.id, &call);
        let total = result
            .is_ok()
            .then(|| result_total(&state, route.id, &call))
            .flatten();
        if method != "GET" && result.is_ok() {
            state.guests_stale = true;
            inner.persist(&state);
        }
        result.map(|data| (data, total))
    };
    match outcome {
        Ok((data, total)) => {
            let mut body = json!({ "data": data });
            if let Some(total) = total {
                body["total"] = json!(total);
            }
            reply(200, "OK", Some(body))
        }
        Err(e) => error_reply(&e),
    }
}

async fn login(inner: &Arc<Inner>, params: &BTreeMap<String, String>) -> Reply {
    let mut username = params.get("username").cloned().unwrap_or_default();
    if let Some(realm) = params.get("realm")
        && !username.contains('@')
    {
        username = format!("{username}@{realm}");
    }
    let password = params.get("password").cloned().unwrap_or_default();
    let now = now_ms() / 1000;
    match inner.auth.login(&username, &password, now) {
        Some(user) => {
            let (ticket, csrf) = inner.auth.ticket(&user, now);
            let body = json!({ "data": {
                "username": user,
                "ticket": ticket,
                "CSRFPreventionToken": csrf,
                "cap": {
                    "vms": {"VM.Allocate": 1, "VM.Audit": 1, "VM.Clone": 1, "VM.Config.Disk": 1, "VM.Console": 1, "VM.PowerMgmt": 1},
                    "storage": {"Datastore.Allocate": 1, "Datastore.AllocateSpace": 1, "Datastore.AllocateTemplate": 1, "Datastore.Audit": 1},
                    "nodes": {"Sys.Audit": 1, "Sys.Modify": 1},
                    "access": {}, "dc": {}, "sdn": {}, "mapping": {}
                },
            }});
            reply(200, "OK", Some(body))
        }
        None => {
            tokio::time::sleep(inner.opts.auth_failure_delay).await;
            error_reply(&ApiError::new(401, "authentication failure"))
        }
    }
}

/// Query string, plus an urlencoded or JSON body (POST/PUT). A repeated
/// urlencoded key joins its values with NUL, as pve-http-server does.
fn parse_params(
    query: &str,
    body: &[u8],
    content_type: &str,
) -> Result<BTreeMap<String, String>, ApiError> {
    let mut params = BTreeMap::new();
    let mut add = |k: String, v: String| {
        params
            .entry(k)
            .and_modify(|existing: &mut String| {
                existing.push('\0');
                existing.push_str(&v);
            })
            .or_insert(v);
    };
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        add(k.into_owned(), v.into_owned());
    }
    if body.is_empty() {
        return Ok(params);
    }
    if content_type.starts_with("application/json") {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(400, format!("unable to parse JSON body: {e}")))?;
        let Value::Object(map) = value else {
            return Err(ApiError::new(400, "JSON body is not an object"));
        };
        for (k, v) in map {
            let v = match v {
                Value::String(s) => s,
                Value::Bool(b) => if b { "1" } else { "0" }.to_owned(),
                Value::Number(n) => n.to_string(),
                Value::Null => continue,
                Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join("\0"),
                other => other.to_string(),
            };
            add(k, v);
        }
    } else {
        for (k, v) in form_urlencoded::parse(body) {
            add(k.into_owned(), v.into_owned());
        }
    }
    Ok(params)
}

/// `/_sim/faults`: GET lists, POST adds (`{"rule": "METHOD PATH => ACTION"}`
/// or the rule as plain text), DELETE clears.
async fn control_plane(
    inner: &Arc<Inner>,
    method: &str,
    path: &str,
    req: Request<Incoming>,
) -> Reply {
    if path != "faults" {
        return not_implemented(method, &format!("/_sim/{path}"));
    }
    match method {
        "GET" => {
            let rules: Vec<String> = inner
                .opts
                .faults
                .list()
                .iter()
                .map(|r| format!("{r:?}"))
                .collect();
            reply(200, "OK", Some(json!({ "data": rules })))
        }
        "DELETE" => {
            inner.opts.faults.clear();
            reply(200, "OK", Some(json!({ "data": null })))
        }
        "POST" => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return error_reply(&ApiError::new(413, "request too large")),
            };
            let text = String::from_utf8_lossy(&body).into_owned();
            let rule_text = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("rule").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or(text);
            match rule_text.trim().parse::<FaultRule>() {
                Ok(rule) => {
                    inner.opts.faults.add(rule);
                    reply(200, "OK", Some(json!({ "data": null })))
                }
                Err(e) => error_reply(&ApiError::new(400, e)),
            }
        }
        _ => not_implemented(method, "/_sim/faults"),
    }
}

pub fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound listener has an address")
}
