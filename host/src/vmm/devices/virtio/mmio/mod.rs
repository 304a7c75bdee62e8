//! The virtio-mmio transport, modern interface only (virtio 1.1 §4.2.2, `Version` 2).
//!
//! [`MmioTransport`] is the register file at the device's MMIO window. The driver negotiates
//! features, programs each queue, then sets `DRIVER_OK`; at that moment the transport checks
//! every queue (`Queue::is_valid`: ready, and rings inside guest memory) and hands the device a
//! copy of the queues with their notification eventfds. A failed check sets `DEVICE_NEEDS_RESET`
//! and raises a configuration interrupt, as the spec asks.
//!
//! Queue notifications: the transport owns one [`EventFd`] per queue ([`MmioTransport::queue_evts`]).
//! The VMM registers each with KVM as an ioeventfd on `base + QUEUE_NOTIFY_OFFSET` with the queue
//! index as datamatch, so a notification never leaves the kernel. A `QueueNotify` write that does
//! reach the transport as an MMIO exit (no ioeventfd registered) writes the same eventfd, so the
//! device sees one path either way.
//!
//! Guest mistakes (unknown offsets, accesses that are not 32 bits wide, a write to a read-only
//! register, an out-of-range queue, a queue size that is not a power of two, register writes in
//! the wrong device state) are logged, rate limited, and ignored; reads of such registers return
//! zeros. Nothing here panics on guest input.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    DeviceQueue, Interrupt, InterruptKind, SharedDevice, VIRTIO_F_VERSION_1, VirtioDevice,
    guest_log,
};
use crate::vmm::devices::BusDevice;
use crate::vmm::threads::lock;

pub mod persist;

/// Size of the MMIO window each transport occupies (registers plus a 3.75 KiB config space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// Offset of `QueueNotify` in the window: where the VMM registers the queue ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = off(reg::VIRTIO_MMIO_QUEUE_NOTIFY);

/// `MagicValue`: "virt" in little endian.
const MMIO_MAGIC: u32 = 0x7472_6976;
/// `Version` of the modern interface.
const MMIO_VERSION: u32 = 2;
/// `VendorID`: "HUSK" in little endian. Drivers do not interpret it.
const VENDOR_ID: u32 = 0x4b53_5548;

const fn off(register: u32) -> u64 {
    register as u64
}

const MAGIC_VALUE: u64 = off(reg::VIRTIO_MMIO_MAGIC_VALUE);
const VERSION: u64 = off(reg::VIRTIO_MMIO_VERSION);
const DEVICE_ID: u64 = off(reg::VIRTIO_MMIO_DEVICE_ID);
const VENDOR: u64 = off(reg::VIRTIO_MMIO_VENDOR_ID);
const DEVICE_FEATURES: u64 = off(reg::VIRTIO_MMIO_DEVICE_FEATURES);
const DEVICE_FEATURES_SEL: u64 = off(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL);
const DRIVER_FEATURES: u64 = off(reg::VIRTIO_MMIO_DRIVER_FEATURES);
const DRIVER_FEATURES_SEL: u64 = off(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL);
const QUEUE_SEL: u64 = off(reg::VIRTIO_MMIO_QUEUE_SEL);
const QUEUE_NUM_MAX: u64 = off(reg::VIRTIO_MMIO_QUEUE_NUM_MAX);
const QUEUE_NUM: u64 = off(reg::VIRTIO_MMIO_QUEUE_NUM);
const QUEUE_READY: u64 = off(reg::VIRTIO_MMIO_QUEUE_READY);
const QUEUE_NOTIFY: u64 = QUEUE_NOTIFY_OFFSET;
const INTERRUPT_STATUS: u64 = off(reg::VIRTIO_MMIO_INTERRUPT_STATUS);
const INTERRUPT_ACK: u64 = off(reg::VIRTIO_MMIO_INTERRUPT_ACK);
const STATUS: u64 = off(reg::VIRTIO_MMIO_STATUS);
const QUEUE_DESC_LOW: u64 = off(reg::VIRTIO_MMIO_QUEUE_DESC_LOW);
const QUEUE_DESC_HIGH: u64 = off(reg::VIRTIO_MMIO_QUEUE_DESC_HIGH);
const QUEUE_DRIVER_LOW: u64 = off(reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW);
const QUEUE_DRIVER_HIGH: u64 = off(reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH);
const QUEUE_DEVICE_LOW: u64 = off(reg::VIRTIO_MMIO_QUEUE_USED_LOW);
const QUEUE_DEVICE_HIGH: u64 = off(reg::VIRTIO_MMIO_QUEUE_USED_HIGH);
const SHM_SEL: u64 = off(reg::VIRTIO_MMIO_SHM_SEL);
const SHM_LEN_LOW: u64 = off(reg::VIRTIO_MMIO_SHM_LEN_LOW);
const SHM_LEN_HIGH: u64 = off(reg::VIRTIO_MMIO_SHM_LEN_HIGH);
const SHM_BASE_LOW: u64 = off(reg::VIRTIO_MMIO_SHM_BASE_LOW);
const SHM_BASE_HIGH: u64 = off(reg::VIRTIO_MMIO_SHM_BASE_HIGH);
const CONFIG_GENERATION: u64 = off(reg::VIRTIO_MMIO_CONFIG_GENERATION);
const CONFIG: u64 = off(reg::VIRTIO_MMIO_CONFIG);

