//! The [`Persist`] trait: how a device (or the virtio-mmio transport) saves its state and is
//! built again from it. The model is Firecracker's trait of the same name.
//!
//! Each device implements it next to its code and defines its saved state there; the snapshot
//! (`vmm::persist`) only gathers those states into a VM's. The trait lives here, below the
//! devices, and not with the snapshot, so that a device depends on nothing above it.

/// Something that saves its state and can be built again from it.
pub trait Persist: Sized {
    /// What is saved: plain data, checked again when restored.
    type State;
    /// What restoring needs besides the state: the host resources of the new VM (guest
    /// memory, sockets, the shared directory, the tap).
    type ConstructorArgs;
    /// Why a restore was refused.
    type Error;

    /// The state, as of now. The VM must be paused.
    fn save(&self) -> Self::State;

    /// A new `Self` in the saved state, on the new host resources.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
