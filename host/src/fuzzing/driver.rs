//! The guest driver the device targets play: guest memory, the device's real MMIO transport,
//! split queues at a fixed layout, and the loop that runs an input's operations.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio as reg;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::ops::{Input, op};
use crate::vmm::devices::BusDevice;
use crate::vmm::devices::virtio::SharedDevice;
use crate::vmm::devices::virtio::mmio::MmioTransport;

/// Queue `i`'s rings live in the 64 KiB at `RING_REGION * (i + 1)`.
const RING_REGION: u64 = 0x1_0000;
/// Offsets of the rings in a queue's region (room for 1024-entry queues).
const AVAIL_OFFSET: u64 = 0x8000;
const USED_OFFSET: u64 = 0xc000;
/// Guest memory of the device targets: one region at guest physical 0.
pub(super) const MEM_SIZE: usize = 1 << 20;
/// `WRITE_MEM` addresses are taken modulo this (beyond the memory: the write fails).
const WRITE_SPAN: u32 = 2 << 20;
/// The largest queue the device targets set up: small queues wrap their rings often.
pub(super) const MAX_FUZZ_QUEUE: u16 = 64;
/// A chain the harness lays out has at most this many descriptors.
const MAX_CHAIN: u8 = 8;

/// The device side of a target: what runs after a notification, and host-side actions.
pub(super) trait Device {
    /// Lets the device do what is ready (what its event loop would do).
    fn process(&mut self);
    /// A host-side action (`op::HOST`), reading its arguments from `input`.
    fn host_op(&mut self, _op: u8, _input: &mut Input<'_>) {}
}

/// A harness's device, locked for its event handler (a panic under the lock, which the
/// fuzzer reports, does not stop the next call).
pub(super) fn lock<T: ?Sized>(dev: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    dev.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One guest memory region of `MEM_SIZE` bytes at 0.
pub(super) fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("map guest memory")
}

/// The queue size a target's prefix byte asks for: a power of two up to [`MAX_FUZZ_QUEUE`].
pub(super) fn queue_size(byte: u8) -> u16 {
    (1u16 << (byte % 7)).min(MAX_FUZZ_QUEUE)
}

/// Runs a device target's input: a queue-size byte (see [`queue_size`]), then operations
/// against the harness `new` makes, whose `device` gets a transport on [`guest_memory`],
/// initialised as a Linux driver would at probe.
pub(super) fn run<D: Device>(
    data: &[u8],
    new: impl FnOnce() -> D,
    device: impl FnOnce(&D) -> SharedDevice,
) {
    let mut input = Input::new(data);
    let size = queue_size(input.u8());
    let mut harness = new();
    let mut driver = Driver::new(guest_memory(), device(&harness));
    driver.init(size);
    driver.run(&mut input, &mut harness);
}

/// Where the driver puts the next chain of a queue.
#[derive(Clone, Copy, Default)]
struct QueueLayout {
    size: u16,
    next_desc: u16,
}

/// The guest driver of one device.
pub(super) struct Driver {
    mem: GuestMemoryMmap,
    transport: MmioTransport,
    queues: Vec<QueueLayout>,
}

impl Driver {
    /// A driver for `device`, whose transport is created here on `mem`.
    pub(super) fn new(mem: GuestMemoryMmap, device: SharedDevice) -> Self {
        let queues = lock(&device).queue_max_sizes().len();
        let transport = MmioTransport::new(mem.clone(), device).expect("a transport");
        Self {
            mem,
            transport,
            queues: vec![QueueLayout::default(); queues],
        }
    }

