//! virtio-vsock (device id 19), bridged to host Unix sockets the way Firecracker does it.
//!
//! # Host side
//!
//! - **Host-initiated**: the device listens on the Unix socket `uds_path`. A host client
//!   connects and writes `CONNECT <port>\n`; the device allocates a local port `L` (from 2^30
//!   up), sends the guest a REQUEST from `HOST_CID:L` to `guest_cid:port`, and when the guest
//!   answers with RESPONSE writes `OK L\n` to the client. From then on bytes flow both ways. A
//!   guest RST (nothing listens on `port`), or no answer within 2 s, closes the client's socket.
//! - **Guest-initiated**: the guest connects to `HOST_CID:P`; the device connects to the Unix
//!   socket `<uds_path>_P` and answers RESPONSE, or RST if nothing accepts there.
//!
//! # Why one internal epoll
//!
//! The device has many fds: three queue eventfds, the listener, a timer and one socket per
//! connection, and the set changes as connections come and go. Rather than have the VMM's event
//! loop track all of them, the device keeps its own epoll set and exposes a single fd
//! ([`Vsock::epoll_fd`]): the VMM polls that one fd for readability and calls
//! [`Vsock::process_events`], which takes what is ready without blocking (the inner epoll is
//! level-triggered, so anything it leaves for later is reported again).
//!
//! # Credit (virtio 1.1 §5.10.6.3)
//!
//! Each side tells the other, in every packet header, its receive buffer size (`buf_alloc`) and
//! how many bytes it has consumed (`fwd_cnt`). A sender may have at most
//! `buf_alloc - (sent - fwd_cnt)` bytes in flight.
//!
//! - Host to guest: the device reads a host socket only while the guest has credit, and never
//!   more than that credit per packet. With no credit it stops polling the socket (the data
//!   waits in the kernel's socket buffer, pushing back on the host writer) until a guest packet
//!   brings a larger `fwd_cnt` (Linux sends CREDIT_UPDATE as its reader drains).
//! - Guest to host: the device advertises `buf_alloc` = 256 KiB and counts in `fwd_cnt` only
//!   what the host socket actually accepted. It sends CREDIT_UPDATE when the guest's view of our
//!   free space falls below 64 KiB while we have forwarded more, and answers CREDIT_REQUEST.
//!
//! # The buffering bound
//!
//! Guest data the host socket does not take at once goes to a per-connection buffer of at most
//! 256 KiB, the same 256 KiB advertised as `buf_alloc`. Because `fwd_cnt` only advances when the
//! host takes data, a guest that respects its credit can never have more than that buffered; so
//! the device always consumes TX descriptors (no head-of-line blocking of the shared TX queue
//! behind one slow host reader), and a guest that sends beyond its credit is misbehaving: that
//! connection is reset with RST rather than buffered further.
//!
//! The other queue-bound growth is RSTs answering packets for unknown connections: at most 256
//! wait for RX buffers; at that bound the device stops taking TX packets until the guest
//! supplies RX buffers.
//!
//! # Closing
//!
//! - Guest SHUTDOWN(SEND): once buffered guest data is flushed, the host socket's write side is
//!   shut, so the host reads EOF. SHUTDOWN(RCV): its read side is shut, so host writes fail with
//!   EPIPE. Both: after the flush the guest gets the RST Linux waits for, and the host socket
//!   is closed. Guest RST: the host socket is closed at once.
//! - Host EOF (the client shut its write side): SHUTDOWN(SEND) to the guest, which still may
//!   send. Host socket hung up entirely: SHUTDOWN(RCV|SEND), and the device forgets the
//!   connection at once; whatever the guest sends on it later is answered with RST. There is
//!   no kill timer waiting for the guest's RST (Firecracker has one): Linux only sends that RST
//!   once its reader drained the data, and resetting on a timer would discard data a slow guest
//!   has not read yet.
//!
//! # Guest mistakes
//!
//! Malformed TX chains (header shorter than 44 bytes, write-only buffers, lengths beyond the
//! buffer or 64 KiB, addresses outside guest memory), wrong CIDs, unknown socket types or ops
//! are logged (rate limited) and dropped, and the descriptor is returned to the guest. RX chains
//! the device cannot write a header into are returned with length 0.
//!
//! Writing to a host socket whose reader has gone raises `SIGPIPE`; Rust binaries ignore it
//! (the runtime sets `SIG_IGN` before `main`), so the write fails with `EPIPE` and the
//! connection is reset.

mod connection;
mod defs;
mod error;
mod muxer;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EpollEvent;

use self::defs::{EVQ, HDR_LEN, MAX_PKT_DATA, QUEUE_SIZE, RXQ, TXQ};
pub use self::error::VsockError;
use self::muxer::{Muxer, TOKEN_QUEUE_BASE};
use super::{
    ActivateError, Active, DeviceQueue, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, guest_log,
};
use crate::vmm::devices::persist::Persist;

/// Queue max sizes: rx, tx, event.
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// Whether `token` is one of the queue notifications' (whether or not the device is active).
fn is_queue_token(token: u64) -> bool {
    (TOKEN_QUEUE_BASE..TOKEN_QUEUE_BASE + QUEUE_SIZES.len() as u64).contains(&token)
}

/// The vsock device. See the module docs.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    muxer: Muxer,
    active: Option<Active>,
    /// Restored from a snapshot: the guest's connections were to another VMM and are gone;
    /// the guest must be told (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`) before anything else.
    reset_pending: bool,
}

/// What a snapshot keeps of the device: its CID. Connections do not survive a snapshot (their
/// host ends belong to the VMM that saved it); the restored device sends the guest a transport
/// reset, as Firecracker's does, and the guest's sockets see `ECONNRESET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub guest_cid: u64,
}

