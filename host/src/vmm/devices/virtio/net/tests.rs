//! The device against queues laid out in real guest memory, with a datagram socket pair
//! standing in for the tap (one frame per read and write, non-blocking: what the device needs
//! of a tap fd) and, as root, a real tap in a private network namespace.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::frame::tap_offloads;
use super::*;
use crate::vmm::devices::virtio::test_utils::{Buf, TestQueue, guest_memory, read_guest};
use crate::vmm::devices::virtio::{DeviceQueue, Interrupt, InterruptKind, VirtioDevice};

const MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];
const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x8000;
const DATA: u64 = 0x10_0000;

/// An Ethernet frame of `len` bytes (header included) with a recognisable payload.
fn frame(len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![fill; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&MAC);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

struct Harness<'a> {
    mem: &'a GuestMemoryMmap,
    dev: Net,
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    irq: Arc<Interrupt>,
    /// The "host side" of the tap.
    peer: UnixDatagram,
    next_data: u64,
}

impl<'a> Harness<'a> {
    /// A device whose driver negotiated no offloads.
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self::with_features(mem, VIRTIO_F_VERSION_1)
    }

    fn with_features(mem: &'a GuestMemoryMmap, features: u64) -> Self {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        let tap = Tap::from_file(std::fs::File::from(OwnedFd::from(ours)), "test0");
        Self::with_tap(mem, tap, peer, features)
    }

    fn with_tap(mem: &'a GuestMemoryMmap, tap: Tap, peer: UnixDatagram, features: u64) -> Self {
        let mut dev = Net::new(tap, MAC, 1500).unwrap();
        dev.ack_features(features);
        let rx = TestQueue::new(mem, RX_RING, 256);
        let tx = TestQueue::new(mem, TX_RING, 256);
        let irq = Arc::new(Interrupt::new().unwrap());
        let queues = vec![
            DeviceQueue {
                queue: rx.queue(),
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
            DeviceQueue {
                queue: tx.queue(),
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
        ];
        dev.activate(mem.clone(), irq.clone(), queues).unwrap();
        Self {
            mem,
            dev,
            rx,
            tx,
            irq,
            peer,
            next_data: DATA,
        }
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let addr = self.next_data;
        self.next_data += (len as u64).div_ceil(16) * 16 + 16;
        addr
    }

    /// Queues `bytes` for transmission, split into buffers of at most `split` bytes.
    fn send(&mut self, bytes: &[u8], split: usize) -> u16 {
        let mut bufs = Vec::new();
        for chunk in bytes.chunks(split) {
            let addr = self.alloc(chunk.len());
            self.mem.write_slice(chunk, GuestAddress(addr)).unwrap();
            bufs.push(Buf::readable(addr, u32::try_from(chunk.len()).unwrap()));
        }
        self.tx.add_chain(&bufs)
    }

    /// Adds an RX chain of buffers of the given sizes; returns (head, addresses).
    fn add_rx(&mut self, sizes: &[u32]) -> (u16, Vec<(u64, u32)>) {
        let bufs: Vec<Buf> = sizes
            .iter()
            .map(|&s| Buf::writable(self.alloc(s as usize), s))
            .collect();
        let head = self.rx.add_chain(&bufs);
        (head, bufs.iter().map(|b| (b.addr, b.len)).collect())
    }

    fn received(&self, bufs: &[(u64, u32)], len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for &(addr, size) in bufs {
            let n = (len - out.len()).min(size as usize);
            out.extend(read_guest(self.mem, addr, n));
        }
        out
    }

    fn peer_frames(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        while let Ok(n) = self.peer.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }
}

fn with_header(frame: &[u8], flags: u8) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    v[0] = flags;
    v.extend_from_slice(frame);
    v
}

