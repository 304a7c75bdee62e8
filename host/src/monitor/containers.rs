//! What the serving loop keeps about the VM's containers besides their state: a pod's
//! containers added to the VM ([`Member`]), and each container's resources against the VM's
//! size ([`Limits`], for `update`).
//!
//! The loop (`serve`) holds them and records the members the guest created; the command
//! handlers (`commands`, which extend the loop's `Monitor`) check and change the limits. They
//! are defined here, below both, so that the loop needs nothing from the handlers.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;

use husk_proto::ContainerRef;

use crate::oci::bundle::VmSize;
use crate::oci::state::Status;

/// A pod's container that was added to the VM.
#[derive(Debug)]
pub(super) struct Member {
    /// Its id, for messages.
    pub(super) id: String,
    /// Where its main process is.
    pub(super) status: Status,
    /// The connection of the process that stands for it on the host: it gets the exit.
    pub(super) waiter: Option<UnixStream>,
}

/// What `update` checks and merges against: the VM's size and the present `linux.resources`
/// of each of its containers.
#[derive(Debug)]
pub(super) struct Limits {
    /// The VM's size.
    pub(super) vm: VmSize,
    /// Each container's resources, as created or last updated.
    pub(super) resources: HashMap<ContainerRef, oci_spec::runtime::LinuxResources>,
}

impl Limits {
    /// The limits of a VM of `vm` whose own container has the spec `config_json`.
    pub(super) fn new(vm: VmSize, config_json: &[u8]) -> Limits {
        let mut limits = Limits {
            vm,
            resources: HashMap::new(),
        };
        limits.add(ContainerRef::FIRST, config_json);
        limits
    }

    /// Records the resources of container `c`, from its spec.
    pub(super) fn add(&mut self, c: ContainerRef, config_json: &[u8]) {
        let resources = serde_json::from_slice::<oci_spec::runtime::Spec>(config_json)
            .ok()
            .and_then(|s| s.linux().as_ref().and_then(|l| l.resources().clone()))
            .unwrap_or_default();
        self.resources.insert(c, resources);
    }
}
