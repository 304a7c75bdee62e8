//! virtio-net (device id 1) over a tap device: the guest's Ethernet frames go to the tap and
//! the tap's frames come to the guest. The monitor puts the tap into the container's network
//! namespace and joins it to the engine's veth with tc redirects (`monitor/network`); this
//! module only moves frames.
//!
//! # What the device offers
//!
//! - Queues: 0 receive, 1 transmit, 256 entries each. No control queue, no multiqueue.
//! - Features: `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC` (the veth's MAC, so the engine's
//!   bridge and ARP tables see the address they expect), `VIRTIO_NET_F_MTU` (the veth's MTU)
//!   and `VIRTIO_NET_F_STATUS` (link always up).
//! - Offloads: checksums and TCP segmentation both ways (`CSUM`, `GUEST_CSUM`,
//!   `HOST_TSO4/6`, `GUEST_TSO4/6`), passed straight through to the tap, which takes the same
//!   virtio-net header: a TCP stream moves in frames of up to 64 KiB instead of MTU-sized ones,
//!   so the guest and the VMM thread handle a fraction of the packets (the tc mirred redirects
//!   carry GSO packets as they are). When the driver has negotiated its features, the device
//!   sets the tap's offloads (`TUNSETOFFLOAD`) to what the driver can receive, on the VMM
//!   thread before the next read. Every header is checked against the negotiated features both
//!   ways; frames asking for more are dropped. Not offered: UFO and ECN segmentation,
//!   `MRG_RXBUF` (so with `GUEST_TSO*` Linux posts 64 KiB "big" receive buffers and each frame
//!   fits one chain; `num_buffers` is always 1), `CTRL_VQ`, multiqueue.
//! - Configuration space (`struct virtio_net_config`): `mac`, `status` = `LINK_UP`,
//!   `max_virtqueue_pairs` = 1, `mtu`. Read-only.
//!
//! # The data path
//!
//! The device keeps its own epoll set (the same shape as the vsock and fs devices): the two
//! queue notifications, the tap fd (edge-triggered, readable and writable) and a "more work"
//! eventfd. The VMM polls [`Net::epoll_fd`] and calls [`Net::process_events`], which moves
//! frames both ways until it would block:
//!
//! - **Transmit**: each TX chain (device-readable buffers: the 12-byte header, then the
//!   frame) is copied into a host buffer and written to the tap as one frame. The chain goes
//!   back to the guest at once. If the tap answers `EAGAIN` the frame stays in the device
//!   (one frame at most) and TX stops until the tap is writable again.
//! - **Receive**: frames are read from the tap into a host buffer and copied into the next RX
//!   chain (device-writable buffers). With no RX buffer available the frame stays in the
//!   device (one frame at most) and the tap is not read again until the guest adds buffers
//!   (its RX notification): the kernel's tap queue, bounded by its `txqueuelen`, holds the
//!   rest and drops beyond it, as a full NIC ring would.
//!
//! So the device never buffers more than one frame per direction. At most
//! [`MAX_FRAMES_PER_CALL`] frames move per direction per call; when more wait the device
//! signals its own eventfd so the event loop comes back after its other work (the vsock
//! control channel shares the thread).
//!
//! # Guest mistakes
//!
//! A malformed chain (a TX chain with a device-writable buffer or more than
//! [`MAX_FRAME_LEN`] bytes or less than a header, an RX chain with a device-readable buffer or
//! no room for a header, a buffer outside guest memory) marks the device broken: one log
//! line, the device stops touching its queues, raises a configuration interrupt and reports
//! `DEVICE_NEEDS_RESET` until the driver resets it. Frames the device cannot use (a TX
//! header asking for offloads that were not negotiated, a frame shorter than an Ethernet
//! header, a received frame larger than the guest's buffer) are dropped and counted, with a
//! rate-limited log line.
//!
//! # The files
//!
//! This one holds the device: its configuration, its epoll set, the virtio transport's
//! calls ([`VirtioDevice`]) and snapshots ([`NetState`]). `datapath` moves the frames (the
//! data path above), `chain` copies them between descriptor chains and host buffers, `frame`
//! says what a frame and its virtio-net header may be under the negotiated features, and
//! `tap` is the host side.

