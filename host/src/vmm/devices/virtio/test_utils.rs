//! Test helpers: real guest memory with split queues laid out in it, the way a driver would.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// 16 MiB of guest memory at guest physical 0.
pub(crate) fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buf {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub write: bool,
}

impl Buf {
    pub(crate) fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }

    pub(crate) fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// A split queue in guest memory that the test drives as the driver: it adds chains to the
/// available ring and reads back the used ring.
pub(crate) struct TestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    size: u16,
    next_desc: u16,
    used_seen: u16,
}

impl<'a> TestQueue<'a> {
    /// A queue of `size` entries whose descriptor table starts at `start` (16-byte aligned and
    /// not 0: virtio-queue treats an avail ring at 0 as "not configured").
    pub(crate) fn new(mem: &'a GuestMemoryMmap, start: u64, size: u16) -> Self {
        Self {
            mem,
            mock: MockSplitQueue::create(mem, GuestAddress(start), size),
            size,
            next_desc: 0,
            used_seen: 0,
        }
    }

    /// The device side of this queue, ready.
    pub(crate) fn queue(&self) -> Queue {
        self.mock.create_queue::<Queue>().unwrap()
    }

    pub(crate) fn desc_table(&self) -> u64 {
        self.mock.desc_table_addr().0
    }

    pub(crate) fn avail_ring(&self) -> u64 {
        self.mock.avail_addr().0
    }

    pub(crate) fn used_ring(&self) -> u64 {
        self.mock.used_addr().0
    }

    /// Makes `bufs` available as one chain; returns its head index.
    pub(crate) fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let n = u16::try_from(bufs.len()).unwrap();
        if self.next_desc + n > self.size {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let i = u16::try_from(i).unwrap();
                let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
                if i + 1 < n {
                    flags |= VRING_DESC_F_NEXT;
                }
                let flags = u16::try_from(flags).unwrap();
                RawDescriptor::from(Descriptor::new(b.addr, b.len, flags, head + i + 1))
            })
            .collect();
        for (i, desc) in (head..).zip(descs) {
            self.mock.desc_table().store(i, desc).unwrap();
        }
        // The avail ring: flags (u16), idx (u16), ring[size] (u16 each).
        let avail = self.mock.avail_addr().0;
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap();
        let slot = u64::from(idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
        self.next_desc += n;
        head
    }

    /// The used ring's index.
    pub(crate) fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }

    /// Used elements the device added since the last call, as (head, len).
    pub(crate) fn take_used(&mut self) -> Vec<(u16, u32)> {
        let idx = self.used_idx();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = usize::from(self.used_seen % self.size);
            let elem = self.mock.used().ring().ref_at(slot).unwrap().load();
            out.push((u16::try_from(elem.id()).unwrap(), elem.len()));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// Reads `len` bytes of guest memory at `addr`.
pub(crate) fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}
