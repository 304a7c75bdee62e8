//! The `virtio_net` target: the net device's receive and transmit descriptor-chain walking as
//! a guest drives it. The tap is the seam the device's own tests use: a non-blocking datagram
//! socket pair (one frame per read and write, what the device needs of a tap fd), whose other
//! end the harness plays as the host's network. The device under test is the real one; only
//! `TUNSETOFFLOAD` has nothing to act on (the device logs that and goes on, as with a tap that
//! refuses offloads).
//!
//! Input: a queue-size byte, then operations (see `ops`). Host actions (`op::HOST`, the action
//! byte modulo 3): 0 `len: u16, bytes` a frame (virtio-net header included, as a tap with
//! `IFF_VNET_HDR` gives it) arrives from the host; 1 `n: u8` the host takes up to `n` frames the
//! device sent; 2 `count: u8, len: u16, bytes` the same frame arrives `count` times (fills the
//! socket: the device's back-pressure paths).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use super::driver::{self, Device};
use super::ops::{Input, Ops};
use crate::vmm::devices::virtio::net::{Net, Tap, VNET_HDR_LEN};

const MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];
const MTU: u32 = 1500;

/// The device and the host's end of its "tap".
pub(super) struct Harness {
    pub(super) dev: Arc<Mutex<Net>>,
    host: UnixDatagram,
}

impl Harness {
    pub(super) fn new() -> Self {
        let (ours, host) = UnixDatagram::pair().expect("a socket pair");
        ours.set_nonblocking(true).expect("non-blocking");
        host.set_nonblocking(true).expect("non-blocking");
        let tap = Tap::from_file(std::fs::File::from(OwnedFd::from(ours)), "fuzz0");
        let dev = Net::new(tap, MAC, MTU).expect("a net device");
        Self {
            dev: Arc::new(Mutex::new(dev)),
            host,
        }
    }
}

impl Device for Harness {
    fn process(&mut self) {
        driver::lock(&self.dev).process_events();
    }

    fn host_op(&mut self, op: u8, input: &mut Input<'_>) {
        match op % 3 {
            0 => {
                let len = input.u16();
                let _ = self.host.send(input.bytes(usize::from(len)));
            }
            1 => {
                let mut buf = vec![0; 70 * 1024];
                for _ in 0..input.u8() {
                    if self.host.recv(&mut buf).is_err() {
                        break;
                    }
                }
            }
            _ => {
                let count = input.u8();
                let len = input.u16();
                let frame = input.bytes(usize::from(len));
                for _ in 0..count {
                    if self.host.send(frame).is_err() {
                        break;
                    }
                }
            }
        }
    }
}

pub(super) fn run(data: &[u8]) {
    driver::run(data, Harness::new, |h| h.dev.clone());
}

// ---- Seeds -----------------------------------------------------------------------------------

