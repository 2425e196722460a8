//! A Proxmox VE 9 API simulator.
//!
//! It serves `/api2/json/...` over HTTP or HTTPS on loopback and behaves
//! like Proxmox as its API schema and observed wire behaviour describe:
//! envelope and errors, token and ticket authentication, asynchronous
//! tasks with UPIDs and logs, config digests and pending values, canonical
//! property strings, locks and their timeouts, storage capacity, linked
//! clones that pin their template, and the performance and fault models
//! that make tests and benchmarks meaningful.
//!
//! It is deliberately its own code: it shares no request or response type
//! with nixgold's client, so a misunderstanding of the API cannot hide in a
//! shared type. Its route declarations are checked against the official
//! schema by `tests/conformance.rs`.

pub mod access;
mod access_routes;
mod auth;
pub mod cluster;
mod config;
pub mod formats;
pub mod guest;
mod handlers;
pub mod nixos;
pub mod options;
pub mod params;
pub mod pools;
pub mod routes;
mod server;
mod snapshots;
pub mod state;
mod wget;
mod workers;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

pub use cluster::ClusterSpec;
pub use handlers::{RELEASE, VERSION};
pub use options::{FaultAction, FaultRule, RemoteFile, SimOptions};
pub use state::State;

/// The certificate of an HTTPS simulator.
#[derive(Debug, Clone)]
pub struct Certificate {
    pub pem: String,
    /// SHA-256 of the DER certificate, `AA:BB:…` upper-case.
    pub fingerprint: String,
}

/// One request as the simulator understood it (after routing and
/// parameter parsing, before authentication).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub method: String,
    /// The route's path template, e.g. `/nodes/{node}/qemu/{vmid}/config`.
    pub route: &'static str,
    /// Every parameter, path parameters included.
    pub params: BTreeMap<String, String>,
}

/// How many requests the journal keeps.
const JOURNAL_LIMIT: usize = 100_000;

pub(crate) struct Inner {
    pub(crate) guests: guest::Guests,
    pub(crate) journal: Mutex<std::collections::VecDeque<JournalEntry>>,
    pub(crate) state: Mutex<State>,
    pub(crate) opts: SimOptions,
    pub(crate) auth: auth::Auth,
    pub(crate) workers: workers::Workers,
    state_file: Option<PathBuf>,
}

impl Inner {
    pub(crate) fn record(&self, entry: JournalEntry) {
        let mut journal = self.journal.lock().expect("journal");
        if journal.len() == JOURNAL_LIMIT {
            journal.pop_front();
        }
        journal.push_back(entry);
    }

    /// Writes the state file, if any (temp file + rename).
    pub(crate) fn persist(&self, state: &State) {
        let Some(path) = &self.state_file else { return };
        let result = serde_json::to_vec(state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, path)
            });
        if let Err(e) = result {
            tracing::error!("cannot persist simulator state to {}: {e}", path.display());
        }
    }
}

/// A simulated cluster and the credentials it accepts.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

/// Credentials the simulator accepts.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// `user@realm!tokenname` → secret.
    pub tokens: BTreeMap<String, String>,
    /// `user@realm` → password (for tickets).
    pub users: BTreeMap<String, String>,
}

impl Credentials {
    /// One API token, written `user@realm!id=secret`.
    pub fn token(full: &str) -> Result<Self, String> {
        let (id, secret) = full
            .rsplit_once('=')
            .filter(|(id, s)| id.contains('@') && id.contains('!') && !s.is_empty())
            .ok_or_else(|| format!("token {full:?} is not of the form user@realm!id=secret"))?;
        Ok(Credentials {
            tokens: BTreeMap::from([(id.to_owned(), secret.to_owned())]),
            users: BTreeMap::new(),
        })
    }

    pub fn with_user(mut self, user: &str, password: &str) -> Self {
        self.users.insert(user.to_owned(), password.to_owned());
        self
    }
}

impl Simulator {
    pub fn new(spec: ClusterSpec, opts: SimOptions, credentials: Credentials) -> Self {
        Self::with_state(State::new(spec), opts, credentials, None)
    }

