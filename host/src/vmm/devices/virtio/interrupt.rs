//! A virtio device's interrupt line ([`Interrupt`]): the eventfd the VMM registers as a KVM
//! irqfd, and the `InterruptStatus` bits the driver reads and acknowledges through the
//! transport. A leaf that the transport, the devices and [`Active`](super::Active) share.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Why an interrupt is raised; the value is the `InterruptStatus` bit it sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum InterruptKind {
    /// The device used buffers in at least one queue (`VIRTIO_MMIO_INT_VRING`).
    Vring = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING,
    /// The configuration space or the device status changed (`VIRTIO_MMIO_INT_CONFIG`).
    Config = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG,
}

/// A device's interrupt line.
///
/// The VMM registers [`Interrupt::irq_evt`] with KVM as an irqfd for the GSI announced to the
/// guest; writing the eventfd then injects the interrupt without leaving the kernel. The
/// `InterruptStatus` register of the transport reads [`Interrupt::status`], and `InterruptACK`
/// clears bits through [`Interrupt::ack`]. It is shared (`Arc`) between the transport, which runs
/// on vCPU threads, and the device, which runs on the VMM event loop, hence the atomic.
#[derive(Debug)]
pub struct Interrupt {
    evt: EventFd,
    status: AtomicU32,
}

impl Interrupt {
    /// A new interrupt line with no bits pending.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            status: AtomicU32::new(0),
        })
    }

    /// The eventfd to register as a KVM irqfd (`VmFd::register_irqfd(evt, gsi)`).
    pub fn irq_evt(&self) -> &EventFd {
        &self.evt
    }

    /// Sets the status bit for `kind` and signals the interrupt.
    pub fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        self.status.fetch_or(kind as u32, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// The pending `InterruptStatus` bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the bits the driver acknowledged.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the pending bits to a saved value and, if any is set, signals the interrupt again
    /// (a spurious virtio interrupt is harmless: the driver reads the status first).
    pub(super) fn restore_status(&self, bits: u32) -> io::Result<()> {
        self.status.store(bits, Ordering::SeqCst);
        if bits != 0 { self.evt.write(1) } else { Ok(()) }
    }

    /// Clears every pending bit (device reset).
    pub(super) fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_sets_acks_and_signals() {
        let irq = Interrupt::new().unwrap();
        assert_eq!(irq.status(), 0);
        irq.trigger(InterruptKind::Vring).unwrap();
        irq.trigger(InterruptKind::Config).unwrap();
        assert_eq!(irq.status(), 3);
        assert_eq!(irq.irq_evt().read().unwrap(), 2);
        irq.ack(InterruptKind::Vring as u32);
        assert_eq!(irq.status(), InterruptKind::Config as u32);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }
}
