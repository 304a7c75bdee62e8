//! Device tests: the test plays the guest driver on real guest memory (queues laid out by
//! hand) and the host side with real Unix sockets.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use std::ops::Not;
use std::sync::Mutex;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio as reg;

use super::Vsock;
use super::defs::{
    CONN_BUF_SIZE, CREDIT_UPDATE_THRESHOLD, EVQ, HDR_LEN, LOCAL_PORT_FIRST, RXQ, SHUTDOWN_BOTH,
    SHUTDOWN_SEND, TXQ, TYPE_STREAM, op,
};
use crate::vmm::devices::BusDevice;
use crate::vmm::devices::persist::Persist;
use crate::vmm::devices::virtio::SharedDevice;
use crate::vmm::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::vmm::devices::virtio::test_utils::{Buf, TestQueue, guest_memory, read_guest};
use crate::vmm::devices::virtio::{DeviceQueue, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice};

const GUEST_CID: u64 = 3;
const HOST_CID: u64 = husk_proto::HOST_CID as u64;
const QSIZE: u16 = 256;
const RX_DATA: u32 = 4096;

/// A directory for the test's sockets, removed afterwards.
struct TestDir(PathBuf);

impl TestDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("husk-vsock-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A packet as the guest sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Pkt {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    data: Vec<u8>,
}

impl Pkt {
    /// A packet from the guest's `port` to host port `host_port`.
    fn guest(op: u16, port: u32, host_port: u32) -> Self {
        Self {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: port,
            dst_port: host_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Self::default()
        }
    }

    fn with_data(mut self, data: &[u8]) -> Self {
        self.len = u32::try_from(data.len()).unwrap();
        self.data = data.to_vec();
        self
    }

    fn header_bytes(&self) -> [u8; 44] {
        let mut raw = [0u8; 44];
        raw[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        raw[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        raw[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        raw[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        raw[24..28].copy_from_slice(&self.len.to_le_bytes());
        raw[28..30].copy_from_slice(&self.type_.to_le_bytes());
        raw[30..32].copy_from_slice(&self.op.to_le_bytes());
        raw[32..36].copy_from_slice(&self.flags.to_le_bytes());
        raw[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        raw[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        raw
    }

    fn parse(raw: &[u8]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(raw[o..o + 2].try_into().unwrap());
        let len = u32_at(24);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len,
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
            data: raw[44..].to_vec(),
        }
    }
}

/// The guest driver: the three queues, buffers in guest memory, and the device under test.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    dev: Vsock,
    irq: Arc<Interrupt>,
    queues: Vec<TestQueue<'a>>,
    kicks: Vec<EventFd>,
    rx_bufs: HashMap<u16, u64>,
    next_buf: u64,
    dir: TestDir,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let dir = TestDir::new();
        let dev = Vsock::new(GUEST_CID, &dir.0.join("v.sock")).unwrap();
        let mut guest = Self {
            mem,
            dev,
            irq: Arc::new(Interrupt::new().unwrap()),
            queues: Vec::new(),
            kicks: Vec::new(),
            rx_bufs: HashMap::new(),
            next_buf: 0x10_0000,
            dir,
        };
        guest.activate();
        guest
    }

    fn activate(&mut self) {
        self.queues = (0..3)
            .map(|i| TestQueue::new(self.mem, 0x1_0000 * (i + 1), QSIZE))
            .collect();
        self.kicks = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        self.rx_bufs.clear();
        let queues = self
            .queues
            .iter()
            .zip(&self.kicks)
            .map(|(q, kick)| DeviceQueue {
                queue: q.queue(),
                notify: kick.try_clone().unwrap(),
            })
            .collect();
        self.dev.ack_features(VIRTIO_F_VERSION_1);
        self.dev
            .activate(self.mem.clone(), self.irq.clone(), queues)
            .unwrap();
    }

    fn uds(&self) -> PathBuf {
        self.dir.0.join("v.sock")
    }

    fn host_listener(&self, port: u32) -> UnixListener {
        UnixListener::bind(self.dir.0.join(format!("v.sock_{port}"))).unwrap()
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len).next_multiple_of(16);
        if self.next_buf + len > 0xf0_0000 {
            self.next_buf = 0x10_0000;
        }
        let addr = self.next_buf;
        self.next_buf += len;
        addr
    }

    fn kick(&self, queue: usize) {
        self.kicks[queue].write(1).unwrap();
    }

    /// Puts a packet on the TX queue, header and data in separate descriptors (or one
    /// descriptor when `single` is set) and lets the device run.
    fn send_with(&mut self, pkt: &Pkt, single: bool) {
        let hdr = self.alloc(HDR_LEN);
        self.mem
            .write_slice(&pkt.header_bytes(), GuestAddress(hdr))
            .unwrap();
        let data_len = u32::try_from(pkt.data.len()).unwrap();
        if pkt.data.is_empty() {
            self.queues[TXQ].add_chain(&[Buf::readable(hdr, HDR_LEN)]);
        } else if single {
            let addr = self.alloc(HDR_LEN + data_len);
            self.mem
                .write_slice(&pkt.header_bytes(), GuestAddress(addr))
                .unwrap();
            self.mem
                .write_slice(&pkt.data, GuestAddress(addr + u64::from(HDR_LEN)))
                .unwrap();
            self.queues[TXQ].add_chain(&[Buf::readable(addr, HDR_LEN + data_len)]);
        } else {
            let data = self.alloc(data_len);
            self.mem.write_slice(&pkt.data, GuestAddress(data)).unwrap();
            self.queues[TXQ]
                .add_chain(&[Buf::readable(hdr, HDR_LEN), Buf::readable(data, data_len)]);
        }
        self.kick(TXQ);
        self.dev.process_events();
    }

    fn send(&mut self, pkt: &Pkt) {
        self.send_with(pkt, false);
    }

    /// Offers `n` RX buffers (one descriptor each, as Linux >= 6.2 does).
    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = self.alloc(HDR_LEN + RX_DATA);
            let head = self.queues[RXQ].add_chain(&[Buf::writable(addr, HDR_LEN + RX_DATA)]);
            assert!(self.rx_bufs.insert(head, addr).is_none(), "head reused");
        }
        self.kick(RXQ);
    }

