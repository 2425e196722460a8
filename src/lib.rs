//! nixgold: NixOS golden images and the VMs cloned from them on Proxmox VE,
//! reconciled from one fleet file and a lockfile.
//!
//! The pipeline, one module per word of DESIGN.md: [`fleet`] (what the user
//! wrote) and [`lock`] (what is pinned) give the [`desired`] graph; [`nixos`]
//! renders an image's configuration. The core is synchronous and pure.

pub mod cli;
pub mod desired;
pub mod fleet;
pub mod ids;
pub mod lock;
pub mod nixos;
pub mod problem;
