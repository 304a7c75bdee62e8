//! Boot-time markers: husk-init writes one byte to an I/O port at defined points of its life;
//! the monitor timestamps each write (a VM exit) with its monotonic clock.
//!
//! Port I/O rather than vsock because the first markers come before any device is usable, and
//! a port write costs one VM exit and nothing else. Another VMM (e.g. QEMU, where nothing
//! decodes this port) ignores the writes.

/// The I/O port the markers are written to (one byte, `outb`). 0x3f0 is the same port
/// Firecracker uses for its boot timer; no device of a husk VM decodes it otherwise.
pub const MARKER_PORT: u16 = 0x03f0;

/// The points husk-init marks, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Marker {
    /// husk-init's `main` was entered: the kernel finished booting.
    InitStarted = 1,
    /// The control connection to the host is up (handshake done).
    HostConnected = 2,
    /// The create request (the spec) arrived.
    SpecReceived = 3,
    /// The container is built and waits for start.
    ContainerCreated = 4,
    /// The container's process was exec'd.
    ProcessStarted = 5,
    /// The container's process exited.
    ProcessExited = 6,
    /// husk-init is done: everything is synced, the VMM may stop the VM at once.
    PowerOff = 0xff,
}

impl Marker {
    /// Every marker, in order.
    pub const ALL: [Marker; 7] = [
        Marker::InitStarted,
        Marker::HostConnected,
        Marker::SpecReceived,
        Marker::ContainerCreated,
        Marker::ProcessStarted,
        Marker::ProcessExited,
        Marker::PowerOff,
    ];

    /// The marker a byte written to [`MARKER_PORT`] stands for.
    pub fn from_byte(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|m| *m as u8 == b)
    }

    /// A short stable name (used in timing reports).
    pub fn name(&self) -> &'static str {
        match self {
            Marker::InitStarted => "init-started",
            Marker::HostConnected => "host-connected",
            Marker::SpecReceived => "spec-received",
            Marker::ContainerCreated => "container-created",
            Marker::ProcessStarted => "process-started",
            Marker::ProcessExited => "process-exited",
            Marker::PowerOff => "power-off",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_marker_decodes_from_its_byte() {
        for m in Marker::ALL {
            assert_eq!(Marker::from_byte(m as u8), Some(m));
        }
        assert_eq!(Marker::from_byte(0), None);
        assert_eq!(Marker::from_byte(0x42), None);
    }
}