    /// Lets the device run and returns the packets it put in RX buffers.
    fn recv(&mut self) -> Vec<Pkt> {
        // A few rounds: events that one round enables (a socket registered, an interest
        // widened) are reported by the next wait.
        for _ in 0..3 {
            self.dev.process_events();
        }
        let used = self.queues[RXQ].take_used();
        used.into_iter()
            .map(|(head, len)| {
                let addr = self.rx_bufs.remove(&head).expect("unknown RX head");
                assert!(len >= HDR_LEN, "short RX packet");
                let raw = read_guest(self.mem, addr, usize::try_from(len).unwrap());
                let pkt = Pkt::parse(&raw);
                assert_eq!(pkt.len + HDR_LEN, len, "used length matches the header");
                pkt
            })
            .collect()
    }

    /// Like `recv`, with RX buffers topped up, and expecting exactly one packet.
    fn recv_one(&mut self) -> Pkt {
        self.give_rx(1);
        let mut pkts = self.recv();
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        pkts.remove(0)
    }

    /// Like `recv`, with two RX buffers, expecting exactly two packets.
    fn recv_two(&mut self) -> Vec<Pkt> {
        self.give_rx(2);
        let pkts = self.recv();
        assert_eq!(pkts.len(), 2, "{pkts:?}");
        pkts
    }

    /// Guest connects from `port` to host `host_port`, whose listener accepts; returns the
    /// accepted host end.
    fn connect_to_host(
        &mut self,
        listener: &UnixListener,
        port: u32,
        host_port: u32,
    ) -> UnixStream {
        self.send(&Pkt::guest(op::REQUEST, port, host_port));
        let resp = self.recv_one();
        assert_eq!(resp.op, op::RESPONSE, "{resp:?}");
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
    }

    fn used_tx(&mut self) -> Vec<(u16, u32)> {
        self.queues[TXQ].take_used()
    }
}

fn read_exact_from(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn device_identity_and_config() {
    let dir = TestDir::new();
    let dev = Vsock::new(42, &dir.0.join("v.sock")).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 42);
    let mut high = [0xffu8; 4];
    dev.read_config(4, &mut high);
    assert_eq!(high, [0; 4]);
    let mut beyond = [0u8; 4];
    dev.read_config(6, &mut beyond);
    assert_eq!(beyond, [0; 4], "a read past the end reads zeros");
    dev.read_config(u64::MAX, &mut beyond);

    assert!(Vsock::new(2, &dir.0.join("w.sock")).is_err());
    assert!(Vsock::new(u64::from(u32::MAX), &dir.0.join("w.sock")).is_err());
    assert!(
        Vsock::new(5, &dir.0.join("v.sock")).is_err(),
        "socket path in use"
    );
    drop(dev);
    assert!(!dir.0.join("v.sock").exists(), "socket removed on drop");
}

