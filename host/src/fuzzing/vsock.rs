//! The `virtio_vsock` target: the vsock device as a guest and host clients see it.
//!
//! Input: a queue-size byte, then operations (see `ops`). Host actions (`op::HOST`, the action
//! byte modulo 7): 0 `port: u32` a host client connects to the device's socket and asks for
//! `CONNECT port`; 1 the host service on port 1024 accepts a guest-initiated connection; 2
//! `stream: u8, len: u16, bytes` a host socket writes; 3 `stream: u8` one reads what is
//! there; 4 `stream: u8` one shuts its write side; 5 `stream: u8` one closes; 6 `len: u8,
//! bytes` a host client sends an arbitrary handshake line.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use super::driver::{self, Device};
use super::ops::{DATA_START, Input, Ops};
use super::scratch::ScratchDir;
use crate::vmm::devices::virtio::vsock::Vsock;

const GUEST_CID: u64 = 3;
/// The host port with a listening service (`<uds>_1024`); other ports have none.
const SERVICE_PORT: u32 = 1024;
/// Host streams the harness keeps open at most.
const MAX_STREAMS: usize = 8;

/// The device and the host side around it.
pub(super) struct Harness {
    pub(super) dev: Arc<Mutex<Vsock>>,
    uds: std::path::PathBuf,
    service: UnixListener,
    streams: Vec<UnixStream>,
    // Last: removed after the device removed its socket.
    _dir: ScratchDir,
}

impl Harness {
    pub(super) fn new() -> Self {
        ignore_sigpipe();
        let dir = ScratchDir::new("vsock");
        let uds = dir.0.join("v.sock");
        let dev = Vsock::new(GUEST_CID, &uds).expect("a vsock device");
        let service = UnixListener::bind(dir.0.join(format!("v.sock_{SERVICE_PORT}")))
            .expect("the host service");
        service.set_nonblocking(true).expect("non-blocking");
        Self {
            dev: Arc::new(Mutex::new(dev)),
            uds,
            service,
            streams: Vec::new(),
            _dir: dir,
        }
    }

    fn stream(&mut self, input: &mut Input<'_>) -> Option<usize> {
        let n = self.streams.len();
        let i = usize::from(input.u8());
        (n > 0).then_some(i % n.max(1))
    }

    fn keep(&mut self, stream: UnixStream) {
        if self.streams.len() < MAX_STREAMS && stream.set_nonblocking(true).is_ok() {
            self.streams.push(stream);
        }
    }

    fn client(&mut self, line: &[u8]) {
        if let Ok(mut stream) = UnixStream::connect(&self.uds) {
            let _ = stream.write_all(line);
            self.keep(stream);
        }
    }
}

impl Device for Harness {
    fn process(&mut self) {
        driver::lock(&self.dev).process_events();
    }

    fn host_op(&mut self, op: u8, input: &mut Input<'_>) {
        match op % 7 {
            0 => {
                let port = input.u32();
                self.client(format!("CONNECT {port}\n").as_bytes());
            }
            1 => {
                if let Ok((stream, _)) = self.service.accept() {
                    self.keep(stream);
                }
            }
            2 => {
                let i = self.stream(input);
                let len = input.u16();
                let bytes = input.bytes(usize::from(len));
                if let Some(i) = i {
                    let _ = self.streams[i].write(bytes);
                }
            }
            3 => {
                if let Some(i) = self.stream(input) {
                    let mut buf = vec![0; 64 * 1024];
                    let _ = self.streams[i].read(&mut buf);
                }
            }
            4 => {
                if let Some(i) = self.stream(input) {
                    let _ = self.streams[i].shutdown(Shutdown::Write);
                }
            }
            5 => {
                if let Some(i) = self.stream(input) {
                    self.streams.swap_remove(i);
                }
            }
            _ => {
                let len = input.u8();
                let line = input.bytes(usize::from(len)).to_vec();
                self.client(&line);
            }
        }
    }
}

/// The device relies on `SIGPIPE` being ignored, as Rust's runtime does before the husk
/// binary's `main` (see the vsock module docs): a write to a host socket whose reader has gone
/// must fail with `EPIPE`. A fuzz binary's `main` is libFuzzer's, which leaves the default
/// (terminate), so the harness sets what the monitor runs with.
fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: SIG_IGN installs no handler code; nothing else in the process depends on
        // SIGPIPE's disposition.
        let previous = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        assert_ne!(previous, libc::SIG_ERR, "ignore SIGPIPE");
    });
}

pub(super) fn run(data: &[u8]) {
    driver::run(data, Harness::new, |h| h.dev.clone());
}

// ---- Seeds -----------------------------------------------------------------------------------

const RXQ: u8 = 0;
const TXQ: u8 = 1;
const EVQ: u8 = 2;
const HOST_CID: u64 = husk_proto::HOST_CID as u64;
/// The first local port the device gives host-initiated connections.
const LOCAL_PORT_FIRST: u32 = 1 << 30;

