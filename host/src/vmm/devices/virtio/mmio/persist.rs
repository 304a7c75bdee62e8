//! Saving and restoring the transport: its registers, and each queue where the device had
//! got to in it (the transport's own copy of a queue stops at activation; the device's
//! [`Active`](super::super::Active) has the live one).
//!
//! Like each device's saved state, [`MmioState`] is defined here, next to the code it saves,
//! and the snapshot (`vmm::persist`) names it here. The transport itself (`mod.rs`) needs
//! nothing from this file, so it does not re-export it: this file extends the transport, never
//! the other way round.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{
    MmioError, MmioTransport, S_ACK, S_DRIVER, S_DRIVER_OK, S_FAILED, S_FEATURES_OK, S_NEEDS_RESET,
};
use crate::vmm::devices::persist::Persist;
use crate::vmm::devices::virtio::{SharedDevice, VIRTIO_F_VERSION_1};
use crate::vmm::threads::lock;

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
