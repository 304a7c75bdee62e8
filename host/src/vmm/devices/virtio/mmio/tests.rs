//! The transport driven as a guest driver would, against a device that records what it is told.

use std::sync::Mutex;

use super::persist::MmioState;
use super::*;
use crate::vmm::devices::persist::Persist;
use crate::vmm::devices::virtio::ActivateError;
use crate::vmm::devices::virtio::test_utils::{TestQueue, guest_memory};

const FEATURE_X: u64 = 1 << 3;

/// A device that records what the transport tells it.
#[derive(Default)]
struct Recorder {
    acked: Option<u64>,
    activated: Option<Vec<u16>>,
    resets: u32,
    config: [u8; 8],
    broken: bool,
}

impl VirtioDevice for Recorder {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | FEATURE_X
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap();
        if let Some(src) = self.config.get(start..start + data.len()) {
            data.copy_from_slice(src);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = usize::try_from(offset).unwrap();
        if let Some(dst) = self.config.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
        }
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        _interrupt: Arc<Interrupt>,
        queues: Vec<DeviceQueue>,
    ) -> Result<(), ActivateError> {
        self.activated = Some(queues.iter().map(|q| q.queue.size()).collect());
        Ok(())
    }
    fn active(&self) -> Option<&crate::vmm::devices::virtio::Active> {
        None
    }
    fn reset(&mut self) {
        self.activated = None;
        self.resets += 1;
        self.broken = false;
    }
    fn needs_reset(&self) -> bool {
        self.broken
    }
}

