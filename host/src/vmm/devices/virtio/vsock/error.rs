//! Why a vsock device could not be created or restored ([`VsockError`]): a reserved guest CID
//! (the device, `mod.rs`), or a host resource the muxer could not set up (`muxer`). A leaf both
//! of them use, so that the muxer needs nothing from the device that owns it.

use std::io;
use std::path::PathBuf;

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// guest CID {0} is reserved (0, 1, 2 and u32::MAX are)
    #[error("guest CID {0} is reserved (0, 1, 2 and u32::MAX are)")]
    ReservedCid(u64),
    /// cannot listen on {path}
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What bind(2) said.
        #[source]
        source: io::Error,
    },
    /// cannot make the listening socket non-blocking
    #[error("cannot make the listening socket non-blocking")]
    Listener(#[source] io::Error),
    /// cannot set up the device's epoll set
    #[error("cannot set up the device's epoll set")]
    Epoll(#[source] io::Error),
    /// cannot create the device's timer
    #[error("cannot create the device's timer")]
    Timer(#[source] io::Error),
}
