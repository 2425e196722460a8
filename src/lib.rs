//! nixgold: NixOS golden images and the VMs cloned from them on Proxmox VE,
//! reconciled from one fleet file and a lockfile.
//!
//! The pipeline, one module per word of DESIGN.md: [`fleet`] (what the user
//! wrote, checked by [`validate`]) and [`lock`] (what is pinned, [`pin`] resolves) give the
//! [`desired`] graph; [`live`] state is read through [`connect`]; [`plan`]
//! diffs the two, [`render`] shows it ([`plan_json`] for programs),
//! [`apply`] executes it and [`record`] writes what it built into the
//! lockfile; [`stamp`] reads and writes the ownership stamp every VM
//! carries; [`nixos`] renders an image's configuration;
//! [`doctor`] checks a cluster can take the fleet. The core (fleet → desired
//! → plan →
//! render) is synchronous and pure; live, pin and apply are async.

pub mod address;
pub mod apply;
pub mod apply_lock;
pub mod build;
pub mod cli;
pub mod connect;
pub mod cycle;
pub mod desired;
pub mod doctor;
pub mod download;
pub mod drift;
pub mod files;
pub mod fleet;
pub mod ids;
pub mod import;
pub mod init;
pub mod inspect;
pub mod limit;
pub mod live;
pub mod lock;
pub mod nixos;
pub mod pin;
pub mod plan;
pub mod plan_json;
pub mod problem;
pub mod record;
pub mod redact;
pub mod render;
pub mod rollout;
pub mod schedule;
pub mod stamp;
pub mod validate;