#[test]
fn guest_connection_to_a_host_listener_carries_data_both_ways() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = g.host_listener(1234);
    let mut host = g.connect_to_host(&listener, 5000, 1234);

    // Guest to host, both descriptor layouts.
    g.send(&Pkt::guest(op::RW, 5000, 1234).with_data(b"hello "));
    g.send_with(&Pkt::guest(op::RW, 5000, 1234).with_data(b"world"), true);
    assert_eq!(read_exact_from(&mut host, 11), b"hello world");
    assert_eq!(g.used_tx().len(), 3, "every TX descriptor returned");

    // Host to guest.
    host.write_all(b"from the host").unwrap();
    let pkt = g.recv_one();
    assert_eq!(pkt.op, op::RW);
    assert_eq!(
        (pkt.src_cid, pkt.dst_cid, pkt.src_port, pkt.dst_port),
        (HOST_CID, GUEST_CID, 1234, 5000)
    );
    assert_eq!(pkt.type_, TYPE_STREAM);
    assert_eq!(pkt.data, b"from the host");
    assert_eq!(pkt.buf_alloc, CONN_BUF_SIZE);
    assert_eq!(pkt.fwd_cnt, 11);
    assert_ne!(g.irq.status() & 1, 0, "used-buffer interrupt raised");
    assert!(g.irq.irq_evt().read().unwrap() >= 1);

    // The host closes: the guest hears both directions are done and the device forgets the
    // connection; the guest's later close is answered with RST.
    host.write_all(b"last words").unwrap();
    drop(host);
    let pkts = g.recv_two();
    assert_eq!(pkts[0].data, b"last words");
    assert_eq!((pkts[1].op, pkts[1].flags), (op::SHUTDOWN, SHUTDOWN_BOTH));
    assert_eq!(g.dev.connection_count(), 0);
    let mut shut = Pkt::guest(op::SHUTDOWN, 5000, 1234);
    shut.flags = SHUTDOWN_BOTH;
    g.send(&shut);
    assert_eq!(g.recv_one().op, op::RST);
    g.send(&Pkt::guest(op::RST, 5000, 1234));
    g.give_rx(1);
    assert!(g.recv().is_empty(), "an RST is never answered");
}

#[test]
fn guest_connection_with_nothing_listening_is_reset() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    g.send(&Pkt::guest(op::REQUEST, 5000, 77));
    let pkt = g.recv_one();
    assert_eq!(pkt.op, op::RST);
    assert_eq!((pkt.src_port, pkt.dst_port), (77, 5000));
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn host_initiated_connect_handshake() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let mut client = UnixStream::connect(g.uds()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Bytes after the line are the start of the stream, not part of the handshake.
    client.write_all(b"CONNECT 52\nearly").unwrap();
    let req = g.recv_one();
    assert_eq!(req.op, op::REQUEST);
    assert_eq!(
        (req.src_cid, req.dst_cid, req.src_port, req.dst_port),
        (HOST_CID, GUEST_CID, LOCAL_PORT_FIRST, 52)
    );

    // The guest accepts.
    g.send(&Pkt::guest(op::RESPONSE, 52, LOCAL_PORT_FIRST));
    let ok = format!("OK {LOCAL_PORT_FIRST}\n");
    assert_eq!(read_exact_from(&mut client, ok.len()), ok.as_bytes());

    let pkt = g.recv_one();
    assert_eq!((pkt.op, pkt.data.as_slice()), (op::RW, &b"early"[..]));
    g.send(&Pkt::guest(op::RW, 52, LOCAL_PORT_FIRST).with_data(b"pong"));
    assert_eq!(read_exact_from(&mut client, 4), b"pong");

    // A second client gets the next local port.
    let mut second = UnixStream::connect(g.uds()).unwrap();
    second.write_all(b"connect 53\n").unwrap();
    let req = g.recv_one();
    assert_eq!((req.src_port, req.dst_port), (LOCAL_PORT_FIRST + 1, 53));
}

#[test]
fn host_initiated_connect_refused_by_the_guest() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let mut client = UnixStream::connect(g.uds()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 99\n").unwrap();
    let req = g.recv_one();
    g.send(&Pkt::guest(op::RST, 99, req.src_port));
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0, "client sees EOF");
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn bad_connect_lines_are_dropped() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let mut client = UnixStream::connect(g.uds()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"HELLO there\n").unwrap();
    g.give_rx(1);
    assert!(g.recv().is_empty());
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0);

    let mut long = UnixStream::connect(g.uds()).unwrap();
    long.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    long.write_all(&[b'x'; 100]).unwrap();
    assert!(g.recv().is_empty());
    // Closed with unread bytes: the client sees a reset rather than a clean EOF.
    match long.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
    }
}