const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// could not create an eventfd for the transport
    #[error("could not create an eventfd for the transport")]
    EventFd(#[source] std::io::Error),
    /// the device declares an invalid maximum size {size} for queue {index}
    #[error("the device declares an invalid maximum size {size} for queue {index}")]
    QueueMaxSize {
        /// The queue.
        index: usize,
        /// The size the device declared.
        size: u16,
    },
}

/// A virtio device behind a virtio-mmio register window. See the module docs.
#[derive(Debug)]
pub struct MmioTransport {
    device: SharedDevice,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    device_type: u32,
    avail_features: u64,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
}

impl std::fmt::Debug for dyn VirtioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioDevice")
            .field("device_type", &self.device_type())
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Puts `device` behind a new register window. The transport creates the device's
    /// [`Interrupt`] and one notification eventfd per queue; register them with KVM through
    /// [`MmioTransport::interrupt`] and [`MmioTransport::queue_evts`].
    pub fn new(mem: GuestMemoryMmap, device: SharedDevice) -> Result<Self, MmioError> {
        let interrupt = Arc::new(Interrupt::new().map_err(MmioError::EventFd)?);
        let (device_type, avail_features, max_sizes) = {
            let dev = lock(&device);
            (
                dev.device_type(),
                dev.avail_features(),
                dev.queue_max_sizes().to_vec(),
            )
        };
        let queues = max_sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|_| MmioError::QueueMaxSize { index, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            device_type,
            avail_features,
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
        })
    }

    /// The device's interrupt: register [`Interrupt::irq_evt`] as a KVM irqfd for its GSI.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// One eventfd per queue, in queue order: register `queue_evts()[i]` as a KVM ioeventfd at
    /// `base + QUEUE_NOTIFY_OFFSET`, 4 bytes wide, with datamatch `i as u32`.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device status register (`VIRTIO_CONFIG_S_*` bits).
    #[cfg(test)]
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let index = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(index)
    }

    /// Queue registers may only be written between `FEATURES_OK` and `DRIVER_OK`.
    fn queue_writable(&self) -> bool {
        self.status & (S_FEATURES_OK | S_DRIVER_OK | S_FAILED) == S_FEATURES_OK
    }

    fn read_register(&mut self, offset: u64) -> Option<u32> {
        let value = match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device_type,
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => low(self.avail_features),
                1 => high(self.avail_features),
                _ => 0,
            },
            // "Reading from the register returns 0x0 if the queue is not available."
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),
            // A device that gave up on the driver after activation asks for a reset.
            STATUS if self.status & S_DRIVER_OK != 0 && lock(&self.device).needs_reset() => {
                self.status | S_NEEDS_RESET
            }
            STATUS => self.status,
            // The devices never change their configuration space after creation.
            CONFIG_GENERATION => 0,
            // No shared memory regions: "reading from a non-existent region results in a
            // length of -1" (virtio 1.2 §4.2.2). Linux probes these for virtio-fs DAX.
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            _ => {
                guest_log!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                return None;
            }
        };
        Some(value)
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            QUEUE_SEL => self.queue_sel = value,
            // Selects a shared memory region; there are none (see the reads above).
            SHM_SEL => {}
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW
            | QUEUE_DRIVER_HIGH | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => {
                self.write_queue_register(offset, value);
            }
            QUEUE_NOTIFY => self.notify(value),
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.write_status(value),
            _ => guest_log!(
                "virtio-mmio: write of {value:#x} to unknown or read-only register {offset:#x}"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (S_DRIVER | S_FEATURES_OK | S_FAILED) != S_DRIVER {
            guest_log!(
                "virtio-mmio: driver features written in status {:#x}, ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32);
            }
            sel if value != 0 => {
                guest_log!(
                    "virtio-mmio: driver accepts features {value:#x} in word {sel}, which the device never offered"
                );
            }
            _ => {}
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        // Linux disables each queue after resetting the device when it unbinds the driver
        // (vm_del_vq): harmless on a stopped device, so not worth a log line.
        let quiet = offset == QUEUE_READY && value == 0 && self.status & S_DRIVER_OK == 0;
        if quiet {
            if let Some(queue) = self.selected_queue() {
                queue.set_ready(false);
            }
            return;
        }
        if !self.queue_writable() {
            guest_log!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x}, ignored",
                self.status
            );
            return;
        }
        let sel = self.queue_sel;
        let Some(queue) = self.selected_queue() else {
            guest_log!("virtio-mmio: queue register {offset:#x} written for missing queue {sel}");
            return;
        };
        let result = match offset {
            QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => queue.try_set_size(size),
                Err(_) => Err(virtio_queue::Error::InvalidSize),
            },
            QUEUE_READY => {
                queue.set_ready(value == 1);
                Ok(())
            }
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH => {
                let addr = with_half(queue.desc_table(), offset == QUEUE_DESC_HIGH, value);
                queue.try_set_desc_table_address(GuestAddress(addr))
            }
            QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH => {
                let addr = with_half(queue.avail_ring(), offset == QUEUE_DRIVER_HIGH, value);
                queue.try_set_avail_ring_address(GuestAddress(addr))
            }
            _ => {
                let addr = with_half(queue.used_ring(), offset == QUEUE_DEVICE_HIGH, value);
                queue.try_set_used_ring_address(GuestAddress(addr))
            }
        };
        if let Err(e) = result {
            guest_log!("virtio-mmio: queue {sel}: register {offset:#x} = {value:#x} rejected: {e}");
        }
    }

    fn notify(&mut self, value: u32) {
        let evt = usize::try_from(value)
            .ok()
            .and_then(|index| self.queue_evts.get(index));
        match evt {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    guest_log!("virtio-mmio: cannot signal queue {value}: {e}");
                }
            }
            None => guest_log!("virtio-mmio: notify for missing queue {value}"),
        }
    }

    fn write_status(&mut self, status: u32) {
        if status == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if status & old != old {
            guest_log!(
                "virtio-mmio: status {old:#x} -> {status:#x} clears bits without a reset, ignored"
            );
            return;
        }
        let added = status & !old & !S_NEEDS_RESET;
        if added & S_FAILED != 0 {
            // The driver gave up on the device; it stays inert until reset.
            self.status = status;
            return;
        }
        match added {
            0 => {}
            S_ACK if old == 0 => self.status = status,
            S_DRIVER if old == S_ACK => self.status = status,
            S_FEATURES_OK if old == S_ACK | S_DRIVER => self.accept_features(status),
            S_DRIVER_OK if old & !S_NEEDS_RESET == S_ACK | S_DRIVER | S_FEATURES_OK => {
                self.activate(status);
            }
            _ => guest_log!("virtio-mmio: invalid status transition {old:#x} -> {status:#x}"),
        }
    }

    /// `FEATURES_OK`: keep the bit only if the driver's features are acceptable; the driver reads
    /// the status back and gives up if it is not set (virtio 1.1 §3.1.1).
    fn accept_features(&mut self, status: u32) {
        let unknown = self.driver_features & !self.avail_features;
        if unknown != 0 {
            guest_log!(
                "virtio-mmio: driver accepted features {unknown:#x} the device does not offer"
            );
            return;
        }
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            guest_log!("virtio-mmio: legacy driver (no VIRTIO_F_VERSION_1) refused");
            return;
        }
        lock(&self.device).ack_features(self.driver_features);
        self.status = status;
    }

    fn activate(&mut self, status: u32) {
        for (index, queue) in self.queues.iter().enumerate() {
            if !queue.is_valid(&self.mem) {
                guest_log!(
                    "virtio-mmio: DRIVER_OK with queue {index} not ready or outside guest memory"
                );
                self.needs_reset(status);
                return;
            }
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (queue, evt) in self.queues.iter().zip(&self.queue_evts) {
            let copy = Queue::try_from(queue.state());
            let notify = evt.try_clone();
            match (copy, notify) {
                (Ok(queue), Ok(notify)) => queues.push(DeviceQueue { queue, notify }),
                (Err(e), _) => {
                    guest_log!("virtio-mmio: cannot copy queue state: {e}");
                    self.needs_reset(status);
                    return;
                }
                (_, Err(e)) => {
                    eprintln!("virtio-mmio: cannot duplicate a queue eventfd: {e}");
                    self.needs_reset(status);
                    return;
                }
            }
        }
        let result =
            lock(&self.device).activate(self.mem.clone(), Arc::clone(&self.interrupt), queues);
        match result {
            Ok(()) => self.status = status,
            Err(e) => {
                eprintln!("virtio-mmio: device activation failed: {e}");
                self.needs_reset(status);
            }
        }
    }

    /// Marks the device broken until the driver resets it and tells the driver so.
    fn needs_reset(&mut self, status: u32) {
        self.status = status | S_NEEDS_RESET;
        if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
            eprintln!("virtio-mmio: cannot signal the configuration interrupt: {e}");
        }
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.clear();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG {
            lock(&self.device).read_config(offset - CONFIG, data);
            return;
        }
        let len = data.len();
        let Ok(bytes) = <&mut [u8; 4]>::try_from(data) else {
            guest_log!("virtio-mmio: {len}-byte read at {offset:#x}, registers are 32-bit");
            return;
        };
        if let Some(value) = self.read_register(offset) {
            *bytes = value.to_le_bytes();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            lock(&self.device).write_config(offset - CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_log!(
                "virtio-mmio: {}-byte write at {offset:#x}, registers are 32-bit",
                data.len()
            );
            return;
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[allow(clippy::cast_possible_truncation)] // Keeping the low half is the point.
fn low(v: u64) -> u32 {
    v as u32
}

fn high(v: u64) -> u32 {
    low(v >> 32)
}

/// `current` with its low or high 32 bits replaced by `value`.
fn with_half(current: u64, high_half: bool, value: u32) -> u64 {
    if high_half {
        (current & 0xffff_ffff) | (u64::from(value) << 32)
    } else {
        (current & !0xffff_ffff) | u64::from(value)
    }
}

#[cfg(test)]
mod tests;
