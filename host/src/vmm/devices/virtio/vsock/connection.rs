//! One vsock stream bridged to one host Unix socket: its state machine, credit accounting and
//! the bounded buffer for guest data the host has not taken yet.
//!
//! The connection never blocks and never touches the queues itself. The muxer feeds it the
//! guest's packets ([`Connection::recv_guest`]) and the host socket's readiness
//! ([`Connection::notify`]); the connection records what it owes the guest as `pending` bits and
//! writes those packets when the muxer hands it an RX buffer ([`Connection::fill_rx`]). The
//! muxer then asks it which socket events it wants ([`Connection::interest`]) and whether it is
//! finished ([`Connection::is_done`]).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use virtio_vsock::packet::VsockPacket;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::epoll::EventSet;

use super::defs::{
    CONN_BUF_SIZE, CREDIT_UPDATE_THRESHOLD, MAX_PKT_DATA, REQUEST_TIMEOUT, RxHeader, SHUTDOWN_BOTH,
    SHUTDOWN_RCV, SHUTDOWN_SEND, TxHeader, op,
};
use crate::vmm::devices::virtio::guest_log;

/// A connection's identity: the host-side port (the port the guest connected to, or the local
/// port the muxer allocated for a host-initiated connection) and the guest-side port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ConnKey {
    pub(super) host_port: u32,
    pub(super) guest_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Data flows (possibly half-closed, see the shutdown fields).
    Established,
    /// Finished: an RST was exchanged or is about to be sent. Removed once nothing is pending.
    Closed,
}

/// Packets the connection owes the guest.
mod pending {
    pub(super) const REQUEST: u8 = 1 << 0;
    pub(super) const RESPONSE: u8 = 1 << 1;
    pub(super) const RST: u8 = 1 << 2;
    /// The host socket may have data for the guest.
    pub(super) const RW: u8 = 1 << 3;
    pub(super) const CREDIT_UPDATE: u8 = 1 << 4;
}

#[derive(Debug)]
pub(super) struct Connection {
    stream: UnixStream,
    key: ConnKey,
    state: State,
    pending: u8,
    /// Whether the host side started this connection (its port is the muxer's to free).
    host_initiated: bool,

    /// Guest data the host socket has not accepted yet, at most `CONN_BUF_SIZE` bytes.
    tx_buf: VecDeque<u8>,
    /// Guest payload bytes received in total (the guest's `tx_cnt`).
    recv_cnt: Wrapping<u32>,
    /// Guest payload bytes written to the host socket: our `fwd_cnt`.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    last_fwd_cnt_sent: Wrapping<u32>,

    /// The guest's receive buffer size and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes we sent the guest in total.
    rx_cnt: Wrapping<u32>,

    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// SHUTDOWN flags we sent the guest.
    shutdown_sent: u32,
    /// The host socket reached end of file.
    host_eof: bool,
    /// EPOLLHUP: the host socket can neither send nor receive any more.
    host_hup: bool,
    /// We shut down the host socket's write side (the guest will send nothing more).
    host_write_shut: bool,

    /// When the guest must have answered our REQUEST, or the connection is reset.
    expiry: Option<Instant>,