#[test]
fn unanswered_host_request_times_out() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let mut client = UnixStream::connect(g.uds()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"CONNECT 7\n").unwrap();
    let req = g.recv_one();
    assert_eq!(req.op, op::REQUEST);
    std::thread::sleep(Duration::from_millis(2100));
    let rst = g.recv_one();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (op::RST, req.src_port, 7)
    );
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
}

#[test]
fn host_data_waits_for_guest_credit() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = g.host_listener(1234);
    let mut req = Pkt::guest(op::REQUEST, 5000, 1234);
    req.buf_alloc = 1000;
    g.send(&req);
    assert_eq!(g.recv_one().op, op::RESPONSE);
    let (mut host, _) = listener.accept().unwrap();

    host.write_all(&[7u8; 3000]).unwrap();
    g.give_rx(8);
    let pkts = g.recv();
    let got: usize = pkts.iter().map(|p| p.data.len()).sum();
    assert_eq!(got, 1000, "exactly the guest's buf_alloc");
    assert!(pkts.iter().all(|p| p.op == op::RW));
    for _ in 0..3 {
        assert!(g.recv().is_empty(), "held back without credit");
    }

    // The guest's reader consumed 600 bytes.
    let mut update = Pkt::guest(op::CREDIT_UPDATE, 5000, 1234);
    update.buf_alloc = 1000;
    update.fwd_cnt = 600;
    g.send(&update);
    let got: usize = g.recv().iter().map(|p| p.data.len()).sum();
    assert_eq!(got, 600);

    update.fwd_cnt = 1600;
    update.buf_alloc = 64 * 1024;
    g.send(&update);
    let got: usize = g.recv().iter().map(|p| p.data.len()).sum();
    assert_eq!(got, 1400, "the rest");
}

#[test]
fn credit_request_is_answered() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = g.host_listener(1234);
    let mut host = g.connect_to_host(&listener, 5000, 1234);
    g.send(&Pkt::guest(op::RW, 5000, 1234).with_data(&[1; 100]));
    read_exact_from(&mut host, 100);
    g.send(&Pkt::guest(op::CREDIT_REQUEST, 5000, 1234));
    let pkt = g.recv_one();
    assert_eq!(pkt.op, op::CREDIT_UPDATE);
    assert_eq!((pkt.buf_alloc, pkt.fwd_cnt), (CONN_BUF_SIZE, 100));
}

#[test]
fn credit_update_sent_as_the_guest_runs_low() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = g.host_listener(1234);
    let mut host = g.connect_to_host(&listener, 5000, 1234);
    let chunk = vec![9u8; 50_000];
    for _ in 0..4 {
        g.send(&Pkt::guest(op::RW, 5000, 1234).with_data(&chunk));
    }
    // Drain the host side and let the device flush what it buffered.
    let mut total = 0;
    let mut last_update = None;
    while total < 200_000 {
        let mut buf = [0u8; 65536];
        total += host.read(&mut buf).unwrap();
        g.give_rx(1);
        for p in g.recv() {
            assert_eq!(p.op, op::CREDIT_UPDATE);
            last_update = Some(p.fwd_cnt);
        }
    }
    g.give_rx(1);
    for p in g.recv() {
        last_update = Some(p.fwd_cnt);
    }
    assert_eq!(total, 200_000);
    // Everything was forwarded: the guest must know it can send at least the threshold more.
    let last_update = last_update.expect("a credit update was sent");
    assert!(CONN_BUF_SIZE - (200_000 - last_update) >= CREDIT_UPDATE_THRESHOLD);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = g.host_listener(1234);
    let host = g.connect_to_host(&listener, 5000, 1234);
    // The host never reads: the socket buffer fills, then the device's 256 KiB, then RST.
    let chunk = vec![1u8; 64 * 1024];
    let mut rst = false;
    for _ in 0..64 {
        g.send(&Pkt::guest(op::RW, 5000, 1234).with_data(&chunk));
        g.give_rx(1);
        if g.recv().iter().any(|p| p.op == op::RST) {
            rst = true;
            break;
        }
    }
    assert!(rst, "overrun answered with RST");
    assert_eq!(g.dev.connection_count(), 0);
    drop(host);
}

