//! Why a pod's later container could not be created: the one error type of the member's
//! steps (`super` and `place`), each variant naming what was wrong and where.

use std::path::PathBuf;

use crate::monitor::console::ConsoleError;
use crate::oci::bundle::BundleError;
use crate::oci::pod::PodError;
use crate::oci::state::StateError;

/// Why a pod's container could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The bundle is invalid.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The sandbox is not there or does not run.
    #[error(transparent)]
    Pod(#[from] PodError),
    /// The sandbox's state could not be read.
    #[error("the pod's sandbox {id}: {source}")]
    Sandbox {
        /// Its id.
        id: String,
        /// Why.
        #[source]
        source: StateError,
    },
    /// The `prestart`/`createRuntime` hooks (run by `husk create`) failed or did not run.
    #[error(transparent)]
    CreateHooks(Box<crate::monitor::MonitorError>),
    /// A file or directory could not be read, made or opened.
    #[error("{what} {path}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A mount of the spec's could not be idmapped for the sandbox's `--monitor-uid`.
    #[error(
        "{path} cannot be idmapped for the sandbox's unprivileged monitor (its filesystem does not support idmapped mounts; run the pod with --monitor-uid root): {error}"
    )]
    NotIdmappable {
        /// The mount's source.
        path: PathBuf,
        /// What the kernel said.
        error: std::io::Error,
    },
    /// The engine's overlay rootfs cannot be mounted anew on idmapped layers.
    #[error(transparent)]
    Overlay(#[from] crate::monitor::overlay::OverlayError),
    /// A bind mount of the spec has no source.
    #[error("config.json: mount {index} ({}): a bind mount needs a source", destination.display())]
    NoSource {
        /// Its index.
        index: u32,
        /// Its destination.
        destination: PathBuf,
    },
    /// The files could not be attached in the sandbox monitor's namespace.
    #[error("attaching the container's files to the pod's share: {0}")]
    Attach(String),
    /// The terminal.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// `process.terminal` without a console socket.
    #[error("config.json: process.terminal is true but no --console-socket was given")]
    NoConsoleSocket,
    /// The state could not be written.
    #[error(transparent)]
    State(#[from] StateError),
    /// The member's host cgroup (its `cgroupsPath`).
    #[error(transparent)]
    Cgroup(#[from] crate::monitor::cgroup::CgroupError),
    /// The container's limits do not fit in the pod's VM.
    #[error(
        "config.json: linux.resources: {0}; the pod's VM is sized by its sandbox (see the README's pods section) and does not grow"
    )]
    DoesNotFit(String),
    /// The sandbox's monitor refused or did not answer.
    #[error("the pod's sandbox's monitor: {0}")]
    Monitor(String),
}