    /// Muxer bookkeeping: the events registered with its epoll (`None`: not registered).
    pub(super) registered: Option<EventSet>,
    /// Muxer bookkeeping: the connection is in the muxer's RX queue.
    pub(super) queued: bool,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, state: State, pending: u8) -> Self {
        Self {
            stream,
            key,
            state,
            pending,
            host_initiated: false,
            tx_buf: VecDeque::new(),
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_shutdown: 0,
            shutdown_sent: 0,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            expiry: None,
            registered: None,
            queued: false,
        }
    }

    /// A host client asked for guest port `key.guest_port`: send the guest a REQUEST.
    pub(super) fn new_local(stream: UnixStream, key: ConnKey) -> Self {
        let mut conn = Self::new(stream, key, State::LocalInit, pending::REQUEST);
        conn.host_initiated = true;
        conn
    }

    /// The guest connected to host port `key.host_port` and we reached its Unix socket: answer
    /// with a RESPONSE.
    pub(super) fn new_peer(stream: UnixStream, key: ConnKey, request: &TxHeader) -> Self {
        let mut conn = Self::new(stream, key, State::Established, pending::RESPONSE);
        conn.peer_buf_alloc = request.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        conn
    }

    pub(super) fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    pub(super) fn key(&self) -> ConnKey {
        self.key
    }

    pub(super) fn host_initiated(&self) -> bool {
        self.host_initiated
    }

    pub(super) fn expiry(&self) -> Option<Instant> {
        self.expiry
    }

    pub(super) fn has_pending_rx(&self) -> bool {
        self.pending != 0 || self.shutdown_owed() != 0
    }

    /// Finished and owes the guest nothing: the muxer drops it, closing the host socket.
    pub(super) fn is_done(&self) -> bool {
        self.state == State::Closed && self.pending == 0
    }

    /// The socket events the connection needs, or `None` to leave the epoll set entirely (once
    /// the host socket hung up, epoll would report HUP forever).
    pub(super) fn interest(&self) -> Option<EventSet> {
        if self.state == State::Closed || self.host_hup {
            return None;
        }
        let mut events = EventSet::empty();
        if self.may_read_host() && self.peer_credit() > 0 && self.pending & pending::RW == 0 {
            events |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            events |= EventSet::OUT;
        }
        // Even with no events, a registered socket reports HUP and ERR: a host client that
        // gives up is noticed in every state.
        Some(events)
    }

    /// Resets the connection: the guest gets an RST (unless it never heard of it), and the muxer
    /// drops it.
    pub(super) fn kill(&mut self) {
        if self.state == State::Closed {
            return;
        }
        self.pending = if self.pending & pending::REQUEST != 0 {
            0
        } else {
            pending::RST
        };
        self.state = State::Closed;
        self.expiry = None;
    }

    /// The guest missed its deadline to answer our REQUEST.
    pub(super) fn expire(&mut self, now: Instant) {
        if self.expiry.is_some_and(|at| at <= now) {
            eprintln!(
                "virtio-vsock: connection {}:{} timed out, resetting",
                self.key.host_port, self.key.guest_port
            );
            self.kill();
        }
    }

    /// Credit the guest has left for data from us.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        // A guest claiming to have consumed more than we sent only shrinks its own credit.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether data read from the host socket can still go to the guest.
    fn may_read_host(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// SHUTDOWN flags we owe the guest: SEND once the host socket reached EOF, both once it
    /// hung up entirely and nothing more will be read from it.
    fn shutdown_owed(&self) -> u32 {
        if self.state != State::Established {
            return 0;
        }
        let read_done = self.host_eof || self.peer_shutdown & SHUTDOWN_RCV != 0;
        let want = if self.host_hup && read_done {
            SHUTDOWN_BOTH
        } else if self.host_eof {
            SHUTDOWN_SEND
        } else {
            0
        };
        want & !self.shutdown_sent
    }

    /// Called by the muxer after every change: a hung-up socket is no longer polled, so reading
    /// what is left in it is scheduled here.
    pub(super) fn refresh(&mut self) {
        if self.host_hup && self.may_read_host() && self.peer_credit() > 0 {
            self.pending |= pending::RW;
        }
    }

    /// Readiness of the host socket.
    pub(super) fn notify(&mut self, events: EventSet) {
        if self.state == State::Closed {
            return;
        }
        if events.contains(EventSet::ERROR) {
            eprintln!(
                "virtio-vsock: host socket error on {}:{}",
                self.key.host_port, self.key.guest_port
            );
            self.kill();
            return;
        }
        if events.contains(EventSet::HANG_UP) {
            self.host_hup = true;
            if self.state == State::LocalInit {
                // The host client gave up before the guest answered.
                self.kill();
                return;
            }
        }
        if events.contains(EventSet::IN) && self.may_read_host() {
            self.pending |= pending::RW;
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP) && !self.tx_buf.is_empty() {
            self.flush_tx_buf();
        }
    }

    /// A packet the guest sent on this connection.
    pub(super) fn recv_guest(&mut self, hdr: &TxHeader, data: Option<&VolatileSlice<'_, ()>>) {
        // Every packet carries the guest's current credit.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match (self.state, hdr.op) {
            (_, op::RST) => {
                self.state = State::Closed;
                self.pending = 0;
                self.expiry = None;
            }
            (State::Closed, _) => {}
            (State::LocalInit, op::RESPONSE) => self.established_by_guest(),
            (State::Established, op::RW) => {
                if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                    guest_log!("virtio-vsock: guest sent data after SHUTDOWN(SEND)");
                    self.kill();
                } else if let Some(data) = data {
                    self.forward_to_host(data);
                }
            }
            (State::Established, op::CREDIT_UPDATE) => {}
            (State::Established, op::CREDIT_REQUEST) => self.pending |= pending::CREDIT_UPDATE,
            (State::Established, op::SHUTDOWN) => self.peer_shutdown(hdr.flags),
            (state, op) => {
                guest_log!(
                    "virtio-vsock: unexpected op {op} in state {state:?} on {}:{}",
                    self.key.host_port,
                    self.key.guest_port
                );
                self.kill();
            }
        }
    }

    /// The guest accepted our REQUEST: tell the host client which local port it got.
    fn established_by_guest(&mut self) {
        let line = format!("OK {}\n", self.key.host_port);
        // A fresh socket's send buffer always has room for these few bytes; if it does not,
        // the client is not behaving like one and the connection is reset.
        match (&self.stream).write(line.as_bytes()) {
            Ok(n) if n == line.len() => {
                self.state = State::Established;
                self.expiry = None;
            }
            Ok(_) | Err(_) => self.kill(),
        }
    }

    fn peer_shutdown(&mut self, flags: u32) {
        let new = flags & SHUTDOWN_BOTH & !self.peer_shutdown;
        self.peer_shutdown |= flags & SHUTDOWN_BOTH;
        if new & SHUTDOWN_RCV != 0 {
            // The host writer gets EPIPE from now on instead of filling a buffer nobody reads.
            let _ = self.stream.shutdown(Shutdown::Read);
            self.pending &= !pending::RW;
        }
        self.after_forward();
    }

    /// Writes guest data to the host socket, buffering what it does not take now.
    fn forward_to_host(&mut self, data: &VolatileSlice<'_, ()>) {
        let len = data.len();
        self.recv_cnt += wrap(len);
        let mut written = 0;
        if self.tx_buf.is_empty() && !self.host_write_shut {
            match (&self.stream).write_volatile(data) {
                Ok(n) => written = n,
                Err(e) if is_would_block(&e) => {}
                Err(e) => {
                    self.host_write_failed(&e);
                    return;
                }
            }
        }
        let rest = len - written;
        if self.tx_buf.len() + rest > CONN_BUF_SIZE as usize {
            // The guest sent more than the credit we gave it.
            guest_log!(
                "virtio-vsock: guest overran its credit on {}:{}, resetting",
                self.key.host_port,
                self.key.guest_port
            );
            self.kill();
            return;
        }
        if rest > 0 {
            let mut copy = vec![0u8; rest];
            if let Ok(tail) = data.offset(written) {
                tail.copy_to(&mut copy[..]);
            }
            self.tx_buf.extend(copy);
        }
        self.fwd_cnt += wrap(written);
        self.after_forward();
    }

    /// The host socket refused a write for good: log it and reset the connection.
    fn host_write_failed(&mut self, e: &dyn std::fmt::Display) {
        eprintln!(
            "virtio-vsock: write to host socket {}:{} failed: {e}",
            self.key.host_port, self.key.guest_port
        );
        self.kill();
    }

    fn flush_tx_buf(&mut self) {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += wrap(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.host_write_failed(&e);
                    return;
                }
            }
        }
        self.after_forward();
    }

    /// After guest data moved on (or the guest shut down): tell the guest about freed space
    /// before it runs dry, and finish the guest's shutdown once our buffer is empty.
    fn after_forward(&mut self) {
        if self.state != State::Established {
            return;
        }
        let guest_view_used = (self.recv_cnt - self.last_fwd_cnt_sent).0;
        let guest_view_free = CONN_BUF_SIZE.saturating_sub(guest_view_used);
        if guest_view_free < CREDIT_UPDATE_THRESHOLD && self.fwd_cnt != self.last_fwd_cnt_sent {
            self.pending |= pending::CREDIT_UPDATE;
        }
        if !self.tx_buf.is_empty() {
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.peer_shutdown == SHUTDOWN_BOTH {
            // The guest is done both ways and waits for our RST to complete its close.
            self.kill();
        }
    }

    /// Writes the next packet owed to the guest into `pkt`; returns its payload length, or
    /// `None` when nothing could be sent now.
    pub(super) fn fill_rx(&mut self, pkt: &mut VsockPacket<'_, ()>, guest_cid: u64) -> Option<u32> {
        if self.pending & pending::RST != 0 {
            self.pending = 0;
            self.state = State::Closed;
            self.write_header(pkt, guest_cid, op::RST, 0, 0);
            return Some(0);
        }
        if self.state == State::Closed {
            self.pending = 0;
            return None;
        }
        if self.pending & pending::REQUEST != 0 {
            self.pending &= !pending::REQUEST;
            self.expiry = Some(Instant::now() + REQUEST_TIMEOUT);
            self.write_header(pkt, guest_cid, op::REQUEST, 0, 0);
            return Some(0);
        }
        if self.pending & pending::RESPONSE != 0 {
            self.pending &= !pending::RESPONSE;
            self.write_header(pkt, guest_cid, op::RESPONSE, 0, 0);
            return Some(0);
        }
        if self.pending & pending::RW != 0 {
            if let Some(len) = self.read_host(pkt, guest_cid) {
                return Some(len);
            }
            if self.pending & pending::RST != 0 {
                return self.fill_rx(pkt, guest_cid);
            }
        }
        let owed = self.shutdown_owed();
        if owed != 0 {
            self.shutdown_sent |= owed;
            let flags = self.shutdown_sent;
            self.write_header(pkt, guest_cid, op::SHUTDOWN, flags, 0);
            if flags == SHUTDOWN_BOTH {
                // The host socket is gone both ways, so the connection has nothing left to do.
                // Forget it now rather than wait for the guest's RST: Linux only sends that
                // once its reader drained the data, and resetting it on a timer (as Firecracker
                // does) would discard data a slow guest has not read yet. Whatever the guest
                // sends later on it is answered with RST, which completes its close.
                self.state = State::Closed;
                self.pending = 0;
            }
            return Some(0);
        }
        if self.pending & pending::CREDIT_UPDATE != 0 {
            self.write_header(pkt, guest_cid, op::CREDIT_UPDATE, 0, 0);
            return Some(0);
        }
        None
    }

    /// Moves host socket data into the RX buffer, never more than the guest has credit for.
    fn read_host(&mut self, pkt: &mut VsockPacket<'_, ()>, guest_cid: u64) -> Option<u32> {
        let credit = self.peer_credit();
        if !self.may_read_host() || credit == 0 {
            self.pending &= !pending::RW;
            return None;
        }
        let room = pkt.data_slice().map_or(0, |d| d.len());
        let max = room.min(to_usize(credit)).min(to_usize(MAX_PKT_DATA));
        let mut buf = pkt.data_slice()?.subslice(0, max).ok()?;
        match (&self.stream).read_volatile(&mut buf) {
            Ok(0) => {
                self.host_eof = true;
                self.pending &= !pending::RW;
                None
            }
            Ok(n) => {
                // n <= MAX_PKT_DATA, which fits a u32.
                let n = u32::try_from(n).unwrap_or(0);
                self.rx_cnt += Wrapping(n);
                self.write_header(pkt, guest_cid, op::RW, 0, n);
                Some(n)
            }
            Err(e) if is_would_block(&e) => {
                self.pending &= !pending::RW;
                None
            }
            Err(e) => {
                eprintln!(
                    "virtio-vsock: read from host socket {}:{} failed: {e}",
                    self.key.host_port, self.key.guest_port
                );
                self.kill();
                None
            }
        }
    }

    fn write_header(
        &mut self,
        pkt: &mut VsockPacket<'_, ()>,
        guest_cid: u64,
        op: u16,
        flags: u32,
        len: u32,
    ) {
        RxHeader {
            guest_cid,
            host_port: self.key.host_port,
            guest_port: self.key.guest_port,
            op,
            flags,
            len,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
        .write(pkt);
        // Every packet tells the guest our credit.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !pending::CREDIT_UPDATE;
    }
}

fn is_would_block(e: &VolatileMemoryError) -> bool {
    matches!(e, VolatileMemoryError::IOError(io) if io.kind() == io::ErrorKind::WouldBlock)
}

/// Byte counts here are bounded by `CONN_BUF_SIZE`/`MAX_PKT_DATA`; the credit counters are
/// defined modulo 2^32, so keeping the low bits is the protocol's own arithmetic.
#[allow(clippy::cast_possible_truncation)]
fn wrap(n: usize) -> Wrapping<u32> {
    Wrapping(n as u32)
}

fn to_usize(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}
