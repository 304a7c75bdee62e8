//! The format of the device fuzz inputs: a prefix the target reads first, then a sequence of
//! operations, each an opcode byte (taken modulo [`op::COUNT`]) and its arguments. Numbers are
//! little endian; an input that ends early reads as zeros, so every byte string is a valid
//! program. [`Ops`] writes programs for the seed corpora and [`Input`] reads them.

/// Where buffers go in guest memory (seeds allocate from here up; the driver keeps its queues
/// below).
pub(super) const DATA_START: u32 = 0x4_0000;

/// Opcodes.
pub(super) mod op {
    /// `addr: u32, len: u16, bytes`: write bytes into guest memory (`addr` modulo the span).
    pub const WRITE_MEM: u8 = 0;
    /// `queue: u8, count: u8, count+1 times (addr: u32, len: u32, flags: u16)`: lay out a
    /// descriptor chain in the queue's table (`NEXT` and `next` set by the harness for all but
    /// the last descriptor) and publish its head in the available ring.
    pub const CHAIN: u8 = 1;
    /// `queue: u8`: the driver writes `QueueNotify`; then the device runs.
    pub const NOTIFY: u8 = 2;
    /// `offset: u16, width: u8, value: u64`: an MMIO write of `1 << (width % 4)` bytes.
    pub const MMIO_WRITE: u8 = 3;
    /// `offset: u16, width: u8`: an MMIO read.
    pub const MMIO_READ: u8 = 4;
    /// The whole driver initialisation sequence again (reset, features, queues, DRIVER_OK).
    pub const INIT: u8 = 5;
    /// `op: u8, ...`: a host-side action of the device's harness; then the device runs.
    pub const HOST: u8 = 6;
    /// Number of opcodes.
    pub const COUNT: u8 = 7;
}

/// A reader over the fuzzer's bytes that never fails: past the end it reads zeros.
pub(super) struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub(super) fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let bytes = self.bytes(N);
        out[..bytes.len()].copy_from_slice(bytes);
        out
    }

    pub(super) fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub(super) fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub(super) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub(super) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Writes an input program (for seeds). Buffers it allocates come from the data area of
/// guest memory, in order.
pub(super) struct Ops {
    bytes: Vec<u8>,
    next_data: u32,
}

impl Ops {
    /// A program that starts with the target's `prefix`.
    pub(super) fn new(prefix: &[u8]) -> Self {
        Self {
            bytes: prefix.to_vec(),
            next_data: DATA_START,
        }
    }

    pub(super) fn finish(self) -> Vec<u8> {
        self.bytes
    }

    fn put(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self
    }

    /// `len` bytes of the data area, 16-byte aligned.
    pub(super) fn alloc(&mut self, len: u32) -> u32 {
        let addr = self.next_data;
        self.next_data += len.next_multiple_of(16);
        addr
    }

    /// Allocates a buffer holding `data`; returns its address.
    pub(super) fn buf(&mut self, data: &[u8]) -> u32 {
        let addr = self.alloc(u32::try_from(data.len()).expect("a small seed buffer"));
        self.write_mem(addr, data);
        addr
    }

    pub(super) fn write_mem(&mut self, addr: u32, data: &[u8]) -> &mut Self {
        let len = u16::try_from(data.len()).expect("a small seed buffer");
        self.put(&[op::WRITE_MEM])
            .put(&addr.to_le_bytes())
            .put(&len.to_le_bytes())
            .put(data)
    }

    /// A chain of (addr, len, device-writable) buffers on `queue`.
    pub(super) fn chain(&mut self, queue: u8, descs: &[(u32, u32, bool)]) -> &mut Self {
        let count = u8::try_from(descs.len() - 1).expect("a short chain");
        self.put(&[op::CHAIN, queue, count]);
        for &(addr, len, write) in descs {
            let flags: u16 = if write { 2 } else { 0 };
            self.put(&addr.to_le_bytes())
                .put(&len.to_le_bytes())
                .put(&flags.to_le_bytes());
        }
        self
    }

    pub(super) fn notify(&mut self, queue: u8) -> &mut Self {
        self.put(&[op::NOTIFY, queue])
    }

    /// An MMIO write of `width` (1, 2, 4 or 8) bytes of `value`.
    pub(super) fn mmio_write(&mut self, offset: u16, width: u8, value: u64) -> &mut Self {
        self.put(&[op::MMIO_WRITE])
            .put(&offset.to_le_bytes())
            .put(&[width_code(width)])
            .put(&value.to_le_bytes())
    }

    pub(super) fn mmio_read(&mut self, offset: u16, width: u8) -> &mut Self {
        self.put(&[op::MMIO_READ])
            .put(&offset.to_le_bytes())
            .put(&[width_code(width)])
    }

    pub(super) fn init(&mut self) -> &mut Self {
        self.put(&[op::INIT])
    }

    pub(super) fn host(&mut self, host_op: u8, args: &[u8]) -> &mut Self {
        self.put(&[op::HOST, host_op]).put(args)
    }
}

/// The width byte for an access of `width` bytes (the harness reads `1 << (byte % 4)`).
fn width_code(width: u8) -> u8 {
    assert!(
        matches!(width, 1 | 2 | 4 | 8),
        "MMIO accesses are 1, 2, 4 or 8 bytes"
    );
    u8::try_from(width.trailing_zeros()).expect("at most 3")
}
