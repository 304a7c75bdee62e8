//! A private mount namespace for the calling thread: the monitor assembles its share and its
//! jail in one (`crate::monitor`), and the virtio-fs fuzz target mounts its tmpfs in one.
//! What is mounted there is not seen by the host, nor by anything else, and goes away with the
//! last thread in it.

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};

/// Which step of [`enter`] failed; each carries what the kernel said.
#[derive(Debug, thiserror::Error)]
pub enum MountNsError {
    /// `unshare(CLONE_NEWNS)` failed (no CAP_SYS_ADMIN, or namespaces off).
    #[error("cannot make a mount namespace")]
    Unshare(#[source] nix::Error),
    /// Making every mount private failed: what is mounted here could propagate to the host.
    #[error("cannot make the mounts private")]
    MakePrivate(#[source] nix::Error),
}

/// Moves the calling thread into a new mount namespace (a copy of its current one) whose
/// mounts are all private: mounts made afterwards stay in it, and the host's do not come in.
pub fn enter() -> Result<(), MountNsError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(MountNsError::Unshare)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(MountNsError::MakePrivate)
}
