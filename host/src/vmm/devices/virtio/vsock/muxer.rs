//! The host side of the vsock device: the Unix listener, the connection table, and the queue of
//! packets waiting for guest RX buffers, all driven from one epoll set.
//!
//! Epoll tokens: sockets are registered with their fd as the token (fds are below 2^31), the
//! device's own fds (queue eventfds, listener, timer) with tokens at 2^32 and up.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
use virtio_vsock::packet::VsockPacket;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnKey, Connection};
use super::defs::{
    LOCAL_PORT_FIRST, MAX_CONNECT_LINE, MAX_CONNECTIONS, MAX_HANDSHAKES, MAX_PENDING_RST, RxHeader,
    TYPE_STREAM, TxHeader, op,
};
use super::error::VsockError;
use crate::vmm::devices::virtio::guest_log;

/// Epoll tokens of the device's own fds.
pub(super) const TOKEN_QUEUE_BASE: u64 = 1 << 32;
const TOKEN_LISTENER: u64 = (1 << 32) + 16;
const TOKEN_TIMER: u64 = (1 << 32) + 17;

/// Accepts handled per listener event, so a connect storm cannot starve the queues.
const ACCEPT_BATCH: usize = 32;

/// Something waiting for an RX buffer.
#[derive(Debug, Clone, Copy)]
enum RxItem {
    /// A connection with pending packets.
    Conn(ConnKey),
    /// An RST answering a guest packet that matches no connection.
    Rst(ConnKey),
}

/// A host client that connected to the listener and has not yet sent `CONNECT <port>\n`.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

#[derive(Debug)]
pub(super) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    epoll: Epoll,
    listener: UnixListener,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Local ports of host-initiated connections.
    local_ports: HashSet<u32>,
    next_local_port: u32,
    rxq: VecDeque<RxItem>,
    pending_rsts: usize,
}