#[test]
fn guest_shutdown_both_ways_gets_rst_and_host_eof() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = g.host_listener(1234);
    let mut host = g.connect_to_host(&listener, 5000, 1234);
    g.send(&Pkt::guest(op::RW, 5000, 1234).with_data(b"bye"));
    let mut shut = Pkt::guest(op::SHUTDOWN, 5000, 1234);
    shut.flags = SHUTDOWN_BOTH;
    g.send(&shut);
    assert_eq!(g.recv_one().op, op::RST);
    assert_eq!(g.dev.connection_count(), 0);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye", "data before the shutdown delivered, then EOF");
}

#[test]
fn guest_half_close_keeps_the_other_direction() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = g.host_listener(1234);
    let mut host = g.connect_to_host(&listener, 5000, 1234);
    let mut shut = Pkt::guest(op::SHUTDOWN, 5000, 1234);
    shut.flags = SHUTDOWN_SEND;
    g.send(&shut);
    let mut buf = [0u8; 4];
    assert_eq!(host.read(&mut buf).unwrap(), 0, "host reads EOF");
    host.write_all(b"more").unwrap();
    let pkt = g.recv_one();
    assert_eq!((pkt.op, pkt.data.as_slice()), (op::RW, &b"more"[..]));

    // Host half-closes too: the guest gets SHUTDOWN(SEND), later both once it hangs up.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let pkt = g.recv_one();
    assert_eq!(pkt.op, op::SHUTDOWN);
    assert_ne!(pkt.flags & SHUTDOWN_SEND, 0);
    drop(host);
    g.give_rx(2);
    let pkts = g.recv();
    assert!(
        pkts.iter().all(|p| p.op == op::SHUTDOWN),
        "{pkts:?} (nothing but shutdowns)"
    );
    g.send(&Pkt::guest(op::RST, 5000, 1234));
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn malformed_tx_packets_are_dropped_and_returned() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let good = Pkt::guest(op::REQUEST, 5000, 77);
    let hdr = g.alloc(HDR_LEN);
    mem.write_slice(&good.header_bytes(), GuestAddress(hdr))
        .unwrap();

    let chains: Vec<Vec<Buf>> = vec![
        // Header descriptor too short.
        vec![Buf::readable(hdr, 10)],
        // Device-writable TX buffer.
        vec![Buf::writable(hdr, HDR_LEN)],
        // Header outside guest memory.
        vec![Buf::readable(0x7fff_0000_0000, HDR_LEN)],
        // Header straddling the end of guest memory.
        vec![Buf::readable((16 << 20) - 20, HDR_LEN)],
    ];
    let n = chains.len();
    for chain in &chains {
        g.queues[TXQ].add_chain(chain);
    }
    // A header claiming more data than its data descriptor holds, and one claiming more than
    // the 64 KiB limit.
    for len in [100, 1 << 20] {
        let mut p = Pkt::guest(op::RW, 5000, 77);
        p.len = len;
        let h = g.alloc(HDR_LEN);
        mem.write_slice(&p.header_bytes(), GuestAddress(h)).unwrap();
        let d = g.alloc(16);
        g.queues[TXQ].add_chain(&[Buf::readable(h, HDR_LEN), Buf::readable(d, 10)]);
    }
    g.kick(TXQ);
    g.dev.process_events();
    let used = g.used_tx();
    assert_eq!(used.len(), n + 2, "every chain returned");
    assert!(used.iter().all(|&(_, len)| len == 0));

    // Wrong CIDs: dropped without an answer.
    let mut p = Pkt::guest(op::REQUEST, 5000, 77);
    p.src_cid = 9;
    g.send(&p);
    let mut p = Pkt::guest(op::REQUEST, 5000, 77);
    p.dst_cid = 1;
    g.send(&p);
    g.give_rx(4);
    assert!(g.recv().is_empty());

    // Unknown type and unknown op: answered with RST.
    let mut p = Pkt::guest(op::REQUEST, 5000, 77);
    p.type_ = 2;
    g.send(&p);
    g.send(&Pkt::guest(99, 5001, 77));
    // Data for a connection that does not exist.
    g.send(&Pkt::guest(op::RW, 5002, 77).with_data(b"x"));
    let pkts = g.recv();
    assert_eq!(pkts.len(), 3);
    assert!(pkts.iter().all(|p| p.op == op::RST));

    // The device still works.
    let listener = g.host_listener(1234);
    let mut host = g.connect_to_host(&listener, 6000, 1234);
    g.send(&Pkt::guest(op::RW, 6000, 1234).with_data(b"ok"));
    assert_eq!(read_exact_from(&mut host, 2), b"ok");
}