#[test]
fn config_space_holds_mac_status_and_mtu() {
    let mem = guest_memory();
    let h = Harness::new(&mem);
    let mut cfg = [0u8; CONFIG_LEN];
    h.dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500);
    let features = h.dev.avail_features();
    for bit in [VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS] {
        assert_ne!(features & (1 << bit), 0, "feature {bit}");
    }
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    assert_eq!(features & OFFLOAD_FEATURES, OFFLOAD_FEATURES);
    // One buffer per frame: no MRG_RXBUF (15); no UFO (10, 14), no ECN (9, 13), no CTRL_VQ (17).
    for bit in [9, 10, 13, 14, 15, 17] {
        assert_eq!(features & (1 << bit), 0, "feature {bit}");
    }
}

/// A header with `flags`, `gso_type`, and made-up lengths and offsets that must survive.
fn offload_header(flags: u8, gso: u8) -> Vec<u8> {
    let mut h = vec![flags, gso];
    for v in [54u16, 1448, 34, 16, 0] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h
}

#[test]
fn negotiated_offloads_pass_headers_through_both_ways() {
    let mem = guest_memory();
    let mut h = Harness::with_features(&mem, VIRTIO_F_VERSION_1 | OFFLOAD_FEATURES);
    let big = frame(9000, 4);
    // Guest to host: a TSO frame with a checksum to do.
    let mut tx = offload_header(1, 1);
    tx.extend_from_slice(&big);
    h.send(&tx, 4096);
    // Host to guest: a TSO6 frame whose checksum is verified, and one UDP-fragmentation frame
    // (never offered), dropped.
    let (head, bufs) = h.add_rx(&[12, 65550]);
    let mut udp = offload_header(0, 3);
    udp.extend_from_slice(&frame(100, 5));
    h.peer.send(&udp).unwrap();
    let mut rx = offload_header(2, 4);
    rx.extend_from_slice(&big);
    h.peer.send(&rx).unwrap();
    h.dev.process_events();
    assert_eq!(h.peer_frames(), vec![tx]);
    let len = VNET_HDR_LEN + big.len();
    assert_eq!(h.rx.take_used(), vec![(head, u32::try_from(len).unwrap())]);
    let mut want = rx.clone();
    want[10] = 1; // num_buffers
    assert_eq!(h.received(&bufs, len), want);
    assert_eq!(h.dev.metrics().rx_dropped.load(Ordering::Relaxed), 1);
}

#[test]
fn the_tap_offloads_follow_the_receive_features() {
    let all = VIRTIO_F_VERSION_1 | OFFLOAD_FEATURES;
    assert_eq!(
        tap_offloads(all),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
    // TSO without a checksum offload is refused by the kernel: none then.
    assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM)), libc::TUN_F_CSUM);
    // Host-side features (what the guest may send) do not matter to the tap's reads.
    assert_eq!(
        tap_offloads(bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4)),
        0
    );
}

#[test]
fn bad_mac_or_mtu_is_refused() {
    let (a, _b) = UnixDatagram::pair().unwrap();
    let tap = || {
        Tap::from_file(
            std::fs::File::from(OwnedFd::from(a.try_clone().unwrap())),
            "t",
        )
    };
    assert!(matches!(
        Net::new(tap(), [1, 0, 0, 0, 0, 1], 1500),
        Err(NetError::Mac(_))
    ));
    assert!(matches!(
        Net::new(tap(), [0; 6], 1500),
        Err(NetError::Mac(_))
    ));
    assert!(matches!(Net::new(tap(), MAC, 67), Err(NetError::Mtu(67))));
    assert!(matches!(
        Net::new(tap(), MAC, 70_000),
        Err(NetError::Mtu(_))
    ));
}

#[test]
fn tx_chains_reach_the_tap_as_one_frame_each() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let f1 = frame(60, 0xa1);
    let f2 = frame(1514, 0xb2);
    let head1 = h.send(&with_header(&f1, 0), VNET_HDR_LEN);
    let head2 = h.send(&with_header(&f2, 0), 500);
    h.dev.process_events();
    let got = h.peer_frames();
    assert_eq!(got, vec![with_header(&f1, 0), with_header(&f2, 0)]);
    assert_eq!(h.tx.take_used(), vec![(head1, 0), (head2, 0)]);
    assert_ne!(h.irq.status() & InterruptKind::Vring as u32, 0);
    let m = h.dev.metrics();
    assert_eq!(m.tx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(m.tx_bytes.load(Ordering::Relaxed), 60 + 1514);
}

