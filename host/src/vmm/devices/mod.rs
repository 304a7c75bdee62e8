//! Device models and the buses that route guest port I/O and MMIO accesses to them.

pub mod virtio;

/// A device on the port-I/O or MMIO bus. `offset` is relative to the start of the range the
/// device was registered at. Accesses the device does not implement read as zeros and are
/// otherwise ignored: a guest must never be able to crash the monitor through a register.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes (1, 2, 4 or 8).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}