#[test]
fn malformed_rx_buffers_are_returned_empty() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    // A read-only RX buffer, then a too-short one.
    let a = g.alloc(HDR_LEN + 100);
    let h1 = g.queues[RXQ].add_chain(&[Buf::readable(a, HDR_LEN + 100)]);
    let h2 = g.queues[RXQ].add_chain(&[Buf::writable(a, 20)]);
    g.send(&Pkt::guest(op::REQUEST, 5000, 77));
    let used = g.queues[RXQ].take_used();
    assert_eq!(used, vec![(h1, 0), (h2, 0)]);
    // The RST still goes out in a good buffer.
    let pkt = g.recv_one();
    assert_eq!(pkt.op, op::RST);
}

#[test]
fn protocol_violations_reset_the_connection() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = g.host_listener(1234);
    let _host = g.connect_to_host(&listener, 5000, 1234);
    // A second REQUEST on an established connection.
    g.send(&Pkt::guest(op::REQUEST, 5000, 1234));
    assert_eq!(g.recv_one().op, op::RST);
    assert_eq!(g.dev.connection_count(), 0);

    // Data after the guest said it would send no more.
    let _host = g.connect_to_host(&listener, 5001, 1234);
    let mut shut = Pkt::guest(op::SHUTDOWN, 5001, 1234);
    shut.flags = SHUTDOWN_SEND;
    g.send(&shut);
    g.send(&Pkt::guest(op::RW, 5001, 1234).with_data(b"late"));
    assert_eq!(g.recv_one().op, op::RST);
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn reset_drops_connections_and_reactivation_works() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = g.host_listener(1234);
    let mut host = g.connect_to_host(&listener, 5000, 1234);
    g.dev.reset();
    assert_eq!(g.dev.connection_count(), 0);
    let mut buf = [0u8; 4];
    assert_eq!(host.read(&mut buf).unwrap(), 0, "host socket closed");

    g.activate();
    let mut host = g.connect_to_host(&listener, 5000, 1234);
    g.send(&Pkt::guest(op::RW, 5000, 1234).with_data(b"again"));
    assert_eq!(read_exact_from(&mut host, 5), b"again");
}

#[test]
fn event_queue_notifications_are_harmless() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    g.kick(EVQ);
    g.dev.process_events();
    assert!(g.recv().is_empty());
}

#[test]
fn host_client_gone_before_the_guest_answers() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let mut client = UnixStream::connect(g.uds()).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let req = g.recv_one();
    drop(client);
    // The device tells the guest to forget the half-open connection.
    let rst = g.recv_one();
    assert_eq!((rst.op, rst.src_port), (op::RST, req.src_port));
    assert_eq!(g.dev.connection_count(), 0);
    // A late RESPONSE is answered with RST too.
    g.send(&Pkt::guest(op::RESPONSE, 52, req.src_port));
    assert_eq!(g.recv_one().op, op::RST);
}

#[test]
fn host_data_waits_for_rx_buffers() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = g.host_listener(1234);
    let mut host = g.connect_to_host(&listener, 5000, 1234);
    host.write_all(b"queued").unwrap();
    for _ in 0..3 {
        assert!(g.recv().is_empty());
    }
    let pkt = g.recv_one();
    assert_eq!(pkt.data, b"queued");
    host.set_nonblocking(true).unwrap();
    let err = host.read(&mut [0u8; 4]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WouldBlock);
}

#[test]
fn credit_respecting_guest_streams_without_loss() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let listener = g.host_listener(1234);
    let mut host = g.connect_to_host(&listener, 5000, 1234);
    host.set_nonblocking(true).unwrap();
    let total: u32 = 2 << 20;
    let byte_at = |i: u32| u8::try_from(i % 251).unwrap();
    let (mut sent, mut received) = (0u32, 0u32);
    let (mut peer_buf_alloc, mut peer_fwd_cnt) = (CONN_BUF_SIZE, 0u32);
    let mut rounds = 0;
    while received < total {
        rounds += 1;
        assert!(
            rounds < 20_000,
            "stalled at sent {sent} received {received}"
        );
        // Send as the guest's credit allows.
        let credit = peer_buf_alloc - (sent - peer_fwd_cnt);
        let n = credit.min(64 * 1024).min(total - sent);
        if n > 0 {
            let data: Vec<u8> = (sent..sent + n).map(byte_at).collect();
            g.send(&Pkt::guest(op::RW, 5000, 1234).with_data(&data));
            sent += n;
        }
        // The host reads a little at a time.
        let mut buf = [0u8; 48 * 1024];
        match host.read(&mut buf) {
            Ok(k) => {
                let k32 = u32::try_from(k).unwrap();
                assert!(
                    buf[..k]
                        .iter()
                        .zip(received..)
                        .all(|(&b, i)| b == byte_at(i)),
                    "data corrupted"
                );
                received += k32;
            }
            Err(e) => assert_eq!(e.kind(), ErrorKind::WouldBlock),
        }
        g.give_rx(1);
        for p in g.recv() {
            assert_ne!(p.op, op::RST, "a credit-respecting guest is never reset");
            peer_buf_alloc = p.buf_alloc;
            peer_fwd_cnt = p.fwd_cnt;
        }
    }
    assert_eq!(received, total);
}

