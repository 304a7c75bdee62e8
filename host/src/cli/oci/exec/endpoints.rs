//! Where an exec is asked for and where its streams come back ([`Endpoints`]): found once by
//! `exec`, then used by the attached exec, with pipes (`mod.rs`) or a terminal (`tty`). A leaf
//! of its own, so that `tty` needs nothing from the module that calls it.

use anyhow::{Context as _, Result};

use crate::oci::sockets::SocketDir;
use crate::oci::state::Entry;

/// Where an exec is asked for and where its streams come back: the container's monitor
/// socket, and the directory of the VM the container is in, where the VM's vsock device
/// connects the guest's streams (the sandbox's, for a pod's later container: see
/// `crate::oci::pod`).
pub(super) struct Endpoints {
    /// The container's own directory.
    pub(super) own: SocketDir,
    /// Its VM's.
    pub(super) vm: SocketDir,
}

impl Endpoints {
    pub(super) fn of(entry: &Entry) -> Result<Endpoints> {
        let vm_dir = crate::oci::pod::vm_dir(entry.dir())?;
        Ok(Endpoints {
            own: entry.sockets()?,
            vm: SocketDir::open(&vm_dir)
                .with_context(|| format!("opening {}", vm_dir.display()))?,
        })
    }
}