#[test]
fn tx_frames_asking_for_offloads_or_too_short_are_dropped() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let head1 = h.send(&with_header(&frame(60, 1), 1), 4096);
    let head2 = h.send(&with_header(&[0u8; 10], 0), 4096);
    let f = frame(60, 3);
    let head3 = h.send(&with_header(&f, 0), 4096);
    h.dev.process_events();
    assert_eq!(h.peer_frames(), vec![with_header(&f, 0)]);
    assert_eq!(h.tx.take_used(), vec![(head1, 0), (head2, 0), (head3, 0)]);
    assert_eq!(h.dev.metrics().tx_dropped.load(Ordering::Relaxed), 2);
    assert!(!h.dev.needs_reset());
}

#[test]
fn a_full_tap_holds_one_frame_and_stops_tx_until_writable() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    // Fill the peer's receive queue through the device's own fd.
    let filler = frame(60, 0xee);
    let mut filled = 0;
    while h
        .dev
        .tap
        .as_ref()
        .unwrap()
        .write_frame(&with_header(&filler, 0))
        .is_ok()
    {
        filled += 1;
    }
    assert!(filled > 0);
    let f1 = frame(100, 1);
    let f2 = frame(100, 2);
    let head1 = h.send(&with_header(&f1, 0), 4096);
    let head2 = h.send(&with_header(&f2, 0), 4096);
    h.dev.process_events();
    // The first chain was taken (and returned) and its frame waits in the device; the second
    // stays in the ring.
    assert_eq!(h.tx.take_used(), vec![(head1, 0)]);
    assert_eq!(h.dev.tx_len, VNET_HDR_LEN + 100);
    // The host reads everything; the device catches up in order.
    let got = h.peer_frames();
    assert_eq!(got.len(), filled);
    h.dev.process_events();
    assert_eq!(h.tx.take_used(), vec![(head2, 0)]);
    assert_eq!(
        h.peer_frames(),
        vec![with_header(&f1, 0), with_header(&f2, 0)]
    );
    assert_eq!(h.dev.metrics().tx_dropped.load(Ordering::Relaxed), 0);
}

#[test]
fn tap_frames_fill_rx_chains_with_a_clean_header() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let (head, bufs) = h.add_rx(&[12, 1000, 1000]);
    let f = frame(1514, 0x5a);
    // DATA_VALID (2) from the tap is not passed on: GUEST_CSUM was not negotiated.
    h.peer.send(&with_header(&f, 2)).unwrap();
    h.dev.process_events();
    let used = h.rx.take_used();
    assert_eq!(
        used,
        vec![(head, u32::try_from(VNET_HDR_LEN + 1514).unwrap())]
    );
    let got = h.received(&bufs, VNET_HDR_LEN + 1514);
    let mut want = vec![0u8; VNET_HDR_LEN];
    want[10] = 1; // num_buffers
    want.extend_from_slice(&f);
    assert_eq!(got, want);
    assert_ne!(h.irq.status() & InterruptKind::Vring as u32, 0);
    assert_eq!(h.dev.metrics().rx_frames.load(Ordering::Relaxed), 1);
}

#[test]
fn without_rx_buffers_one_frame_waits_and_the_rest_stay_in_the_tap() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let (f1, f2) = (frame(64, 1), frame(64, 2));
    h.peer.send(&with_header(&f1, 0)).unwrap();
    h.peer.send(&with_header(&f2, 0)).unwrap();
    h.dev.process_events();
    assert_eq!(h.dev.rx_len, VNET_HDR_LEN + 64);
    assert!(h.rx.take_used().is_empty());
    // The guest adds buffers and notifies.
    let (head1, bufs1) = h.add_rx(&[2048]);
    let (head2, bufs2) = h.add_rx(&[2048]);
    h.dev.process_events();
    let len = u32::try_from(VNET_HDR_LEN + 64).unwrap();
    assert_eq!(h.rx.take_used(), vec![(head1, len), (head2, len)]);
    assert_eq!(
        &h.received(&bufs1, VNET_HDR_LEN + 64)[VNET_HDR_LEN..],
        &f1[..]
    );
    assert_eq!(
        &h.received(&bufs2, VNET_HDR_LEN + 64)[VNET_HDR_LEN..],
        &f2[..]
    );
}

