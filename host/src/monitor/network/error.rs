//! Why the container's network could not be set up or torn down ([`NetworkError`]). A leaf:
//! the setup (`mod.rs`), the namespace handling (`netns`) and the record and its undoing
//! (`record`) all fail with it, and `mod.rs` uses the other two, so it is defined below all
//! three.

use std::io;
use std::path::PathBuf;

use crate::vmm::devices::virtio::net::TapError;

/// Why the network could not be set up or torn down.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The namespace's file (the spec's path, or this thread's) could not be opened: gone, or
    /// not a namespace.
    #[error("cannot open the network namespace {path}")]
    OpenNamespace {
        /// The spec's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `setns` into the namespace failed.
    #[error("cannot enter the network namespace {path}")]
    Enter {
        /// The spec's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// An rtnetlink request in the namespace failed.
    #[error("in the network namespace {path}: {what}")]
    Netlink {
        /// The spec's path.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The namespace already has one of husk's taps: two VMs cannot share its interfaces.
    #[error("the network namespace {path} already has a husk tap ({tap}): another VM uses it")]
    Busy {
        /// The spec's path.
        path: PathBuf,
        /// The tap found.
        tap: String,
    },
    /// A tap for the VM could not be created beside an interface.
    #[error("in the network namespace {path}: creating the tap")]
    Tap {
        /// The spec's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: TapError,
    },
    /// The namespace has more interfaces than a VM has virtio-net devices.
    #[error("the network namespace {path} has {count} interfaces; a VM takes at most {max}")]
    TooMany {
        /// The spec's path.
        path: PathBuf,
        /// Interfaces found.
        count: usize,
        /// The VM's limit.
        max: usize,
    },
    /// The record of what was changed ([`RECORD_FILE`](super::RECORD_FILE)) could not be
    /// written, read or parsed.
    #[error("cannot write or read the network record {path}")]
    Record {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The short-lived thread that entered the namespace panicked.
    #[error("the thread that entered the network namespace died")]
    Thread,
    /// `unshare(CLONE_NEWNET)` failed for the monitor's own namespace.
    #[error("cannot create the container's network namespace")]
    Unshare {
        /// Why.
        #[source]
        source: nix::Error,
    },
}