const RXQ: u8 = 0;
const TXQ: u8 = 1;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`, `VIRTIO_NET_HDR_GSO_TCPV4`.
const NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;

/// A virtio-net header (`struct virtio_net_hdr_v1`).
fn net_header(
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
) -> Vec<u8> {
    let mut h = vec![flags, gso_type];
    h.extend_from_slice(&54u16.to_le_bytes()); // hdr_len: Ethernet + IPv4 + TCP
    h.extend_from_slice(&gso_size.to_le_bytes());
    h.extend_from_slice(&csum_start.to_le_bytes());
    h.extend_from_slice(&csum_offset.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // num_buffers
    assert_eq!(h.len(), VNET_HDR_LEN);
    h
}

/// An Ethernet frame of `len` bytes from the device's MAC to broadcast, IPv4 ethertype (cut
/// short, a runt, when `len` is under the 14 bytes of the Ethernet header).
fn ethernet(len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![fill; len.max(14)];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&MAC);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f.truncate(len);
    f
}

/// The guest offers `n` receive chains of `len` device-writable bytes, split in two
/// descriptors (header and frame apart, as some drivers do).
fn give_rx(ops: &mut Ops, n: usize, len: u32) {
    for _ in 0..n {
        let buf = ops.alloc(len);
        let hdr = u32::try_from(VNET_HDR_LEN).expect("12");
        ops.chain(RXQ, &[(buf, hdr, true), (buf + hdr, len - hdr, true)]);
    }
    ops.notify(RXQ);
}

/// The guest sends `frame` after `header`, in one descriptor or two.
fn send(ops: &mut Ops, header: &[u8], frame: &[u8], split: bool) {
    let len = |b: &[u8]| u32::try_from(b.len()).expect("small");
    if split {
        let h = ops.buf(header);
        let f = ops.buf(frame);
        ops.chain(TXQ, &[(h, len(header), false), (f, len(frame), false)]);
    } else {
        let both = [header, frame].concat();
        let b = ops.buf(&both);
        ops.chain(TXQ, &[(b, len(&both), false)]);
    }
    ops.notify(TXQ);
}

fn host_frame(ops: &mut Ops, header: &[u8], frame: &[u8]) {
    let bytes = [header, frame].concat();
    let len = u16::try_from(bytes.len()).expect("small");
    ops.host(0, &[&len.to_le_bytes()[..], &bytes].concat());
}

pub(super) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let plain = net_header(0, 0, 0, 0, 0);

    // Frames both ways: TX in one and in two descriptors, RX into split chains.
    let mut ops = Ops::new(&[6]);
    send(&mut ops, &plain, &ethernet(60, 0x11), false);
    send(&mut ops, &plain, &ethernet(1514, 0x22), true);
    ops.host(1, &[4]);
    give_rx(&mut ops, 2, 12 + 1514);
    host_frame(&mut ops, &plain, &ethernet(98, 0x33));
    host_frame(&mut ops, &plain, &ethernet(1514, 0x44));
    host_frame(&mut ops, &plain, &ethernet(64, 0x55));
    give_rx(&mut ops, 1, 12 + 1514);
    out.push(("both_ways", ops.finish()));

    // Offload headers: a checksum request and a TSO frame, negotiated (the harness acks every
    // offered feature); a received frame bigger than the guest's buffer; a runt.
    let mut ops = Ops::new(&[4]);
    send(
        &mut ops,
        &net_header(NEEDS_CSUM, 0, 0, 34, 16),
        &ethernet(74, 0x66),
        true,
    );
    send(
        &mut ops,
        &net_header(NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16),
        &ethernet(4000, 0x77),
        false,
    );
    send(&mut ops, &plain, &ethernet(10, 0x88), false);
    give_rx(&mut ops, 1, 12 + 100);
    host_frame(&mut ops, &plain, &ethernet(1514, 0x99));
    host_frame(
        &mut ops,
        &net_header(0, GSO_TCPV4, 1448, 0, 0),
        &ethernet(200, 0xaa),
    );
    // A dropped frame leaves the small buffer in place: one that fits takes it.
    host_frame(&mut ops, &plain, &ethernet(60, 0xab));
    give_rx(&mut ops, 1, 12 + 1514);
    host_frame(&mut ops, &plain, &ethernet(200, 0xac));
    ops.host(1, &[8]);
    out.push(("offloads_and_sizes", ops.finish()));

    // Malformed chains break the device: a TX chain with a device-writable buffer, an RX
    // chain with a device-readable one; the driver resets it and starts over.
    let mut ops = Ops::new(&[3]);
    let b = ops.buf(&[&plain[..], &ethernet(60, 1)].concat());
    ops.chain(TXQ, &[(b, 72, true)]);
    ops.notify(TXQ);
    ops.chain(RXQ, &[(b, 1526, false)]);
    ops.notify(RXQ);
    ops.mmio_write(0x70, 4, 0); // Status = 0: reset
    ops.init();
    send(&mut ops, &plain, &ethernet(60, 2), false);
    ops.chain(TXQ, &[(b, 8, false)]); // shorter than a header
    ops.notify(TXQ);
    out.push(("malformed_then_reset", ops.finish()));

    // Back pressure: the host stops reading while the guest sends, and floods the device
    // while the guest gives no buffers; then both drain.
    let mut ops = Ops::new(&[5]);
    for i in 0..24 {
        send(&mut ops, &plain, &ethernet(1514, i), i % 2 == 0);
    }
    let frame = [&plain[..], &ethernet(1514, 0xbb)].concat();
    let len = u16::try_from(frame.len()).expect("small");
    ops.host(2, &[&[200u8][..], &len.to_le_bytes(), &frame].concat());
    ops.host(1, &[255]);
    give_rx(&mut ops, 8, 12 + 1514);
    give_rx(&mut ops, 8, 12 + 1514);
    out.push(("back_pressure", ops.finish()));

    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::driver::{Driver, guest_memory, queue_size};
    use super::*;

    /// Runs a seed and returns the device's counters: (tx frames, tx dropped, rx frames, rx
    /// dropped).
    fn counters(seed: &str) -> (u64, u64, u64, u64) {
        let bytes = seeds().into_iter().find(|(n, _)| *n == seed).unwrap().1;
        let mut input = Input::new(&bytes);
        let size = queue_size(input.u8());
        let mut harness = Harness::new();
        let metrics = harness.dev.lock().unwrap().metrics();
        let mut driver = Driver::new(guest_memory(), harness.dev.clone());
        driver.init(size);
        driver.run(&mut input, &mut harness);
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        (
            get(&metrics.tx_frames),
            get(&metrics.tx_dropped),
            get(&metrics.rx_frames),
            get(&metrics.rx_dropped),
        )
    }

    /// The seeds reach the paths that move frames, not only the error paths.
    #[test]
    fn seeds_move_frames_both_ways() {
        assert_eq!(counters("both_ways"), (2, 0, 3, 0));
        let (tx, tx_dropped, rx, rx_dropped) = counters("offloads_and_sizes");
        assert!(tx >= 2 && tx_dropped >= 1, "tx {tx}, dropped {tx_dropped}");
        assert!(rx >= 1 && rx_dropped >= 1, "rx {rx}, dropped {rx_dropped}");
        let (tx, _, rx, _) = counters("back_pressure");
        assert!(tx >= 24 && rx >= 16, "tx {tx}, rx {rx}");
    }
}