    /// Loads the state from `path` when it exists (else starts from
    /// `spec`), and saves it there after every change.
    pub fn persistent(
        path: &Path,
        spec: ClusterSpec,
        opts: SimOptions,
        credentials: Credentials,
    ) -> std::io::Result<Self> {
        let state = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("simulator state {} is unreadable: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::new(spec),
            Err(e) => return Err(e),
        };
        let sim = Self::with_state(state, opts, credentials, Some(path.to_owned()));
        sim.inner.persist(&sim.inner.state.lock().expect("state"));
        Ok(sim)
    }

    fn with_state(
        state: State,
        opts: SimOptions,
        credentials: Credentials,
        state_file: Option<PathBuf>,
    ) -> Self {
        let mut state = state;
        // The configured tokens are their users' own (no privilege
        // separation): the default root token keeps every privilege.
        for (authid, secret) in &credentials.tokens {
            if let Some((user, name)) = authid.split_once('!') {
                let tokens = state.access.users.entry(user.to_owned()).or_default();
                tokens.entry(name.to_owned()).or_insert(access::Token {
                    privsep: false,
                    secret: secret.clone(),
                });
            }
        }
        let workers = workers::Workers::new(opts.workers);
        Simulator {
            inner: Arc::new(Inner {
                guests: guest::Guests::default(),
                journal: Mutex::new(std::collections::VecDeque::new()),
                state: Mutex::new(state),
                opts,
                auth: auth::Auth::new(credentials.tokens, credentials.users),
                workers,
                state_file,
            }),
        }
    }

    pub fn options(&self) -> &SimOptions {
        &self.inner.opts
    }

    /// Reads the state (after applying finished tasks); for tests.
    pub fn inspect<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let mut state = self.inner.state.lock().expect("state");
        state.advance(&self.inner.opts);
        f(&state)
    }

    /// The requests served so far, oldest first (the last 100,000).
    pub fn journal(&self) -> Vec<JournalEntry> {
        self.inner
            .journal
            .lock()
            .expect("journal")
            .iter()
            .cloned()
            .collect()
    }

    /// The guests of running VMs (console history, SSH port).
    pub fn guests(&self) -> &guest::Guests {
        &self.inner.guests
    }

    /// Serves plain HTTP on `listener` until the handle is shut down.
    pub fn serve(&self, listener: TcpListener) -> ServerHandle {
        self.spawn(listener, None, None)
    }

    /// Serves HTTPS with a fresh self-signed certificate for localhost,
    /// 127.0.0.1 and ::1.
    pub fn serve_tls(&self, listener: TcpListener) -> Result<ServerHandle, String> {
        let names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let params = rcgen::CertificateParams::new(names).map_err(|e| e.to_string())?;
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        let der = cert.der().clone();
        let fingerprint = Sha256::digest(&der)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| e.to_string())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(vec![der], key_der)
            .map_err(|e| e.to_string())?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let certificate = Certificate {
            pem: cert.pem(),
            fingerprint,
        };
        Ok(self.spawn(listener, Some(acceptor), Some(certificate)))
    }

    fn spawn(
        &self,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        certificate: Option<Certificate>,
    ) -> ServerHandle {
        let addr = server::local_addr(&listener);
        let (tx, rx) = tokio::sync::watch::channel(false);
        // Guests live on their own clock: a VM reboots, boots and reads its
        // console whether or not anyone calls the API.
        let inner = self.inner.clone();
        let mut stop = rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => guest::sync(&inner, false).await,
                    _ = stop.changed() => return,
                }
            }
        });
        let join = tokio::spawn(server::accept_loop(self.inner.clone(), listener, tls, rx));
        ServerHandle {
            addr,
            certificate,
            shutdown: tx,
            join,
        }
    }
}

/// A running server.
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub certificate: Option<Certificate>,
    shutdown: tokio::sync::watch::Sender<bool>,
    join: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// `http(s)://ADDR` — the base URL without `/api2/json`.
    pub fn url(&self) -> String {
        let scheme = if self.certificate.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops accepting connections and waits for the accept loop to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.join.await;
    }
}
