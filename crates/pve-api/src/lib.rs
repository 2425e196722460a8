//! A client for the Proxmox VE API, written from the official schema and
//! the wire behaviour of real servers (PVE 6 to 9).
//!
//! - [`Client`]: reqwest + rustls, one pool, bounded requests in flight,
//!   API tokens or tickets (CSRF, renewal), retries for idempotent reads.
//! - [`Tls`]: system roots, a CA file, a pinned SHA-256 fingerprint, or —
//!   only on explicit request — no verification.
//! - [`ApiError`]: not found, auth, parameters, lock contention, stale
//!   digest, transport, task failure with the log's tail.
//! - [`types`]: tolerant decoding of Perl-typed JSON; [`property`]: property
//!   strings in canonical form; [`Upid`]: task ids.
//!
//! Credentials never appear in `Debug` output, logs or errors.

mod auth;
mod client;
mod error;
mod pacer;
pub mod property;
mod tls;
pub mod types;
mod upid;

pub use auth::{Credentials, Secret, Tls};
pub use client::{Client, ClientOptions, CloneRequest, ConfigUpdate, Params};
pub use error::ApiError;
pub use upid::Upid;
