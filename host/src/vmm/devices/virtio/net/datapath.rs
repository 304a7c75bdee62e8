//! The data path (see the module docs of `net`): one call moves frames both ways, guest to
//! tap and tap to guest, until either side would block or the per-call budget runs out, with
//! at most one frame held per direction; a malformed chain breaks the device.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_HDR_F_DATA_VALID};
use virtio_queue::{QueueOwnedT, QueueT};

use super::chain::{Malformed, read_tx_chain, write_rx_chain};
use super::frame::{as_flag, bit, rx_frame_problem, tap_offloads, tx_frame_problem};
use super::{MAX_FRAMES_PER_CALL, Net, NetMetrics, RXQ, TXQ, Tap, VNET_HDR_LEN};
use crate::vmm::devices::virtio::{InterruptKind, guest_log};

fn count(counter: &AtomicU64, n: usize) {
    counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
}

impl Net {
    /// The work of [`Net::process_events`] once its events are cleared: the tap's offloads
    /// if the driver negotiated anew, then both directions, then the guest's interrupt.
    pub(super) fn process_queues(&mut self) {
        if self.broken || self.active.is_none() {
            return;
        }
        if self.offload_pending {
            self.offload_pending = false;
            let flags = tap_offloads(self.acked_features);
            if let Some(tap) = &self.tap
                && let Err(e) = tap.set_offload(flags)
            {
                // The tap then does all checksums and segmentation itself: slower, still right.
                eprintln!(
                    "virtio-net: cannot set the offloads {flags:#x} of the tap {}: {e}",
                    tap.name()
                );
            }
        }
        let tx = self.process_tx();
        let rx = self.process_rx();
        let (tx, rx) = match (tx, rx) {
            (Ok(tx), Ok(rx)) => (tx, rx),
            (Err(Malformed(why)), _) | (_, Err(Malformed(why))) => {
                self.break_device(&why);
                return;
            }
        };
        if tx.more || rx.more {
            // Level-triggered: the event loop calls again after its other work.
            if let Err(e) = self.more.write(1) {
                eprintln!("virtio-net: cannot re-arm the device: {e}");
            }
        }
        let Some(active) = &mut self.active else {
            return;
        };
        let used: Vec<usize> = [(RXQ, rx.used), (TXQ, tx.used)]
            .into_iter()
            .filter_map(|(index, used)| used.then_some(index))
            .collect();
        active.notify_used(&used, "virtio-net");
    }

    /// Marks the device broken: it stops until the driver resets it.
    fn break_device(&mut self, why: &str) {
        self.broken = true;
        guest_log!("virtio-net: {why}; the device stops until the driver resets it");
        if let Some(active) = &self.active
            && let Err(e) = active.interrupt.trigger(InterruptKind::Config)
        {
            eprintln!("virtio-net: cannot signal the configuration interrupt: {e}");
        }
    }

    /// Sends the pending frame, then guest frames, until the tap would block, the guest has
    /// none left or the budget is spent.
    fn process_tx(&mut self) -> Result<Progress, Malformed> {
        let mut progress = Progress::default();
        if self.tx_len > 0 {
            if !send_frame(
                self.tap.as_ref(),
                &self.tx_buf[..self.tx_len],
                &self.metrics,
            ) {
                return Ok(progress);
            }
            self.tx_len = 0;
        }
        let Some(active) = &mut self.active else {
            return Ok(progress);
        };
        for _ in 0..MAX_FRAMES_PER_CALL {
            let mem = &active.mem;
            let queue = &mut active.queues[TXQ];
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return Ok(progress);
            };
            let head = chain.head_index();
            let len = read_tx_chain(mem, chain, &mut self.tx_buf)?;
            if let Err(e) = queue.add_used(mem, head, 0) {
                return Err(Malformed(format!(
                    "cannot return TX descriptor {head}: {e}"
                )));
            }
            progress.used = true;
            if let Some(why) = tx_frame_problem(&self.tx_buf[..len], self.acked_features) {
                guest_log!("virtio-net: dropping a {len}-byte TX frame: {why}");
                self.metrics.tx_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // num_buffers means nothing on transmit.
            self.tx_buf[10..VNET_HDR_LEN].fill(0);
            if !send_frame(self.tap.as_ref(), &self.tx_buf[..len], &self.metrics) {
                // Wait for the tap to become writable (an edge on the tap fd).
                self.tx_len = len;
                return Ok(progress);
            }
        }
        progress.more = active.queues[TXQ]
            .avail_idx(&active.mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != active.queues[TXQ].next_avail());
        Ok(progress)
    }