mod chain;
mod datapath;
mod frame;
mod tap;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub use self::frame::MAX_FRAME_LEN;
use self::frame::{OFFLOAD_FEATURES, bit};
pub use self::tap::{Tap, TapError, VNET_HDR_LEN};
use super::{ActivateError, Active, DeviceQueue, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::vmm::devices::persist::Persist;

/// The receive queue.
const RXQ: usize = 0;
/// The transmit queue.
const TXQ: usize = 1;
/// Queue max sizes.
const QUEUE_SIZES: [u16; 2] = [256; 2];

/// Frames moved per direction per [`Net::process_events`] call.
pub const MAX_FRAMES_PER_CALL: usize = 64;

/// `struct virtio_net_config`: mac (6), status (2), max_virtqueue_pairs (2), mtu (2).
const CONFIG_LEN: usize = 12;

/// Tokens in the device's epoll set.
const TOKEN_RXQ: u64 = 0;
const TOKEN_TXQ: u64 = 1;
const TOKEN_TAP: u64 = 2;
const TOKEN_MORE: u64 = 3;

/// Why a virtio-net device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// the MTU {0} is outside 68..=65535
    #[error("the MTU {0} is outside 68..=65535")]
    Mtu(u32),
    /// {0:02x?} is not a unicast MAC address
    #[error("{0:02x?} is not a unicast MAC address")]
    Mac([u8; 6]),
    /// cannot set up the device's epoll set
    #[error("cannot set up the device's epoll set")]
    Epoll(#[source] io::Error),
}

/// Frame and byte counters, readable from any thread.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames written to the tap.
    pub tx_frames: AtomicU64,
    /// Their bytes (header excluded).
    pub tx_bytes: AtomicU64,
    /// Guest frames dropped (see the module docs).
    pub tx_dropped: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Their bytes (header excluded).
    pub rx_bytes: AtomicU64,
    /// Tap frames dropped.
    pub rx_dropped: AtomicU64,
}

/// The virtio-net device. See the module docs.
#[derive(Debug)]
pub struct Net {
    config: [u8; CONFIG_LEN],
    /// Where frames go; `None` for a device with no backend (a snapshot's spare NIC that this
    /// VM does not use): what the guest sends is dropped, nothing ever arrives.
    tap: Option<Tap>,
    epoll: Epoll,
    more: EventFd,
    acked_features: u64,
    active: Option<Active>,
    /// A frame read from the tap that waits for an RX buffer: `rx_buf[..rx_len]`.
    rx_buf: Vec<u8>,
    rx_len: usize,
    /// A guest frame the tap did not take yet: `tx_buf[..tx_len]`.
    tx_buf: Vec<u8>,
    tx_len: usize,
    /// The driver sent a malformed chain; nothing moves until it resets the device.
    broken: bool,
    /// The tap's offloads must be set to what the driver negotiated before the next read.
    offload_pending: bool,
    metrics: Arc<NetMetrics>,
}

impl Net {
    /// A device with MAC `mac` and MTU `mtu` whose frames go through `tap`.
    pub fn new(tap: Tap, mac: [u8; 6], mtu: u32) -> Result<Self, NetError> {
        Self::with_backend(Some(tap), mac, mtu)
    }

    /// A device with no backend: see [`Net::tap`](Self).
    pub fn unattached(mac: [u8; 6], mtu: u32) -> Result<Self, NetError> {
        Self::with_backend(None, mac, mtu)
    }