#[test]
fn a_frame_larger_than_the_rx_buffer_is_dropped_and_the_buffer_reused() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let (head, bufs) = h.add_rx(&[200]);
    let small = frame(100, 7);
    h.peer.send(&with_header(&frame(1000, 6), 0)).unwrap();
    h.peer.send(&with_header(&small, 0)).unwrap();
    // A frame with a checksum left to do cannot come from an offload-free tap: dropped.
    h.peer.send(&with_header(&frame(60, 8), 1)).unwrap();
    h.dev.process_events();
    assert_eq!(
        h.rx.take_used(),
        vec![(head, u32::try_from(VNET_HDR_LEN + 100).unwrap())]
    );
    assert_eq!(
        &h.received(&bufs, VNET_HDR_LEN + 100)[VNET_HDR_LEN..],
        &small[..]
    );
    assert_eq!(h.dev.metrics().rx_dropped.load(Ordering::Relaxed), 2);
}

#[test]
fn a_malformed_tx_chain_breaks_the_device_until_reset() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    // A device-writable buffer in a TX chain.
    let addr = h.alloc(100);
    h.tx.add_chain(&[Buf::readable(addr, 12), Buf::writable(addr + 16, 64)]);
    let f = frame(60, 1);
    h.send(&with_header(&f, 0), 4096);
    h.dev.process_events();
    assert!(h.dev.needs_reset());
    assert_ne!(h.irq.status() & InterruptKind::Config as u32, 0);
    assert!(h.peer_frames().is_empty());
    // Broken: nothing moves, even what is valid.
    h.dev.process_events();
    assert!(h.peer_frames().is_empty());
    h.dev.reset();
    assert!(!h.dev.needs_reset());
}

#[test]
fn malformed_rx_chains_and_guest_memory_escapes_break_the_device() {
    let mem = guest_memory();
    // A device-readable buffer in an RX chain.
    let mut h = Harness::new(&mem);
    let addr = h.alloc(2048);
    h.rx.add_chain(&[Buf::readable(addr, 2048)]);
    h.peer.send(&with_header(&frame(60, 1), 0)).unwrap();
    h.dev.process_events();
    assert!(h.dev.needs_reset());
    // An RX buffer outside guest memory (16 MiB).
    let mut h = Harness::new(&mem);
    h.rx.add_chain(&[Buf::writable(0x2000_0000, 2048)]);
    h.peer.send(&with_header(&frame(60, 1), 0)).unwrap();
    h.dev.process_events();
    assert!(h.dev.needs_reset());
    // A TX chain longer than the largest frame.
    let mut h = Harness::new(&mem);
    h.tx.add_chain(&[Buf::readable(
        DATA,
        u32::try_from(MAX_FRAME_LEN + 1).unwrap(),
    )]);
    h.dev.process_events();
    assert!(h.dev.needs_reset());
}

#[test]
fn the_budget_leaves_work_for_the_next_turn() {
    let mem = guest_memory();
    let mut h = Harness::new(&mem);
    let f = frame(60, 1);
    for _ in 0..MAX_FRAMES_PER_CALL + 3 {
        h.send(&with_header(&f, 0), 4096);
    }
    h.dev.process_events();
    assert_eq!(h.peer_frames().len(), MAX_FRAMES_PER_CALL);
    // The device re-armed itself: its epoll fd is readable again.
    let mut events = [EpollEvent::default(); 4];
    assert!(h.dev.epoll.wait(0, &mut events).unwrap() > 0);
    h.dev.process_events();
    assert_eq!(h.peer_frames().len(), 3);
}