/// The driver's side of the transport: its register writes.
fn w(t: &mut MmioTransport, offset: u32, value: u32) {
    t.write(u64::from(offset), &value.to_le_bytes());
}

fn r(t: &mut MmioTransport, offset: u32) -> u32 {
    let mut data = [0; 4];
    t.read(u64::from(offset), &mut data);
    u32::from_le_bytes(data)
}

/// A vsock device behind its transport, started by the driver's initialisation sequence
/// with three queues in `mem`. Returns the transport, the device, the queues and the status.
fn started_through_mmio<'a>(
    mem: &'a GuestMemoryMmap,
    uds: &std::path::Path,
) -> (MmioTransport, Arc<Mutex<Vsock>>, Vec<TestQueue<'a>>, u32) {
    fn halves(addr: u64) -> (u32, u32) {
        let bytes = addr.to_le_bytes();
        (
            u32::from_le_bytes(bytes[..4].try_into().unwrap()),
            u32::from_le_bytes(bytes[4..].try_into().unwrap()),
        )
    }

    let vsock = Arc::new(Mutex::new(Vsock::new(GUEST_CID, uds).unwrap()));
    let shared: SharedDevice = vsock.clone();
    let mut t = MmioTransport::new(mem.clone(), shared).unwrap();
    assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_ID), 19);
    let mut cid = [0u8; 4];
    t.read(u64::from(reg::VIRTIO_MMIO_CONFIG), &mut cid);
    assert_eq!(u32::from_le_bytes(cid), 3);

    // The driver's initialisation sequence.
    let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    w(&mut t, reg::VIRTIO_MMIO_STATUS, status);
    status |= VIRTIO_CONFIG_S_DRIVER;
    w(&mut t, reg::VIRTIO_MMIO_STATUS, status);
    w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    let high = r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES);
    w(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES, high);
    status |= VIRTIO_CONFIG_S_FEATURES_OK;
    w(&mut t, reg::VIRTIO_MMIO_STATUS, status);
    let queues: Vec<TestQueue<'_>> = (0..3u64)
        .map(|i| TestQueue::new(mem, 0x1_0000 * (i + 1), QSIZE))
        .collect();
    for (i, q) in (0u32..).zip(&queues) {
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, i);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        for (lo, hi, addr) in [
            (
                reg::VIRTIO_MMIO_QUEUE_DESC_LOW,
                reg::VIRTIO_MMIO_QUEUE_DESC_HIGH,
                q.desc_table(),
            ),
            (
                reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                q.avail_ring(),
            ),
            (
                reg::VIRTIO_MMIO_QUEUE_USED_LOW,
                reg::VIRTIO_MMIO_QUEUE_USED_HIGH,
                q.used_ring(),
            ),
        ] {
            let (l, h) = halves(addr);
            w(&mut t, lo, l);
            w(&mut t, hi, h);
        }
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }
    status |= VIRTIO_CONFIG_S_DRIVER_OK;
    w(&mut t, reg::VIRTIO_MMIO_STATUS, status);
    assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), status);
    (t, vsock, queues, status)
}

