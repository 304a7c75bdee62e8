//! The OCI side of husk: bundles (config.json and how big a VM it needs), the hooks they name,
//! and the state store under `--root`.

pub mod bundle;
pub mod hooks;
pub mod pod;
pub mod ports;
pub mod sockets;
pub mod state;