    /// Delivers tap frames into RX buffers until the tap is empty, the guest has no buffer
    /// or the budget is spent.
    fn process_rx(&mut self) -> Result<Progress, Malformed> {
        let mut progress = Progress::default();
        let Some(active) = &mut self.active else {
            return Ok(progress);
        };
        for _ in 0..MAX_FRAMES_PER_CALL {
            if self.rx_len == 0 {
                let Some(tap) = &self.tap else {
                    return Ok(progress);
                };
                match tap.read_frame(&mut self.rx_buf) {
                    Ok(n) => {
                        if let Some(why) = rx_frame_problem(&self.rx_buf[..n], self.acked_features)
                        {
                            guest_log!("virtio-net: dropping a {n}-byte frame from the tap: {why}");
                            self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        self.rx_len = n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(progress),
                    Err(e) => {
                        eprintln!("virtio-net: reading the tap {}: {e}", tap.name());
                        return Ok(progress);
                    }
                }
            }
            let mem = &active.mem;
            let queue = &mut active.queues[RXQ];
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Wait for the guest's RX notification; the frame stays.
                return Ok(progress);
            };
            let head = chain.head_index();
            let frame = &mut self.rx_buf[..self.rx_len];
            // The tap's header as it is (checked against the features), in one buffer.
            if self.acked_features & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
                frame[0] &= !as_flag(VIRTIO_NET_HDR_F_DATA_VALID);
            }
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            match write_rx_chain(mem, chain, frame)? {
                Some(written) => {
                    queue.add_used(mem, head, written).map_err(|e| {
                        Malformed(format!("cannot return RX descriptor {head}: {e}"))
                    })?;
                    progress.used = true;
                    self.metrics.rx_frames.fetch_add(1, Ordering::Relaxed);
                    count(&self.metrics.rx_bytes, frame.len() - VNET_HDR_LEN);
                }
                None => {
                    // The buffer is too small for this frame: keep it for the next one.
                    queue.go_to_previous_position();
                    guest_log!(
                        "virtio-net: a {}-byte frame does not fit the guest's receive buffer; dropped",
                        frame.len()
                    );
                    self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.rx_len = 0;
        }
        progress.more = true;
        Ok(progress)
    }
}

/// What one direction did in one call.
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    /// At least one chain went to the used ring.
    used: bool,
    /// Work is left (the budget ran out).
    more: bool,
}

/// Writes one frame to the tap; false if the tap cannot take it yet (`EAGAIN`). Other
/// failures drop the frame, as does a device without a tap.
fn send_frame(tap: Option<&Tap>, frame: &[u8], metrics: &NetMetrics) -> bool {
    let Some(tap) = tap else {
        metrics.tx_dropped.fetch_add(1, Ordering::Relaxed);
        return true;
    };
    match tap.write_frame(frame) {
        Ok(_) => {
            metrics.tx_frames.fetch_add(1, Ordering::Relaxed);
            count(&metrics.tx_bytes, frame.len() - VNET_HDR_LEN);
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
        Err(e) => {
            guest_log!(
                "virtio-net: the tap {} refused a {}-byte frame: {e}",
                tap.name(),
                frame.len()
            );
            metrics.tx_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
    true
}
