//! The `virtio_mmio` target: register accesses on the virtio-mmio transport of a real device.
//!
//! Input: a device byte (even: vsock, odd: fs), then operations (see `ops`): chiefly
//! `MMIO_WRITE`/`MMIO_READ` at any offset and width, so the driver's status, feature and
//! queue registers (sizes, ring addresses) take any values in any order; `INIT` reaches a
//! running device quickly. Guest memory has a hole (RAM at `[0, 512 KiB)` and
//! `[1 MiB, 1 MiB + 64 KiB)`), so ring addresses can straddle or miss it.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::driver::{Device, Driver};
use super::ops::{DATA_START, Input, Ops};
use super::{fs, vsock};

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 512 << 10),
        (GuestAddress(1 << 20), 64 << 10),
    ])
    .expect("map guest memory")
}

pub(super) fn run(data: &[u8]) {
    let mut input = Input::new(data);
    if input.u8().is_multiple_of(2) {
        let mut harness = vsock::Harness::new();
        let driver = Driver::new(guest_memory(), harness.dev.clone());
        drive(driver, &mut input, &mut harness);
    } else {
        let mut harness = fs::Harness::new();
        let driver = Driver::new(guest_memory(), harness.dev.clone());
        drive(driver, &mut input, &mut harness);
    }
}

fn drive(mut driver: Driver, input: &mut Input<'_>, device: &mut impl Device) {
    driver.run(input, device);
}

// ---- Seeds -----------------------------------------------------------------------------------

// Register offsets (virtio 1.1 §4.2.2).
const DEVICE_FEATURES: u16 = 0x10;
const DEVICE_FEATURES_SEL: u16 = 0x14;
const DRIVER_FEATURES: u16 = 0x20;
const DRIVER_FEATURES_SEL: u16 = 0x24;
const QUEUE_SEL: u16 = 0x30;
const QUEUE_NUM_MAX: u16 = 0x34;
const QUEUE_NUM: u16 = 0x38;
const QUEUE_READY: u16 = 0x44;
const QUEUE_NOTIFY: u16 = 0x50;
const INTERRUPT_STATUS: u16 = 0x60;
const INTERRUPT_ACK: u16 = 0x64;
const STATUS: u16 = 0x70;
const QUEUE_DESC_LOW: u16 = 0x80;
const QUEUE_DESC_HIGH: u16 = 0x84;
const QUEUE_DRIVER_LOW: u16 = 0x90;
const QUEUE_DEVICE_LOW: u16 = 0xa0;
const CONFIG: u16 = 0x100;

/// The driver's bring-up written out register by register, with queue `q` at the given ring
/// addresses and size.
fn bring_up(ops: &mut Ops, queues: &[(u64, u64, u64, u32)]) {
    for status in [1, 3] {
        ops.mmio_write(STATUS, 4, status);
    }
    for sel in 0..2 {
        ops.mmio_write(DEVICE_FEATURES_SEL, 4, sel)
            .mmio_read(DEVICE_FEATURES, 4)
            .mmio_write(DRIVER_FEATURES_SEL, 4, sel);
        // VIRTIO_F_VERSION_1 is bit 32.
        ops.mmio_write(DRIVER_FEATURES, 4, sel);
    }
    ops.mmio_write(STATUS, 4, 11).mmio_read(STATUS, 4);
    for (q, &(desc, avail, used, size)) in (0u64..).zip(queues) {
        ops.mmio_write(QUEUE_SEL, 4, q)
            .mmio_read(QUEUE_NUM_MAX, 4)
            .mmio_write(QUEUE_NUM, 4, u64::from(size));
        for (low, addr) in [
            (QUEUE_DESC_LOW, desc),
            (QUEUE_DRIVER_LOW, avail),
            (QUEUE_DEVICE_LOW, used),
        ] {
            ops.mmio_write(low, 4, addr & 0xffff_ffff)
                .mmio_write(low + 4, 4, addr >> 32);
        }
        ops.mmio_write(QUEUE_READY, 4, 1);
    }
    ops.mmio_write(STATUS, 4, 15).mmio_read(STATUS, 4);
}

pub(super) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let rings = |q: u64, size: u32| {
        (
            0x1_0000 * (q + 1),
            0x1_8000 * (q + 1),
            0x1_c000 * (q + 1),
            size,
        )
    };

    // vsock: the full bring-up by hand, a notification, config reads, a reset.
    let mut ops = Ops::new(&[0]);
    bring_up(&mut ops, &[rings(0, 16), rings(1, 16), rings(2, 4)]);
    ops.mmio_read(CONFIG, 8)
        .mmio_read(CONFIG + 4, 4)
        .mmio_read(CONFIG + 7, 1)
        .mmio_write(QUEUE_NOTIFY, 4, 1)
        .mmio_read(INTERRUPT_STATUS, 4)
        .mmio_write(INTERRUPT_ACK, 4, 3)
        .mmio_write(STATUS, 4, 0)
        .mmio_read(STATUS, 4);
    out.push(("vsock_bring_up", ops.finish()));

    // fs: rings in the hole and past the end of memory, then a valid set after a reset.
    let mut ops = Ops::new(&[1]);
    bring_up(
        &mut ops,
        &[
            (0x9_0000, 0x9_8000, 0xa_0000, 256),
            (0x10_f000, 0x10_fff0, 0x1_0000_0000, 1024),
        ],
    );
    ops.mmio_write(STATUS, 4, 0);
    bring_up(&mut ops, &[rings(0, 8), rings(1, 8)]);
    ops.mmio_read(CONFIG, 4)
        .mmio_read(CONFIG + 36, 4)
        .mmio_write(CONFIG, 4, 0);
    out.push(("fs_bad_rings", ops.finish()));

    // Odd sizes and widths: queue sizes that are not powers of two, narrow and wide accesses,
    // unknown offsets, features never offered, DRIVER_OK before FEATURES_OK.
    let mut ops = Ops::new(&[0]);
    ops.mmio_write(STATUS, 4, 15)
        .mmio_write(STATUS, 4, 1)
        .mmio_write(STATUS, 4, 3)
        .mmio_write(DRIVER_FEATURES, 4, 0xffff_ffff)
        .mmio_write(STATUS, 4, 11)
        .mmio_write(QUEUE_NUM, 4, 3)
        .mmio_write(QUEUE_DESC_HIGH, 2, 1)
        .mmio_write(STATUS, 1, 1)
        .mmio_read(0, 8)
        .mmio_read(0xfc, 4)
        .mmio_read(0xfff, 2)
        .mmio_write(0xffff, 8, u64::MAX)
        .init()
        .write_mem(DATA_START, &[0; 64]);
    out.push(("odd_accesses", ops.finish()));

    out
}
