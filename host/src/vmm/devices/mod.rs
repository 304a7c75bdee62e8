//! Device models, the buses that route guest port I/O and MMIO accesses to them, and the
//! [`Persist`](persist::Persist) trait by which each saves and restores itself.

pub mod bus;
pub mod legacy;
pub mod persist;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// A device on the port-I/O or MMIO bus. `offset` is relative to the start of the range the
/// device was registered at. Accesses the device does not implement read as zeros and are
/// otherwise ignored: a guest must never be able to crash the monitor through a register.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes (1, 2, 4 or 8).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A vm-superio trigger that writes an eventfd (an irqfd for interrupts, or an event the VMM
/// waits on).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    /// A new non-blocking eventfd.
    pub fn new() -> std::io::Result<EventFdTrigger> {
        EventFd::new(libc::EFD_NONBLOCK).map(EventFdTrigger)
    }

    /// Another handle to the same eventfd.
    pub fn try_clone(&self) -> std::io::Result<EventFdTrigger> {
        self.0.try_clone().map(EventFdTrigger)
    }
}
