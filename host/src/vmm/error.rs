//! Why a VM could not be built, started or restored ([`VmError`]), and the helpers that turn a
//! failed call into one. A leaf of the VMM: the builder, the device manager and the running VM
//! all return it, so it is not in `vmm/mod.rs`, which uses them.

use super::arch::{boot, mptable, regs};
use super::persist::SnapshotError;
use super::vstate::memory;

/// Errors building or starting a VM (bad input names what was wrong).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` missing or not accessible.
    #[error("cannot open /dev/kvm: {0} (is KVM available and do you have access to it?)")]
    Kvm(kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("{what}: {source}")]
    KvmCall {
        /// Which call.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// The configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Loading the kernel/initramfs.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// vCPU setup.
    #[error(transparent)]
    Cpu(#[from] regs::CpuSetupError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Device setup.
    #[error("setting up devices: {0}")]
    Devices(String),
    /// Saving or restoring a snapshot.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Threads, eventfds, signals.
    #[error("{what}: {source}")]
    Os {
        /// What.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// A failed KVM call `what`, as a [`VmError`].
pub(super) fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

/// A failed OS call `what` (threads, eventfds, signals), as a [`VmError`].
pub(super) fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Os { what, source }
}

/// A snapshot whose saved parts do not match the VM being restored (`what`).
pub(super) fn mismatch(what: &str) -> VmError {
    VmError::Snapshot(SnapshotError::Restore(format!(
        "the saved devices do not match the VM's: {what}"
    )))
}