impl Muxer {
    pub(super) fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.to_owned(),
            source,
        })?;
        let muxer = Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            epoll,
            listener,
            timer: TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?,
            timer_deadline: None,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            local_ports: HashSet::new(),
            next_local_port: LOCAL_PORT_FIRST,
            rxq: VecDeque::new(),
            pending_rsts: 0,
        };
        muxer
            .listener
            .set_nonblocking(true)
            .map_err(VsockError::Listener)?;
        muxer
            .ctl(
                ControlOperation::Add,
                muxer.listener.as_raw_fd(),
                EventSet::IN,
                TOKEN_LISTENER,
            )
            .map_err(VsockError::Epoll)?;
        muxer
            .ctl(
                ControlOperation::Add,
                muxer.timer.as_raw_fd(),
                EventSet::IN,
                TOKEN_TIMER,
            )
            .map_err(VsockError::Epoll)?;
        Ok(muxer)
    }

    pub(super) fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    fn ctl(&self, op: ControlOperation, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        self.epoll.ctl(op, fd, EpollEvent::new(events, token))
    }

    /// Readiness of a socket or of the listener/timer.
    pub(super) fn handle_event(&mut self, token: u64, events: EventSet) {
        match token {
            TOKEN_LISTENER => self.accept(),
            TOKEN_TIMER => self.handle_timer(),
            _ => {
                let Ok(fd) = RawFd::try_from(token) else {
                    eprintln!("virtio-vsock: event for unknown token {token:#x}");
                    return;
                };
                if let Some(&key) = self.by_fd.get(&fd) {
                    if let Some(conn) = self.conns.get_mut(&key) {
                        conn.notify(events);
                    }
                    self.sync(key);
                } else if self.handshakes.contains_key(&fd) {
                    self.read_handshake(fd);
                }
            }
        }
    }

    /// Whether packets wait for RX buffers.
    pub(super) fn has_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// Whether the RST backlog is full: TX processing pauses until RX drains it.
    pub(super) fn rx_backlog_full(&self) -> bool {
        self.pending_rsts >= MAX_PENDING_RST
    }

    /// Drops every connection (device reset). The listener stays: host clients may connect
    /// again once the driver is back.
    pub(super) fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.rxq.clear();
        self.pending_rsts = 0;
        self.timer_deadline = None;
        if let Err(e) = self.timer.clear() {
            eprintln!("virtio-vsock: cannot disarm the timer: {e}");
        }
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("virtio-vsock: accept on {}: {e}", self.uds_path.display());
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES || self.conns.len() >= MAX_CONNECTIONS {
                eprintln!("virtio-vsock: too many host connections, refusing one");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                eprintln!("virtio-vsock: cannot make a host connection non-blocking: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = self.ctl(ControlOperation::Add, fd, EventSet::IN, token_of(fd)) {
                eprintln!("virtio-vsock: cannot poll a host connection: {e}");
                continue;
            }
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::new(),
                },
            );
            // Clients usually write the line right after connecting: no need to wait a round.
            self.read_handshake(fd);
        }
    }

    /// Reads the client's `CONNECT <port>\n` one byte at a time, so nothing after the line is
    /// consumed: those bytes are the start of the stream for the guest.
    fn read_handshake(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8];
            match hs.stream.read(&mut byte) {
                Ok(0) => break Err("closed before the CONNECT line".to_owned()),
                Ok(_) if byte[0] == b'\n' => break parse_connect(&hs.line),
                Ok(_) if hs.line.len() >= MAX_CONNECT_LINE => {
                    break Err("CONNECT line too long".to_owned());
                }
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let port = match port {
            Ok(port) => port,
            Err(why) => {
                eprintln!("virtio-vsock: dropping host connection: {why}");
                let _ = self.ctl(ControlOperation::Delete, fd, EventSet::empty(), 0);
                return;
            }
        };
        let Some(host_port) = self.allocate_local_port() else {
            eprintln!("virtio-vsock: no local port left for a host connection");
            let _ = self.ctl(ControlOperation::Delete, fd, EventSet::empty(), 0);
            return;
        };
        let key = ConnKey {
            host_port,
            guest_port: port,
        };
        let mut conn = Connection::new_local(hs.stream, key);
        // The handshake registration (IN) is still in place.
        conn.registered = Some(EventSet::IN);
        self.local_ports.insert(host_port);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.sync(key);
    }

    fn allocate_local_port(&mut self) -> Option<u32> {
        // At most MAX_CONNECTIONS ports are taken, so this finds one quickly.
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(LOCAL_PORT_FIRST);
            if !self.local_ports.contains(&port) {
                return Some(port);
            }
        }
        None
    }

    /// A packet from the guest's TX queue.
    pub(super) fn handle_tx(&mut self, pkt: &VsockPacket<'_, ()>) {
        let hdr = TxHeader::of(pkt);
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != u64::from(husk_proto::HOST_CID) {
            guest_log!(
                "virtio-vsock: dropping packet from cid {} to cid {} (guest is {}, host {})",
                hdr.src_cid,
                hdr.dst_cid,
                self.guest_cid,
                husk_proto::HOST_CID
            );
            return;
        }
        let key = ConnKey {
            host_port: hdr.dst_port,
            guest_port: hdr.src_port,
        };
        if hdr.type_ != TYPE_STREAM {
            guest_log!("virtio-vsock: socket type {} not supported", hdr.type_);
            if hdr.op != op::RST {
                self.enqueue_rst(key);
            }
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.recv_guest(&hdr, pkt.data_slice());
            self.sync(key);
            return;
        }
        match hdr.op {
            op::REQUEST => self.connect_to_host(key, &hdr),
            op::RST => {}
            // What a guest says about a connection it still believes in when the host end is
            // gone (e.g. the first packets of a VM restored from a template): answered
            // quietly.
            op::CREDIT_UPDATE | op::SHUTDOWN => self.enqueue_rst(key),
            other => {
                guest_log!(
                    "virtio-vsock: op {other} for unknown connection {}:{}",
                    key.host_port,
                    key.guest_port
                );
                self.enqueue_rst(key);
            }
        }
    }

    /// The guest connects to host port P: connect to the Unix socket `<uds_path>_P`.
    fn connect_to_host(&mut self, key: ConnKey, hdr: &TxHeader) {
        if self.conns.len() >= MAX_CONNECTIONS {
            guest_log!("virtio-vsock: connection limit reached, refusing guest connection");
            self.enqueue_rst(key);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.host_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => stream,
            Err(e) => {
                guest_log!(
                    "virtio-vsock: guest connection to port {}: {}: {e}",
                    key.host_port,
                    Path::new(&path).display()
                );
                self.enqueue_rst(key);
                return;
            }
        };
        let conn = Connection::new_peer(stream, key, hdr);
        self.by_fd.insert(conn.fd(), key);
        self.conns.insert(key, conn);
        self.sync(key);
    }

    fn enqueue_rst(&mut self, key: ConnKey) {
        if self.pending_rsts >= MAX_PENDING_RST {
            guest_log!("virtio-vsock: RST backlog full, dropping one");
            return;
        }
        self.pending_rsts += 1;
        self.rxq.push_back(RxItem::Rst(key));
    }

    /// Brings the muxer's view of a connection up to date after anything happened to it:
    /// removes it when done, adjusts its epoll registration, queues it for RX, arms the timer.
    fn sync(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.refresh();
        if conn.is_done() {
            self.remove(key);
            return;
        }
        let want = conn.interest();
        if want != conn.registered {
            let fd = conn.fd();
            let result = match (conn.registered, want) {
                (None, Some(ev)) => {
                    self.epoll
                        .ctl(ControlOperation::Add, fd, EpollEvent::new(ev, token_of(fd)))
                }
                (Some(_), Some(ev)) => self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(ev, token_of(fd)),
                ),
                (Some(_), None) => {
                    self.epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                }
                (None, None) => Ok(()),
            };
            match result {
                Ok(()) => conn.registered = want,
                Err(e) => {
                    eprintln!("virtio-vsock: cannot update polling of a connection: {e}");
                    conn.kill();
                }
            }
        }
        if conn.has_pending_rx() && !conn.queued {
            conn.queued = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
        if let Some(at) = conn.expiry()
            && self.timer_deadline.is_none_or(|d| at < d)
        {
            self.arm_timer(at);
        }
    }

    fn remove(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        let fd = conn.fd();
        if conn.registered.is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.by_fd.remove(&fd);
        if conn.host_initiated() {
            self.local_ports.remove(&key.host_port);
        }
        // Dropping the connection closes the host socket.
    }

    fn arm_timer(&mut self, at: Instant) {
        self.timer_deadline = Some(at);
        // A zero duration would disarm the timer; fire in a millisecond instead.
        let after = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        if let Err(e) = self.timer.reset(after, None) {
            eprintln!("virtio-vsock: cannot arm the timer: {e}");
        }
    }

    /// Resets the connections whose deadline passed and re-arms the timer for the next one.
    /// Re-arming (or clearing) also resets the timerfd's readiness, so it is never read.
    fn handle_timer(&mut self) {
        let now = Instant::now();
        self.timer_deadline = None;
        let expired: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.expiry().is_some_and(|at| at <= now))
            .map(Connection::key)
            .collect();
        for key in expired {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.expire(now);
            }
            self.sync(key);
        }
        match self.conns.values().filter_map(Connection::expiry).min() {
            Some(next) => self.arm_timer(next),
            None => {
                if let Err(e) = self.timer.clear() {
                    eprintln!("virtio-vsock: cannot disarm the timer: {e}");
                }
            }
        }
    }

    /// Writes the next waiting packet into an RX buffer; returns its payload length, or `None`
    /// (with nothing written) when no packet is waiting.
    pub(super) fn fill_rx(&mut self, pkt: &mut VsockPacket<'_, ()>) -> Option<u32> {
        while let Some(item) = self.rxq.pop_front() {
            match item {
                RxItem::Rst(key) => {
                    self.pending_rsts = self.pending_rsts.saturating_sub(1);
                    RxHeader {
                        guest_cid: self.guest_cid,
                        host_port: key.host_port,
                        guest_port: key.guest_port,
                        op: op::RST,
                        flags: 0,
                        len: 0,
                        buf_alloc: 0,
                        fwd_cnt: 0,
                    }
                    .write(pkt);
                    return Some(0);
                }
                RxItem::Conn(key) => {
                    let Some(conn) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    conn.queued = false;
                    let written = conn.fill_rx(pkt, self.guest_cid);
                    self.sync(key);
                    if written.is_some() {
                        return written;
                    }
                }
            }
        }
        None
    }

    #[cfg(test)]
    pub(super) fn connection_count(&self) -> usize {
        self.conns.len()
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The listener's socket file would otherwise outlive the VM.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

fn token_of(fd: RawFd) -> u64 {
    u64::try_from(fd).unwrap_or(u64::MAX)
}

/// Parses `CONNECT <port>` (the keyword in any case, as Firecracker accepts it).
fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| "CONNECT line is not UTF-8".to_owned())?;
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(keyword), Some(port), None) if keyword.eq_ignore_ascii_case("connect") => port
            .parse()
            .map_err(|_| format!("bad port in CONNECT line {text:?}")),
        _ => Err(format!("expected \"CONNECT <port>\", got {text:?}")),
    }
}

/// Connects to a Unix socket without blocking: a Unix `connect` either completes at once or
/// fails (`EAGAIN` when the listener's backlog is full), it never waits in the background.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect(b"connect  52\r"), Ok(52));
        assert!(parse_connect(b"CONNECT").is_err());
        assert!(parse_connect(b"CONNECT x").is_err());
        assert!(parse_connect(b"CONNECT 1 2").is_err());
        assert!(parse_connect(b"LISTEN 1").is_err());
        assert!(parse_connect(b"CONNECT 4294967296").is_err());
        assert!(parse_connect(&[0xff, 0xfe]).is_err());
    }
}
