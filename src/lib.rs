//! nixgold: NixOS golden images and the VMs cloned from them on Proxmox VE,
//! reconciled from one fleet file and a lockfile.

pub mod fleet;
pub mod ids;
pub mod problem;