/// A real tap in a private network namespace: the guest sends an ARP request for the tap's
/// address and receives the kernel's ARP reply.
#[test]
fn arp_through_a_real_tap() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED: needs root and /dev/net/tun");
        return;
    }
    std::thread::spawn(|| {
        // Only this thread moves to a new namespace; the tap and the netlink socket are made
        // there.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let tap = Tap::open("tap0_test").unwrap();
        let nl = crate::monitor::network::netlink::Netlink::open().unwrap();
        let index = nl
            .links()
            .unwrap()
            .into_iter()
            .find(|l| l.name == "tap0_test")
            .unwrap()
            .index;
        nl.add_address(
            index,
            &crate::monitor::network::netlink::Address {
                addr: "10.77.0.1".parse().unwrap(),
                prefix_len: 24,
            },
        )
        .unwrap();
        nl.set_up(index, 1500).unwrap();
        let mem = guest_memory();
        let (_unused, peer) = UnixDatagram::pair().unwrap();
        // All offloads negotiated: the device sets them on the real tap.
        let mut h = Harness::with_tap(&mem, tap, peer, VIRTIO_F_VERSION_1 | OFFLOAD_FEATURES);
        // ARP request: who has 10.77.0.1? tell 10.77.0.2 (our MAC).
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&MAC);
        arp.extend_from_slice(&[10, 77, 0, 2]);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&[10, 77, 0, 1]);
        arp.resize(60, 0);
        let (_, bufs) = h.add_rx(&[2048]);
        h.send(&with_header(&arp, 0), 4096);
        // The reply comes back through the kernel asynchronously; wait on the device's epoll
        // fd (the tap turning readable), a bounded number of times.
        let mut reply = None;
        for _ in 0..100 {
            h.dev.process_events();
            if let Some(&(_, len)) = h.rx.take_used().first() {
                reply = Some(h.received(&bufs, len as usize));
                break;
            }
            let mut events = [EpollEvent::default(); 4];
            let _ = h.dev.epoll.wait(100, &mut events);
        }
        let reply = reply.expect("the kernel's ARP reply never reached the guest");
        let eth = &reply[VNET_HDR_LEN..];
        assert_eq!(&eth[..6], &MAC, "to us");
        assert_eq!(&eth[12..14], &[0x08, 0x06], "ARP");
        assert_eq!(&eth[20..22], &[0, 2], "a reply");
        assert_eq!(&eth[28..32], &[10, 77, 0, 1], "for the tap's address");
        assert_eq!(h.dev.metrics().tx_frames.load(Ordering::Relaxed), 1);
    })
    .join()
    .unwrap();
}

#[test]
fn a_restored_slot_takes_the_new_vms_mac_and_a_spare_one_drops_what_it_is_sent() {
    let mem = guest_memory();
    let h = Harness::new(&mem);
    let state = h.dev.save();
    assert_eq!(
        state,
        NetState {
            mac: MAC,
            mtu: 1500
        }
    );
    let other = [0x02, 0, 0, 0, 0, 0x42];
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let tap = Tap::from_file(std::fs::File::from(OwnedFd::from(ours)), "test1");
    let restored = Net::restore((Some(tap), other, 9000), &state).unwrap();
    assert_eq!(
        restored.save(),
        NetState {
            mac: other,
            mtu: 9000
        }
    );
    drop(peer);

    // Without a tap the guest's frames go nowhere (and are counted), and nothing arrives.
    let mut spare = Net::restore((None, other, 1500), &state).unwrap();
    spare.ack_features(VIRTIO_F_VERSION_1);
    let mut tx = TestQueue::new(&mem, TX_RING, 256);
    let rx = TestQueue::new(&mem, RX_RING, 256);
    let queues = [&rx, &tx]
        .map(|q| DeviceQueue {
            queue: q.queue(),
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        })
        .into();
    spare
        .activate(mem.clone(), Arc::new(Interrupt::new().unwrap()), queues)
        .unwrap();
    let frame = with_header(&frame(60, 7), 0);
    mem.write_slice(&frame, GuestAddress(DATA)).unwrap();
    let head = tx.add_chain(&[Buf::readable(DATA, u32::try_from(frame.len()).unwrap())]);
    spare.process_events();
    assert_eq!(tx.take_used(), vec![(head, 0)]);
    assert_eq!(spare.metrics().tx_dropped.load(Ordering::Relaxed), 1);
}