/// The guest connects to host port 5000, where nothing listens: the device answers RST into
/// the RX buffer at `rx_addr`. The notification arrives as an MMIO write.
fn request_refused(
    mem: &GuestMemoryMmap,
    t: &mut MmioTransport,
    queues: &mut [TestQueue<'_>],
    rx_addr: u64,
) -> u16 {
    let rx_head = queues[RXQ].add_chain(&[Buf::writable(rx_addr, HDR_LEN + RX_DATA)]);
    let hdr_addr = 0x30_0000;
    mem.write_slice(
        &Pkt::guest(op::REQUEST, 5000, 77).header_bytes(),
        GuestAddress(hdr_addr),
    )
    .unwrap();
    queues[TXQ].add_chain(&[Buf::readable(hdr_addr, HDR_LEN)]);
    t.write(
        QUEUE_NOTIFY_OFFSET,
        &u32::try_from(TXQ).unwrap().to_le_bytes(),
    );
    rx_head
}

#[test]
fn vmm_polls_one_fd_and_drives_the_device_through_mmio() {
    let mem = guest_memory();
    let dir = TestDir::new();
    let (mut t, vsock, mut queues, _) = started_through_mmio(&mem, &dir.0.join("v.sock"));

    // The VMM's loop: one fd for the whole device.
    let outer = Epoll::new().unwrap();
    let vsock_fd = vsock.lock().unwrap().epoll_fd();
    outer
        .ctl(
            ControlOperation::Add,
            vsock_fd,
            EpollEvent::new(EventSet::IN, 7),
        )
        .unwrap();
    let mut events = [EpollEvent::default(); 4];
    assert_eq!(outer.wait(0, &mut events).unwrap(), 0, "idle");

    // The guest offers an RX buffer and connects to a port nobody serves; its notification
    // arrives as an MMIO write (no ioeventfd in this test).
    let rx_addr = 0x20_0000;
    let rx_head = request_refused(&mem, &mut t, &mut queues, rx_addr);

    assert_eq!(
        outer.wait(1000, &mut events).unwrap(),
        1,
        "vsock fd readable"
    );
    assert_eq!(events[0].data(), 7);
    vsock.lock().unwrap().process_events();
    assert_eq!(queues[TXQ].take_used().len(), 1);
    assert_eq!(queues[RXQ].take_used(), vec![(rx_head, HDR_LEN)]);
    let rst = Pkt::parse(&read_guest(&mem, rx_addr, 44));
    assert_eq!(rst.op, op::RST);
    assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    assert!(t.interrupt().irq_evt().read().unwrap() >= 1);
    w(&mut t, reg::VIRTIO_MMIO_INTERRUPT_ACK, 1);
    assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);

    // Reset through the status register stops the device.
    w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
    t.write(QUEUE_NOTIFY_OFFSET, &1u32.to_le_bytes());
    vsock.lock().unwrap().process_events();
    assert_eq!(
        outer.wait(0, &mut events).unwrap(),
        0,
        "queue fds left the set"
    );
}

#[test]
fn a_restored_device_goes_on_in_its_queues_and_resets_the_guests_connections() {
    let mem = guest_memory();
    let dir = TestDir::new();
    let (mut t, vsock, mut queues, status) = started_through_mmio(&mem, &dir.0.join("v.sock"));
    request_refused(&mem, &mut t, &mut queues, 0x20_0000);
    vsock.lock().unwrap().process_events();
    assert_eq!(queues[TXQ].take_used().len(), 1);
    assert_eq!(queues[RXQ].take_used().len(), 1);
    // Linux posts event buffers when the driver starts.
    let event_addr = 0x40_0000;
    mem.write_obj(0xffff_ffffu32, GuestAddress(event_addr))
        .unwrap();
    let event_head = queues[EVQ].add_chain(&[Buf::writable(event_addr, 4)]);
    assert!(vsock.lock().unwrap().reset_pending.not());

    // Saved, then restored onto another socket (what a template's next VM has).
    let state = t.save();
    let device_state = vsock.lock().unwrap().save();
    drop((t, vsock));
    let vsock = Arc::new(Mutex::new(
        Vsock::restore(dir.0.join("w.sock"), &device_state).unwrap(),
    ));
    let shared: SharedDevice = vsock.clone();
    let mut t = MmioTransport::restore((mem.clone(), shared), &state).unwrap();
    assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), status);
    assert!(dir.0.join("w.sock").exists());

    // The first turn of the event loop tells the guest its connections are gone.
    vsock.lock().unwrap().process_events();
    assert_eq!(queues[EVQ].take_used(), vec![(event_head, 4)]);
    assert_eq!(
        read_guest(&mem, event_addr, 4),
        [0; 4],
        "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );
    assert!(t.interrupt().irq_evt().read().unwrap() >= 1);

    // The queues go on from where the saved device left them.
    let rx_head = request_refused(&mem, &mut t, &mut queues, 0x50_0000);
    vsock.lock().unwrap().process_events();
    assert_eq!(queues[TXQ].take_used().len(), 1);
    assert_eq!(queues[RXQ].take_used(), vec![(rx_head, HDR_LEN)]);
    assert_eq!(Pkt::parse(&read_guest(&mem, 0x50_0000, 44)).op, op::RST);
}
