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

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    DeviceQueue, Interrupt, InterruptKind, SharedDevice, VIRTIO_F_VERSION_1, VirtioDevice,
    guest_log,
};
use crate::vmm::devices::BusDevice;
use crate::vmm::lock;
use crate::vmm::persist::Persist;

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

/// One queue's registers, and how far the device had got in its rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// `QueueNum`.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// `QueueDesc`.
    pub desc_table: u64,
    /// `QueueDriver`.
    pub avail_ring: u64,
    /// `QueueDevice`.
    pub used_ring: u64,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` is in use.
    pub event_idx: bool,
}

/// The transport's registers and queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// The device behind it (checked on restore).
    pub device_type: u32,
    /// `Status`.
    pub status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// Interrupt bits the driver has not acknowledged.
    pub interrupt_status: u32,
    /// Every queue.
    pub queues: Vec<QueueRegs>,
}

/// Why a saved transport could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum MmioRestoreError {
    /// The transport could not be built.
    #[error(transparent)]
    Transport(#[from] MmioError),
    /// The saved state does not fit the device or guest memory.
    #[error("virtio-mmio: {0}")]
    Refused(String),
}

impl Persist for MmioTransport {
    type State = MmioState;
    /// Guest memory and the (restored, not yet active) device.
    type ConstructorArgs = (GuestMemoryMmap, SharedDevice);
    type Error = MmioRestoreError;

    fn save(&self) -> MmioState {
        let device = lock(&self.device);
        let live: Option<Vec<QueueState>> = device
            .active()
            .map(|active| active.queues.iter().map(Queue::state).collect());
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, queue)| {
                let s = live
                    .as_ref()
                    .and_then(|live| live.get(i).copied())
                    .unwrap_or_else(|| queue.state());
                QueueRegs {
                    size: s.size,
                    ready: s.ready,
                    desc_table: s.desc_table,
                    avail_ring: s.avail_ring,
                    used_ring: s.used_ring,
                    next_avail: s.next_avail,
                    next_used: s.next_used,
                    event_idx: s.event_idx_enabled,
                }
            })
            .collect();
        MmioState {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// A transport in the saved state in front of `device`: the registers and queues are set,
    /// the driver's features acknowledged to the device again, and a device that was running
    /// is activated with its queues where it had left them. Everything the state claims is
    /// checked as a guest's register writes would be (queue sizes, rings inside guest memory,
    /// features the device offers).
    fn restore(
        (mem, device): Self::ConstructorArgs,
        state: &MmioState,
    ) -> Result<Self, MmioRestoreError> {
        let refused = |why: String| MmioRestoreError::Refused(why);
        let mut t = MmioTransport::new(mem, device)?;
        if state.device_type != t.device_type {
            return Err(refused(format!(
                "saved for device type {}, restored onto type {}",
                state.device_type, t.device_type
            )));
        }
        if state.queues.len() != t.queues.len() {
            return Err(refused(format!(
                "{} saved queues for a device with {}",
                state.queues.len(),
                t.queues.len()
            )));
        }
        for (index, (queue, regs)) in t.queues.iter_mut().zip(&state.queues).enumerate() {
            let saved = QueueState {
                max_size: queue.max_size(),
                next_avail: regs.next_avail,
                next_used: regs.next_used,
                event_idx_enabled: regs.event_idx,
                size: regs.size,
                ready: regs.ready,
                desc_table: regs.desc_table,
                avail_ring: regs.avail_ring,
                used_ring: regs.used_ring,
            };
            *queue = Queue::try_from(saved).map_err(|e| refused(format!("queue {index}: {e}")))?;
        }
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_sel = state.queue_sel;
        let status = state.status;
        if status & S_FEATURES_OK != 0 {
            if state.driver_features & !t.avail_features != 0
                || state.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                return Err(refused(format!(
                    "features {:#x} are not ones the device offers ({:#x})",
                    state.driver_features, t.avail_features
                )));
            }
            lock(&t.device).ack_features(state.driver_features);
        }
        let running = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
        if status & (S_DRIVER_OK | S_FAILED | S_NEEDS_RESET) == S_DRIVER_OK {
            if status != running {
                return Err(refused(format!(
                    "status {status:#x} is not a running device's"
                )));
            }
            t.activate(status);
            if t.status != status {
                return Err(refused("the device did not take its saved queues".into()));
            }
        } else {
            t.status = status;
        }
        t.interrupt
            .restore_status(state.interrupt_status)
            .map_err(|e| refused(format!("re-raising the interrupt: {e}")))?;
        Ok(t)
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
mod tests {
    use std::sync::Mutex;

    use super::*;
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
}