impl Persist for Vsock {
    type State = VsockState;
    /// The new VM's host-side socket.
    type ConstructorArgs = PathBuf;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
        }
    }

    fn restore(uds_path: PathBuf, state: &VsockState) -> Result<Self, VsockError> {
        let mut vsock = Vsock::new(state.guest_cid, &uds_path)?;
        vsock.reset_pending = true;
        Ok(vsock)
    }
}

impl Vsock {
    /// A vsock device for a guest with CID `guest_cid`, listening for host clients on the Unix
    /// socket `uds_path` (which must not exist yet; it is removed when the device is dropped).
    /// Guest connections to host port P go to `<uds_path>_P`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if guest_cid <= u64::from(husk_proto::HOST_CID) || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid(guest_cid));
        }
        Ok(Self {
            guest_cid,
            acked_features: 0,
            muxer: Muxer::new(guest_cid, uds_path)?,
            active: None,
            reset_pending: false,
        })
    }

    /// The fd the VMM polls (for `EPOLLIN`); call [`Vsock::process_events`] when it is readable.
    pub fn epoll_fd(&self) -> RawFd {
        self.muxer.epoll().as_raw_fd()
    }

    /// Handles everything that is ready, without blocking: queue notifications, host
    /// connections, timeouts; then moves packets between the queues and the host sockets and
    /// interrupts the guest if it used any buffer.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let ready = match self.muxer.epoll().wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                eprintln!("virtio-vsock: epoll_wait: {e}");
                0
            }
        };
        for event in &events[..ready] {
            let token = event.data();
            // A queue notification is cleared; the queues are processed below either way.
            let queue = self
                .active
                .as_ref()
                .and_then(|active| active.clear_notification(token));
            if queue.is_none() && !is_queue_token(token) {
                self.muxer.handle_event(token, event.event_set());
            }
        }
        self.process_queues();
    }

    /// Alternates TX and RX until neither makes progress: answering TX can queue RX packets,
    /// and draining RX can lift the TX pause.
    fn process_queues(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        if self.reset_pending && send_transport_reset(active) {
            self.reset_pending = false;
        }
        let mut used = false;
        loop {
            let tx = process_tx(active, &mut self.muxer);
            let rx = process_rx(active, &mut self.muxer);
            used |= tx || rx;
            if !tx && !rx {
                break;
            }
        }
        if used {
            active.notify_used(&[RXQ, TXQ], "virtio-vsock");
        }
    }

    #[cfg(test)]
    fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }
}

/// Puts `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (`struct virtio_vsock_event { le32 id; }`, id 0)
/// into the guest's next event buffer. Returns whether it was sent (false while the guest has
/// no event buffer: Linux posts them when the driver starts, so it comes later).
fn send_transport_reset(active: &mut Active) -> bool {
    const TRANSPORT_RESET: u32 = 0;
    let mem = &active.mem;
    let queue = &mut active.queues[EVQ];
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return false;
    };
    let head = chain.head_index();
    let written = chain
        .writable()
        .next()
        .filter(|d| d.len() >= 4)
        .and_then(|d| mem.write_obj(TRANSPORT_RESET.to_le(), d.addr()).ok())
        .map_or(0, |()| 4);
    if written == 0 {
        guest_log!("virtio-vsock: event buffer {head} cannot hold an event; transport reset lost");
    }
    if let Err(e) = queue.add_used(mem, head, written) {
        guest_log!("virtio-vsock: cannot return event descriptor {head}: {e}");
    }
    active.notify_used(&[EVQ], "virtio-vsock");
    true
}

/// Takes every TX packet (unless the RST backlog is full); returns whether any was used.
fn process_tx(active: &mut Active, muxer: &mut Muxer) -> bool {
    let mem = &active.mem;
    let queue = &mut active.queues[TXQ];
    let mut used = false;
    while !muxer.rx_backlog_full() {
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(pkt) => muxer.handle_tx(&pkt),
            Err(e) => guest_log!("virtio-vsock: dropping malformed TX packet: {e}"),
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            guest_log!("virtio-vsock: cannot return TX descriptor {head}: {e}");
        }
        used = true;
    }
    used
}

/// Fills RX buffers while packets wait; returns whether any buffer was used.
fn process_rx(active: &mut Active, muxer: &mut Muxer) -> bool {
    let mem = &active.mem;
    let queue = &mut active.queues[RXQ];
    let mut used = false;
    while muxer.has_rx() {
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(mut pkt) => match muxer.fill_rx(&mut pkt) {
                Some(data_len) => HDR_LEN + data_len,
                None => {
                    // Nothing was ready after all: leave the buffer for the next packet.
                    queue.go_to_previous_position();
                    break;
                }
            },
            Err(e) => {
                guest_log!("virtio-vsock: dropping malformed RX buffer: {e}");
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, len) {
            guest_log!("virtio-vsock: cannot return RX descriptor {head}: {e}");
        }
        used = true;
    }
    used
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    /// `struct virtio_vsock_config { le64 guest_cid; }`
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space("virtio-vsock", &self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        super::refuse_config_write("virtio-vsock", offset, data);
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
        let epoll = self.muxer.epoll();
        let want = QUEUE_SIZES.len();
        // Packets that already wait (host clients that connected before the driver came up)
        // go out when the driver kicks the RX queue after filling it, on the event loop.
        let active = Active::new(epoll, TOKEN_QUEUE_BASE, want, mem, interrupt, queues)?;
        if self.reset_pending {
            // Brings the event loop here, to send the transport reset.
            let _ = active.renotify(EVQ);
        }
        self.active = Some(active);
        Ok(())
    }

    fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
        self.acked_features = 0;
    }
}