    fn with_backend(tap: Option<Tap>, mac: [u8; 6], mtu: u32) -> Result<Self, NetError> {
        let mtu16 = u16::try_from(mtu)
            .ok()
            .filter(|&m| m >= 68)
            .ok_or(NetError::Mtu(mtu))?;
        // Multicast bit set, or all zeroes: not an address a NIC can have.
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::Mac(mac));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        let link_up = u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1);
        config[6..8].copy_from_slice(&link_up.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&mtu16.to_le_bytes());
        let epoll = Epoll::new().map_err(NetError::Epoll)?;
        let more = EventFd::new(EFD_NONBLOCK).map_err(NetError::Epoll)?;
        if let Some(tap) = &tap {
            epoll
                .ctl(
                    ControlOperation::Add,
                    tap.as_raw_fd(),
                    EpollEvent::new(
                        EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                        TOKEN_TAP,
                    ),
                )
                .map_err(NetError::Epoll)?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                more.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_MORE),
            )
            .map_err(NetError::Epoll)?;
        Ok(Self {
            config,
            tap,
            epoll,
            more,
            acked_features: 0,
            active: None,
            rx_buf: vec![0; MAX_FRAME_LEN],
            rx_len: 0,
            tx_buf: vec![0; MAX_FRAME_LEN],
            tx_len: 0,
            broken: false,
            offload_pending: false,
            metrics: Arc::new(NetMetrics::default()),
        })
    }

    /// The device's counters (nothing reports them yet but the tests).
    #[cfg(test)]
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// The fd the VMM polls (for `EPOLLIN`); call [`Net::process_events`] when it is readable.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Moves frames both ways until the tap or the guest's buffers would block (or the
    /// per-call budget runs out), then interrupts the guest if it used any buffer.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 4];
        let ready = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                eprintln!("virtio-net: epoll_wait: {e}");
                0
            }
        };
        for event in &events[..ready] {
            // Clear the level-triggered eventfds; every direction is looked at below anyway.
            match event.data() {
                TOKEN_MORE => {
                    let _ = self.more.read();
                }
                token @ (TOKEN_RXQ | TOKEN_TXQ) => {
                    if let Some(active) = &self.active {
                        active.clear_notification(token);
                    }
                }
                _ => {}
            }
        }
        self.process_queues();
    }
}

/// What a snapshot keeps of the device: the MAC and MTU the guest's driver read when it
/// started. The restored device gets the new VM's (the guest is told the new MAC and MTU
/// through its network configuration, not through the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC address in the configuration space when saved.
    pub mac: [u8; 6],
    /// The MTU announced.
    pub mtu: u16,
}

impl Persist for Net {
    type State = NetState;
    /// The new VM's tap (or none), MAC and MTU.
    type ConstructorArgs = (Option<Tap>, [u8; 6], u32);
    type Error = NetError;

    fn save(&self) -> NetState {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[..6]);
        NetState {
            mac,
            mtu: u16::from_le_bytes([self.config[10], self.config[11]]),
        }
    }

    fn restore((tap, mac, mtu): Self::ConstructorArgs, _: &NetState) -> Result<Self, NetError> {
        Self::with_backend(tap, mac, mtu)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_MTU)
            | bit(VIRTIO_NET_F_STATUS)
            | OFFLOAD_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space("virtio-net", &self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR-less legacy devices; ours is
        // a modern device without it, so the whole space is read-only.
        super::refuse_config_write("virtio-net", offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<DeviceQueue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        // Queue i's notification has token i: TOKEN_RXQ, TOKEN_TXQ.
        let want = QUEUE_SIZES.len();
        self.active = Some(Active::new(
            &self.epoll,
            TOKEN_RXQ,
            want,
            mem,
            interrupt,
            queues,
        )?);
        // The tap learns the negotiated offloads on the VMM thread, before its next read.
        self.offload_pending = true;
        // Frames that arrived on the tap before the driver came up are read on the next call
        // (the guest's first RX notification).
        Ok(())
    }

    fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.broken = false;
        self.rx_len = 0;
        self.tx_len = 0;
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }
}
