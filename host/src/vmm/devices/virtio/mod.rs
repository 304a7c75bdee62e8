//! virtio devices over the virtio-mmio transport.
//!
//! The split is the one Firecracker and Cloud Hypervisor use:
//!
//! - a device model ([`VirtioDevice`]) knows its queues, features and configuration space, and
//!   once activated does its work from the VMM event loop;
//! - the transport ([`mmio::MmioTransport`]) is the register file the guest driver programs. It
//!   owns the queue configuration until the driver sets `DRIVER_OK`, then hands the device a copy
//!   of every queue together with that queue's notification `EventFd` ([`DeviceQueue`],
//!   `active`, which also holds what a device keeps while it runs);
//! - an [`Interrupt`] (`interrupt`) is the device's way back to the guest: an `EventFd` the VMM
//!   registers as a KVM irqfd for the device's GSI, plus the `InterruptStatus` bits the driver
//!   reads and acks.
//!
//! Nothing a guest writes may crash the monitor: every guest mistake is logged through
//! [`guest_log!`] (rate limited, so a guest cannot flood the log either) and then ignored, or
//! answered with `DEVICE_NEEDS_RESET` where the spec asks for it.

mod active;
pub mod fs;
mod interrupt;
pub mod mmio;
pub mod net;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

pub use active::{ActivateError, Active, DeviceQueue};
pub use interrupt::{Interrupt, InterruptKind};

/// `VIRTIO_F_VERSION_1`: the device is a modern (virtio 1.x) device. The transport refuses
/// drivers that do not accept it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// A virtio device model, driven by a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (`VIRTIO_ID_*`, e.g. 19 for vsock).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; the length is the number of queues. Every size must be a
    /// power of two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers.
    fn avail_features(&self) -> u64;

    /// The features the driver accepted, a subset of [`VirtioDevice::avail_features`] that
    /// includes `VIRTIO_F_VERSION_1` (the transport checks both). Called once per
    /// initialisation, when the driver sets `FEATURES_OK`.
    fn ack_features(&mut self, features: u64);

    /// A read of the device-specific configuration space. `data` arrives zeroed; bytes beyond the
    /// configuration space stay zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// A write to the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device: from now on it owns the queues and signals `interrupt`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<DeviceQueue>,
    ) -> Result<(), ActivateError>;

    /// Stops the device and returns it to its pre-activation state (the driver wrote 0 to the
    /// status register). The device must drop its queues and stop signalling.
    fn reset(&mut self);

    /// The queues as the device has advanced them, while it is active (what a snapshot of
    /// the transport saves: the transport's own copies stop at activation).
    fn active(&self) -> Option<&Active>;

    /// Whether the device gave up on the driver (a malformed request it cannot work around)
    /// and needs a reset: the transport then reports `DEVICE_NEEDS_RESET` in the status
    /// register.
    fn needs_reset(&self) -> bool {
        false
    }
}

/// A device shared between its transport (vCPU threads) and the VMM event loop.
pub type SharedDevice = Arc<Mutex<dyn VirtioDevice>>;

/// Logs something a guest caused, rate limited: at most [`LOG_BURST`] lines per second, with a
/// count of what was dropped once the window passes. Use through [`guest_log!`].
pub(crate) fn log_guest_event(args: fmt::Arguments<'_>) {
    static LIMITER: Mutex<LogWindow> = Mutex::new(LogWindow {
        start: None,
        lines: 0,
        dropped: 0,
    });
    let mut window = LIMITER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = Instant::now();
    if window
        .start
        .is_none_or(|start| now.duration_since(start) >= LOG_WINDOW)
    {
        if window.dropped > 0 {
            eprintln!(
                "virtio: {} guest-triggered log lines suppressed",
                window.dropped
            );
        }
        *window = LogWindow {
            start: Some(now),
            lines: 0,
            dropped: 0,
        };
    }
    if window.lines < LOG_BURST {
        window.lines += 1;
        eprintln!("{args}");
    } else {
        window.dropped += 1;
    }
}

/// Lines [`log_guest_event`] lets through per [`LOG_WINDOW`].
const LOG_BURST: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(1);

struct LogWindow {
    start: Option<Instant>,
    lines: u32,
    dropped: u64,
}

/// `eprintln!` for guest-triggerable events, rate limited (see [`log_guest_event`]). The message
/// starts with the component (`virtio-mmio:`, `virtio-vsock:`).
macro_rules! guest_log {
    ($($arg:tt)*) => {
        $crate::vmm::devices::virtio::log_guest_event(format_args!($($arg)*))
    };
}
pub(crate) use guest_log;

/// Serves a guest read of a read-only config space; reads beyond it are logged and ignored
/// (`data` stays as the transport zeroed it).
pub fn read_config_space(device: &str, config: &[u8], offset: u64, data: &mut [u8]) {
    let range = usize::try_from(offset)
        .ok()
        .and_then(|start| Some(start..start.checked_add(data.len())?))
        .and_then(|range| config.get(range));
    match range {
        Some(bytes) => data.copy_from_slice(bytes),
        None => guest_log!(
            "{device}: config read of {} bytes at {offset:#x} beyond the config space",
            data.len()
        ),
    }
}

/// Logs (and otherwise ignores) a guest write to a read-only config space.
pub fn refuse_config_write(device: &str, offset: u64, data: &[u8]) {
    guest_log!(
        "{device}: {}-byte write to the read-only config space at {offset:#x}",
        data.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_log_is_rate_limited_without_panicking() {
        for i in 0..(LOG_BURST * 3) {
            guest_log!("virtio-test: line {i}");
        }
    }
}