fn transport() -> (MmioTransport, Arc<Mutex<Recorder>>, GuestMemoryMmap) {
    let mem = guest_memory();
    let dev = Arc::new(Mutex::new(Recorder::default()));
    let shared: SharedDevice = dev.clone();
    (MmioTransport::new(mem.clone(), shared).unwrap(), dev, mem)
}

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0xff; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// Negotiates VERSION_1 | FEATURE_X and leaves the device at FEATURES_OK.
fn negotiate(t: &mut MmioTransport) {
    write32(t, STATUS, S_ACK);
    write32(t, STATUS, S_ACK | S_DRIVER);
    write32(t, DEVICE_FEATURES_SEL, 0);
    let lo = read32(t, DEVICE_FEATURES);
    write32(t, DEVICE_FEATURES_SEL, 1);
    let hi = read32(t, DEVICE_FEATURES);
    assert_eq!(
        (u64::from(hi) << 32) | u64::from(lo),
        VIRTIO_F_VERSION_1 | FEATURE_X
    );
    write32(t, DRIVER_FEATURES_SEL, 0);
    write32(t, DRIVER_FEATURES, lo);
    write32(t, DRIVER_FEATURES_SEL, 1);
    write32(t, DRIVER_FEATURES, hi);
    write32(t, STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(read32(t, STATUS), S_ACK | S_DRIVER | S_FEATURES_OK);
}

fn setup_queue(t: &mut MmioTransport, index: u32, q: &TestQueue<'_>, size: u32) {
    write32(t, QUEUE_SEL, index);
    write32(t, QUEUE_NUM, size);
    for (lo, hi, addr) in [
        (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, q.desc_table()),
        (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, q.avail_ring()),
        (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, q.used_ring()),
    ] {
        write32(t, lo, low(addr));
        write32(t, hi, high(addr));
    }
    write32(t, QUEUE_READY, 1);
    assert_eq!(read32(t, QUEUE_READY), 1);
}

#[test]
fn identifies_as_a_modern_virtio_mmio_device() {
    let (mut t, _, _) = transport();
    assert_eq!(read32(&mut t, MAGIC_VALUE), 0x7472_6976);
    assert_eq!(read32(&mut t, VERSION), 2);
    assert_eq!(read32(&mut t, DEVICE_ID), 42);
    assert_eq!(read32(&mut t, VENDOR), VENDOR_ID);
    assert_eq!(read32(&mut t, QUEUE_NUM_MAX), 16);
    write32(&mut t, QUEUE_SEL, 1);
    assert_eq!(read32(&mut t, QUEUE_NUM_MAX), 8);
    write32(&mut t, QUEUE_SEL, 2);
    assert_eq!(read32(&mut t, QUEUE_NUM_MAX), 0, "no queue 2");
    assert_eq!(read32(&mut t, CONFIG_GENERATION), 0);
    assert_eq!(t.queue_evts().len(), 2);
    // No shared memory regions.
    write32(&mut t, SHM_SEL, 0);
    assert_eq!(read32(&mut t, SHM_LEN_LOW), u32::MAX);
    assert_eq!(read32(&mut t, SHM_LEN_HIGH), u32::MAX);
}

#[test]
fn a_device_that_gave_up_reports_needs_reset_until_reset() {
    let (mut t, dev, mem) = transport();
    let q0 = TestQueue::new(&mem, 0x1_0000, 16);
    let q1 = TestQueue::new(&mem, 0x2_0000, 8);
    negotiate(&mut t);
    setup_queue(&mut t, 0, &q0, 16);
    setup_queue(&mut t, 1, &q1, 8);
    let running = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
    write32(&mut t, STATUS, running);
    assert_eq!(read32(&mut t, STATUS), running);
    dev.lock().unwrap().broken = true;
    assert_eq!(read32(&mut t, STATUS), running | S_NEEDS_RESET);
    write32(&mut t, STATUS, 0);
    assert_eq!(read32(&mut t, STATUS), 0);
}

#[test]
fn full_initialisation_activates_the_device() {
    let (mut t, dev, mem) = transport();
    let q0 = TestQueue::new(&mem, 0x1_0000, 16);
    let q1 = TestQueue::new(&mem, 0x2_0000, 8);
    negotiate(&mut t);
    assert_eq!(
        dev.lock().unwrap().acked,
        Some(VIRTIO_F_VERSION_1 | FEATURE_X)
    );
    setup_queue(&mut t, 0, &q0, 16);
    setup_queue(&mut t, 1, &q1, 4);
    write32(
        &mut t,
        STATUS,
        S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    assert_eq!(
        read32(&mut t, STATUS),
        S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
    );
    assert_eq!(dev.lock().unwrap().activated, Some(vec![16, 4]));
    assert_eq!(t.status(), S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);

    // Queue registers are frozen once the device runs.
    write32(&mut t, QUEUE_SEL, 0);
    write32(&mut t, QUEUE_READY, 0);
    assert_eq!(read32(&mut t, QUEUE_READY), 1);

    // Writing 0 resets everything.
    write32(&mut t, STATUS, 0);
    assert_eq!(read32(&mut t, STATUS), 0);
    let d = dev.lock().unwrap();
    assert_eq!(d.activated, None);
    assert_eq!(d.resets, 1);
    drop(d);
    assert_eq!(read32(&mut t, QUEUE_READY), 0);
    assert_eq!(t.queues[1].size(), 8);
    // Linux then disables each queue, which is accepted on the stopped device.
    write32(&mut t, QUEUE_SEL, 1);
    write32(&mut t, QUEUE_READY, 0);
    assert_eq!(read32(&mut t, QUEUE_READY), 0);
}

#[test]
fn features_ok_needs_version_1_and_offered_bits() {
    let (mut t, dev, _) = transport();
    write32(&mut t, STATUS, S_ACK);
    write32(&mut t, STATUS, S_ACK | S_DRIVER);
    // A legacy driver: no VERSION_1.
    write32(&mut t, DRIVER_FEATURES, low(FEATURE_X));
    write32(&mut t, STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(read32(&mut t, STATUS), S_ACK | S_DRIVER);
    // Bits the device never offered.
    write32(&mut t, DRIVER_FEATURES_SEL, 1);
    write32(&mut t, DRIVER_FEATURES, high(VIRTIO_F_VERSION_1) | 0x10);
    write32(&mut t, STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(read32(&mut t, STATUS), S_ACK | S_DRIVER);
    assert_eq!(dev.lock().unwrap().acked, None);
    // Fixed.
    write32(&mut t, DRIVER_FEATURES, high(VIRTIO_F_VERSION_1));
    write32(&mut t, STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(read32(&mut t, STATUS), S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(
        dev.lock().unwrap().acked,
        Some(VIRTIO_F_VERSION_1 | FEATURE_X)
    );
    // Features are frozen after FEATURES_OK.
    write32(&mut t, DRIVER_FEATURES, 0);
    assert_eq!(t.driver_features, VIRTIO_F_VERSION_1 | FEATURE_X);
}

#[test]
fn invalid_status_transitions_are_ignored() {
    let (mut t, dev, _) = transport();
    // DRIVER_OK straight away.
    write32(
        &mut t,
        STATUS,
        S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    assert_eq!(read32(&mut t, STATUS), 0);
    write32(&mut t, STATUS, S_ACK);
    // Clearing a bit without a reset.
    write32(&mut t, STATUS, S_DRIVER);
    assert_eq!(read32(&mut t, STATUS), S_ACK);
    // Skipping DRIVER.
    write32(&mut t, STATUS, S_ACK | S_FEATURES_OK);
    assert_eq!(read32(&mut t, STATUS), S_ACK);
    // FAILED is always accepted and leaves the device inert.
    write32(&mut t, STATUS, S_ACK | S_FAILED);
    assert_eq!(read32(&mut t, STATUS), S_ACK | S_FAILED);
    assert!(dev.lock().unwrap().activated.is_none());
}

#[test]
fn activation_with_an_invalid_queue_needs_reset() {
    let (mut t, dev, mem) = transport();
    let q0 = TestQueue::new(&mem, 0x1_0000, 16);
    negotiate(&mut t);
    setup_queue(&mut t, 0, &q0, 16);
    // Queue 1: rings beyond the end of guest memory.
    write32(&mut t, QUEUE_SEL, 1);
    write32(&mut t, QUEUE_DESC_LOW, 0xfff_f000);
    write32(&mut t, QUEUE_DESC_HIGH, 0x1);
    write32(&mut t, QUEUE_DRIVER_LOW, 0x3000);
    write32(&mut t, QUEUE_DEVICE_LOW, 0x4000);
    write32(&mut t, QUEUE_READY, 1);
    write32(
        &mut t,
        STATUS,
        S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    assert_ne!(read32(&mut t, STATUS) & S_NEEDS_RESET, 0);
    assert!(dev.lock().unwrap().activated.is_none());
    assert_eq!(
        read32(&mut t, INTERRUPT_STATUS),
        InterruptKind::Config as u32
    );
    assert_eq!(t.interrupt().irq_evt().read().unwrap(), 1);
    write32(&mut t, INTERRUPT_ACK, InterruptKind::Config as u32);
    assert_eq!(read32(&mut t, INTERRUPT_STATUS), 0);
    // A reset recovers.
    write32(&mut t, STATUS, 0);
    assert_eq!(read32(&mut t, STATUS), 0);
}

#[test]
fn activation_with_a_queue_not_ready_needs_reset() {
    let (mut t, dev, mem) = transport();
    let q0 = TestQueue::new(&mem, 0x1_0000, 16);
    negotiate(&mut t);
    setup_queue(&mut t, 0, &q0, 16);
    write32(
        &mut t,
        STATUS,
        S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    assert_ne!(read32(&mut t, STATUS) & S_NEEDS_RESET, 0);
    assert!(dev.lock().unwrap().activated.is_none());
}

#[test]
fn bad_queue_configuration_is_rejected() {
    let (mut t, _, _) = transport();
    // Before FEATURES_OK queue registers are read-only.
    write32(&mut t, QUEUE_NUM, 4);
    assert_eq!(t.queues[0].size(), 16);
    negotiate(&mut t);
    for bad in [0, 3, 32, 0x1_0000] {
        write32(&mut t, QUEUE_NUM, bad);
        assert_eq!(t.queues[0].size(), 16, "size {bad}");
    }
    write32(&mut t, QUEUE_NUM, 8);
    assert_eq!(t.queues[0].size(), 8);
    // Misaligned rings.
    write32(&mut t, QUEUE_DESC_LOW, 0x1008);
    write32(&mut t, QUEUE_DRIVER_LOW, 0x2001);
    write32(&mut t, QUEUE_DEVICE_LOW, 0x3002);
    assert_ne!(t.queues[0].desc_table(), 0x1008);
    assert_ne!(t.queues[0].avail_ring(), 0x2001);
    assert_ne!(t.queues[0].used_ring(), 0x3002);
    // A queue that does not exist.
    write32(&mut t, QUEUE_SEL, 7);
    write32(&mut t, QUEUE_NUM, 4);
    write32(&mut t, QUEUE_READY, 1);
    assert_eq!(read32(&mut t, QUEUE_READY), 0);
}

#[test]
fn bad_offsets_and_sizes_are_ignored() {
    let (mut t, _, _) = transport();
    let mut two = [0xff; 2];
    t.read(MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    let mut eight = [0xff; 8];
    t.read(MAGIC_VALUE, &mut eight);
    assert_eq!(eight, [0; 8]);
    // Unknown, reserved and write-only registers read as zero.
    for offset in [0x0c8, 0x0ff, DRIVER_FEATURES, QUEUE_NOTIFY, 0x002] {
        assert_eq!(read32(&mut t, offset), 0, "{offset:#x}");
    }
    // Narrow writes and writes to read-only registers change nothing.
    t.write(STATUS, &[S_ACK.to_le_bytes()[0]]);
    assert_eq!(read32(&mut t, STATUS), 0);
    write32(&mut t, MAGIC_VALUE, 0);
    write32(&mut t, INTERRUPT_STATUS, 3);
    write32(&mut t, 0x0c4, 1);
    assert_eq!(read32(&mut t, MAGIC_VALUE), MMIO_MAGIC);
    // Offsets far beyond the window go to the config space and read as zero there.
    assert_eq!(read32(&mut t, 0x7fff_ffff_ffff), 0);
}

#[test]
fn queue_notify_writes_the_queue_eventfd() {
    let (mut t, _, _) = transport();
    write32(&mut t, QUEUE_NOTIFY, 1);
    assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
    assert!(t.queue_evts()[0].read().is_err(), "queue 0 not signalled");
    // A queue that does not exist: logged, nothing signalled.
    write32(&mut t, QUEUE_NOTIFY, 5);
    assert!(t.queue_evts()[0].read().is_err());
    assert!(t.queue_evts()[1].read().is_err());
}

#[test]
fn config_space_goes_to_the_device() {
    let (mut t, dev, _) = transport();
    dev.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
    let mut b = [0; 2];
    t.read(CONFIG + 2, &mut b);
    assert_eq!(b, [3, 4]);
    assert_eq!(read32(&mut t, CONFIG + 4), 0x0807_0605);
    t.write(CONFIG + 1, &[9]);
    assert_eq!(dev.lock().unwrap().config[1], 9);
    assert_eq!(read32(&mut t, CONFIG + 8), 0, "beyond the config space");
}

#[test]
fn interrupt_status_and_ack() {
    let (mut t, _, _) = transport();
    t.interrupt().trigger(InterruptKind::Vring).unwrap();
    assert_eq!(read32(&mut t, INTERRUPT_STATUS), 1);
    write32(&mut t, INTERRUPT_ACK, 1);
    assert_eq!(read32(&mut t, INTERRUPT_STATUS), 0);
}

/// A transport whose driver got as far as `status` (with two queues set up first when the
/// status includes DRIVER_OK), a pending interrupt and selector registers not at 0.
fn driven(status: u32) -> (MmioTransport, Arc<Mutex<Recorder>>, GuestMemoryMmap) {
    let (mut t, dev, mem) = transport();
    negotiate(&mut t);
    if status & S_DRIVER_OK != 0 {
        let q0 = TestQueue::new(&mem, 0x1_0000, 16);
        let q1 = TestQueue::new(&mem, 0x2_0000, 8);
        setup_queue(&mut t, 0, &q0, 16);
        setup_queue(&mut t, 1, &q1, 4);
        write32(&mut t, STATUS, status);
    }
    write32(&mut t, QUEUE_SEL, 1);
    write32(&mut t, DEVICE_FEATURES_SEL, 1);
    t.interrupt().trigger(InterruptKind::Config).unwrap();
    (t, dev, mem)
}

#[test]
fn state_round_trips_and_a_running_device_is_activated_again() {
    let running = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
    let (t, _, mem) = driven(running);
    let state = t.save();
    assert_eq!(state.status, running);
    assert_eq!(state.queues[1].size, 4);

    let dev = Arc::new(Mutex::new(Recorder::default()));
    let shared: SharedDevice = dev.clone();
    let mut restored = MmioTransport::restore((mem, shared), &state).unwrap();
    assert_eq!(restored.save(), state);
    assert_eq!(read32(&mut restored, STATUS), running);
    assert_eq!(
        read32(&mut restored, QUEUE_SEL),
        0,
        "write-only: reads as 0"
    );
    assert_eq!(
        read32(&mut restored, DEVICE_FEATURES),
        high(FEATURE_X | VIRTIO_F_VERSION_1)
    );
    assert_eq!(
        read32(&mut restored, INTERRUPT_STATUS),
        InterruptKind::Config as u32
    );
    assert_eq!(
        restored.interrupt().irq_evt().read().unwrap(),
        1,
        "raised again"
    );
    let d = dev.lock().unwrap();
    assert_eq!(d.acked, Some(VIRTIO_F_VERSION_1 | FEATURE_X));
    assert_eq!(d.activated, Some(vec![16, 4]));
}

#[test]
fn a_device_the_driver_has_not_started_stays_inactive() {
    let (t, _, mem) = driven(S_ACK | S_DRIVER | S_FEATURES_OK);
    let state = t.save();
    let dev = Arc::new(Mutex::new(Recorder::default()));
    let shared: SharedDevice = dev.clone();
    let mut restored = MmioTransport::restore((mem, shared), &state).unwrap();
    assert_eq!(
        read32(&mut restored, STATUS),
        S_ACK | S_DRIVER | S_FEATURES_OK
    );
    assert_eq!(dev.lock().unwrap().activated, None);
    assert_eq!(
        dev.lock().unwrap().acked,
        Some(VIRTIO_F_VERSION_1 | FEATURE_X)
    );
}

#[test]
fn restoring_a_state_that_does_not_fit_is_refused() {
    let running = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
    let (t, _, mem) = driven(running);
    let good = t.save();
    let restore = |state: &MmioState| {
        let shared: SharedDevice = Arc::new(Mutex::new(Recorder::default()));
        MmioTransport::restore((mem.clone(), shared), state)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let mut other_device = good.clone();
    other_device.device_type = 19;
    assert!(restore(&other_device).contains("device type"));
    let mut one_queue = good.clone();
    one_queue.queues.pop();
    assert!(restore(&one_queue).contains("saved queues"));
    let mut unoffered = good.clone();
    unoffered.driver_features |= 1 << 20;
    assert!(restore(&unoffered).contains("features"));
    let mut odd_size = good.clone();
    odd_size.queues[0].size = 5;
    assert!(restore(&odd_size).contains("queue 0"));
    let mut outside = good.clone();
    outside.queues[1].used_ring = 1 << 40;
    assert!(
        restore(&outside).contains("did not take"),
        "{}",
        restore(&outside)
    );
    let mut half_started = good;
    half_started.status = S_ACK | S_DRIVER_OK;
    assert!(restore(&half_started).contains("status"));
}