    fn read32(&mut self, register: u32) -> u32 {
        let mut data = [0; 4];
        self.transport.read(u64::from(register), &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(&mut self, register: u32, value: u32) {
        self.transport
            .write(u64::from(register), &value.to_le_bytes());
    }

    /// What a Linux driver does at probe: reset, negotiate every offered feature, set up each
    /// queue (`size`, at most the device's maximum) at the fixed layout with zeroed rings, and
    /// set `DRIVER_OK`.
    pub(super) fn init(&mut self, size: u16) {
        use reg::*;
        self.write32(VIRTIO_MMIO_STATUS, 0);
        let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        self.write32(VIRTIO_MMIO_STATUS, status);
        status |= VIRTIO_CONFIG_S_DRIVER;
        self.write32(VIRTIO_MMIO_STATUS, status);
        for sel in 0..2 {
            self.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            let features = self.read32(VIRTIO_MMIO_DEVICE_FEATURES);
            self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            self.write32(VIRTIO_MMIO_DRIVER_FEATURES, features);
        }
        status |= VIRTIO_CONFIG_S_FEATURES_OK;
        self.write32(VIRTIO_MMIO_STATUS, status);
        for index in 0..self.queues.len() {
            let queue = u32::try_from(index).expect("a few queues");
            self.write32(VIRTIO_MMIO_QUEUE_SEL, queue);
            let max = u16::try_from(self.read32(VIRTIO_MMIO_QUEUE_NUM_MAX)).unwrap_or(0);
            let size = size.min(max).max(1);
            let base = RING_REGION * (u64::from(queue) + 1);
            // A fresh driver starts from zeroed rings.
            let _ = self.mem.write_slice(
                &vec![0; usize::try_from(RING_REGION).expect("64 KiB")],
                GuestAddress(base),
            );
            self.write32(VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
            for (low, addr) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, base),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + AVAIL_OFFSET),
                (VIRTIO_MMIO_QUEUE_USED_LOW, base + USED_OFFSET),
            ] {
                let [lo, hi] = split(addr);
                self.write32(low, lo);
                self.write32(low + 4, hi);
            }
            self.write32(VIRTIO_MMIO_QUEUE_READY, 1);
            self.queues[index] = QueueLayout { size, next_desc: 0 };
        }
        status |= VIRTIO_CONFIG_S_DRIVER_OK;
        self.write32(VIRTIO_MMIO_STATUS, status);
    }

    /// Runs every operation of `input` against the transport and `device`.
    pub(super) fn run(&mut self, input: &mut Input<'_>, device: &mut impl Device) {
        while !input.is_empty() {
            match input.u8() % op::COUNT {
                op::WRITE_MEM => {
                    let addr = input.u32() % WRITE_SPAN;
                    let len = input.u16();
                    let bytes = input.bytes(usize::from(len));
                    let _ = self.mem.write_slice(bytes, GuestAddress(u64::from(addr)));
                }
                op::CHAIN => self.chain(input),
                op::NOTIFY => {
                    let queue = input.u8();
                    self.write32(reg::VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(queue));
                    device.process();
                }
                op::MMIO_WRITE => {
                    let offset = u64::from(input.u16());
                    let width = 1usize << (input.u8() % 4);
                    let value = input.u64().to_le_bytes();
                    self.transport.write(offset, &value[..width]);
                }
                op::MMIO_READ => {
                    let offset = u64::from(input.u16());
                    let mut data = [0; 8];
                    let width = 1usize << (input.u8() % 4);
                    self.transport.read(offset, &mut data[..width]);
                }
                op::INIT => {
                    let size = self.queues.first().map_or(1, |q| q.size.max(1));
                    self.init(size);
                }
                _ => {
                    let host_op = input.u8();
                    device.host_op(host_op, input);
                    device.process();
                }
            }
        }
        device.process();
    }

    /// `op::CHAIN`: lays out a chain in the descriptor table and publishes it.
    fn chain(&mut self, input: &mut Input<'_>) {
        let index = usize::from(input.u8());
        let count = input.u8() % MAX_CHAIN + 1;
        let Some(layout) = self.queues.get(index % self.queues.len().max(1)).copied() else {
            return;
        };
        let queue = u64::try_from(index % self.queues.len()).expect("a few queues");
        let size = layout.size.max(1);
        let base = RING_REGION * (queue + 1);
        let head = layout.next_desc % size;
        let mut slot = head;
        for i in 0..count {
            let addr = u64::from(input.u32());
            let len = input.u32();
            let mut flags = input.u16() & !NEXT;
            let next = (slot + 1) % size;
            if i + 1 < count {
                flags |= NEXT;
            }
            let mut desc = [0u8; 16];
            desc[0..8].copy_from_slice(&addr.to_le_bytes());
            desc[8..12].copy_from_slice(&len.to_le_bytes());
            desc[12..14].copy_from_slice(&flags.to_le_bytes());
            desc[14..16].copy_from_slice(&next.to_le_bytes());
            let _ = self
                .mem
                .write_slice(&desc, GuestAddress(base + 16 * u64::from(slot)));
            slot = next;
        }
        // The available ring: flags, idx, ring[size].
        let avail = base + AVAIL_OFFSET;
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
        let entry = avail + 4 + 2 * u64::from(idx % size);
        let _ = self.mem.write_obj(head, GuestAddress(entry));
        let _ = self
            .mem
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2));
        if let Some(layout) = self.queues.get_mut(usize::try_from(queue).unwrap_or(0)) {
            layout.next_desc = slot;
        }
    }
}

/// `VRING_DESC_F_NEXT`.
const NEXT: u16 = 1;

/// The low and high halves of a 64-bit register value.
fn split(addr: u64) -> [u32; 2] {
    let bytes = addr.to_le_bytes();
    [
        u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
    ]
}