mod vop {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// A packet header from the guest's `src` port to host port `dst`.
fn header(op: u16, src: u32, dst: u32, len: u32, flags: u32) -> [u8; 44] {
    let mut raw = [0u8; 44];
    raw[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
    raw[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
    raw[16..20].copy_from_slice(&src.to_le_bytes());
    raw[20..24].copy_from_slice(&dst.to_le_bytes());
    raw[24..28].copy_from_slice(&len.to_le_bytes());
    raw[28..30].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_VSOCK_TYPE_STREAM
    raw[30..32].copy_from_slice(&op.to_le_bytes());
    raw[32..36].copy_from_slice(&flags.to_le_bytes());
    raw[36..40].copy_from_slice(&(64 * 1024u32).to_le_bytes()); // buf_alloc
    raw
}

/// The guest sends a packet: header and data in separate descriptors.
fn send(ops: &mut Ops, op: u16, src: u32, dst: u32, data: &[u8], flags: u32) {
    let len = u32::try_from(data.len()).expect("small");
    let hdr = ops.buf(&header(op, src, dst, len, flags));
    if data.is_empty() {
        ops.chain(TXQ, &[(hdr, 44, false)]);
    } else {
        let buf = ops.buf(data);
        ops.chain(TXQ, &[(hdr, 44, false), (buf, len, false)]);
    }
    ops.notify(TXQ);
}

/// The guest offers `n` RX buffers of one descriptor each.
fn give_rx(ops: &mut Ops, n: usize) {
    for _ in 0..n {
        let buf = ops.alloc(44 + 4096);
        ops.chain(RXQ, &[(buf, 44 + 4096, true)]);
    }
    ops.notify(RXQ);
}

pub(super) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();

    // The guest connects to the host service, both sides talk, the guest shuts down.
    let mut ops = Ops::new(&[6]);
    give_rx(&mut ops, 4);
    send(&mut ops, vop::REQUEST, 5000, SERVICE_PORT, &[], 0);
    ops.host(1, &[]);
    send(&mut ops, vop::RW, 5000, SERVICE_PORT, b"hello host", 0);
    ops.host(3, &[0]);
    ops.host(2, &[&[0u8, 11, 0][..], b"hello guest"].concat());
    give_rx(&mut ops, 2);
    send(&mut ops, vop::CREDIT_REQUEST, 5000, SERVICE_PORT, &[], 0);
    send(&mut ops, vop::SHUTDOWN, 5000, SERVICE_PORT, &[], 3);
    send(&mut ops, vop::RST, 5000, SERVICE_PORT, &[], 0);
    out.push(("guest_connects", ops.finish()));

    // A host client connects to guest port 52; the guest accepts and gets data.
    let mut ops = Ops::new(&[4]);
    give_rx(&mut ops, 2);
    ops.host(0, &52u32.to_le_bytes());
    send(&mut ops, vop::RESPONSE, 52, LOCAL_PORT_FIRST, &[], 0);
    ops.host(2, &[&[0u8, 4, 0][..], b"ping"].concat());
    give_rx(&mut ops, 2);
    send(&mut ops, vop::CREDIT_UPDATE, 52, LOCAL_PORT_FIRST, &[], 0);
    ops.host(4, &[0]);
    give_rx(&mut ops, 1);
    ops.host(5, &[0]);
    give_rx(&mut ops, 1);
    out.push(("host_connects", ops.finish()));

    // Nothing listens on the port: the device answers RST; a malformed handshake line.
    let mut ops = Ops::new(&[3]);
    send(&mut ops, vop::REQUEST, 6000, 7777, &[], 0);
    give_rx(&mut ops, 1);
    ops.host(6, b"\x09CONNECT\n\n");
    out.push(("refused_and_bad_line", ops.finish()));

    // Malformed TX: a short header, a write-only header, a header claiming more data.
    let mut ops = Ops::new(&[2]);
    let hdr = ops.buf(&header(vop::RW, 1, SERVICE_PORT, 9000, 0));
    ops.chain(TXQ, &[(hdr, 20, false)]);
    ops.chain(TXQ, &[(hdr, 44, true)]);
    ops.chain(TXQ, &[(hdr, 44, false), (DATA_START + 0x8000, 16, false)]);
    ops.notify(TXQ);
    ops.chain(EVQ, &[(DATA_START + 0x9000, 8, true)]);
    ops.notify(EVQ);
    out.push(("malformed_tx", ops.finish()));

    // The driver resets the device with a connection open and comes back.
    let mut ops = Ops::new(&[5]);
    give_rx(&mut ops, 2);
    send(&mut ops, vop::REQUEST, 5001, SERVICE_PORT, &[], 0);
    ops.host(1, &[]);
    ops.mmio_write(0x70, 4, 0); // Status = 0: reset
    ops.init();
    give_rx(&mut ops, 2);
    send(&mut ops, vop::RW, 5001, SERVICE_PORT, b"after reset", 0);
    out.push(("reset_midway", ops.finish()));

    out
}
