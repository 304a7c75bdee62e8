//! The OCI side of husk: bundles (config.json and how big a VM it needs), the hooks they name,
//! the state store under `--root` and the sockets there (`sockets`, `ports`), which
//! containers share a VM as a pod (`pod`), and `update`'s resources.

pub mod bundle;
pub mod hooks;
pub mod pod;
pub mod ports;
pub mod resources;
pub mod sockets;
pub mod state;
