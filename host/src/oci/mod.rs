//! The OCI side of husk: bundles (config.json and how big a VM it needs) and the state store
//! under `--root`.

pub mod bundle;
pub mod sockets;
pub mod state;
