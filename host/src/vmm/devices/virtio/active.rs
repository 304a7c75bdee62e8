//! Activation: what a virtio device is handed when its driver sets `DRIVER_OK` (a
//! [`DeviceQueue`] per queue), why it may refuse ([`ActivateError`]), and what it holds while
//! the driver runs it ([`Active`]), with the plumbing around it that fs, net and vsock share:
//! taking the queues the transport hands over, registering their notification eventfds in the
//! device's own epoll set, clearing a notification when it fires, interrupting the guest after
//! used buffers, and removing the eventfds from the epoll set again when the device is reset or
//! dropped.
//!
//! The eventfds are duplicates of the transport's (which registered the originals with KVM as
//! ioeventfds): closing a duplicate does not take the file out of an epoll set, so the removal
//! is explicit, in [`Drop`].
//!
//! The device contract (`VirtioDevice`, in `mod.rs`) is written in these terms, so they are
//! here, below it, and this file needs nothing from `mod.rs`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::{Interrupt, InterruptKind};

/// One queue as handed to a device at activation: the queue state the driver configured and
/// the eventfd the driver's notifications for it arrive on.
#[derive(Debug)]
pub struct DeviceQueue {
    /// The queue, configured and validated by the transport.
    pub queue: Queue,
    /// Written (through a KVM ioeventfd, or by the transport) whenever the driver notifies.
    pub notify: EventFd,
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// the driver set up {got} queues where the device needs {want}
    #[error("the driver set up {got} queues where the device needs {want}")]
    QueueCount {
        /// Queues the device needs.
        want: usize,
        /// Queues the transport passed.
        got: usize,
    },
    /// the device is already active
    #[error("the device is already active")]
    AlreadyActive,
    /// could not register a queue notification with the device's event loop
    #[error("could not register a queue notification with the device's event loop")]
    Register(#[source] io::Error),
}

/// A device's queues while its driver runs it. See the module docs.
#[derive(Debug)]
pub struct Active {
    /// Guest memory, where the rings and buffers are.
    pub mem: GuestMemoryMmap,
    /// The device's interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// The queues, in the device's order, as the device advances them.
    pub queues: Vec<Queue>,
    /// Queue `i`'s notification eventfd, registered under `token_base + i`.
    evts: Vec<EventFd>,
    token_base: u64,
    /// A duplicate of the device's epoll fd, so that `Drop` can unregister the eventfds.
    epoll: OwnedFd,
}

impl Active {
    /// Takes over `queues` (which must be exactly `want` of them) and registers queue `i`'s
    /// notification in `epoll` under the token `token_base + i`. On failure nothing stays
    /// registered.
    pub fn new(
        epoll: &Epoll,
        token_base: u64,
        want: usize,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<DeviceQueue>,
    ) -> Result<Self, ActivateError> {
        if queues.len() != want {
            return Err(ActivateError::QueueCount {
                want,
                got: queues.len(),
            });
        }
        // SAFETY: `epoll` is borrowed, so its fd is open for the duration of the call.
        let epoll = unsafe { BorrowedFd::borrow_raw(epoll.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(ActivateError::Register)?;
        let (queues, evts): (Vec<Queue>, Vec<EventFd>) =
            queues.into_iter().map(|q| (q.queue, q.notify)).unzip();
        let mut active = Active {
            mem,
            interrupt,
            queues,
            evts: Vec::with_capacity(want),
            token_base,
            epoll,
        };
        // Registered one by one into `active.evts`, so that a failure part-way unregisters
        // (on drop) exactly those that were added.
        for (token, evt) in (token_base..).zip(evts) {
            epoll_ctl(&active.epoll, libc::EPOLL_CTL_ADD, &evt, token)
                .map_err(ActivateError::Register)?;
            active.evts.push(evt);
        }
        Ok(active)
    }

    /// If `token` is one of the queue notifications, clears it and returns the queue's index.
    pub fn clear_notification(&self, token: u64) -> Option<usize> {
        let index = usize::try_from(token.checked_sub(self.token_base)?).ok()?;
        let evt = self.evts.get(index)?;
        // Non-blocking: EAGAIN when it was already cleared, which is fine.
        let _ = evt.read();
        Some(index)
    }

    /// Signals queue `index`'s notification itself, so that the event loop comes back to a
    /// device that left work for later (level-triggered: the device's epoll fd stays readable).
    pub fn renotify(&self, index: usize) -> std::io::Result<()> {
        match self.evts.get(index) {
            Some(evt) => evt.write(1),
            None => Ok(()),
        }
    }

    /// Interrupts the guest if it asked to be told about any of the queues that the device
    /// `used`. Every used queue is asked: with `EVENT_IDX` the question records state.
    pub fn notify_used(&mut self, used: &[usize], device: &str) {
        let mut notify = false;
        for &index in used {
            if let Some(queue) = self.queues.get_mut(index)
                && queue.needs_notification(&self.mem).unwrap_or(true)
            {
                notify = true;
            }
        }
        if notify && let Err(e) = self.interrupt.trigger(InterruptKind::Vring) {
            eprintln!("{device}: cannot interrupt the guest: {e}");
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        for evt in &self.evts {
            let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, evt, 0);
        }
    }
}

/// `epoll_ctl(2)` on the duplicate epoll fd (`vmm_sys_util`'s `Epoll` cannot be made from one);
/// `token` is the event's data, readable (`EPOLLIN`) the only interest.
fn epoll_ctl(epoll: &OwnedFd, op: libc::c_int, fd: &EventFd, token: u64) -> std::io::Result<()> {
    let mut event = libc::epoll_event {
        events: EventSet::IN.bits(),
        u64: token,
    };
    // SAFETY: both fds are open (owned by `epoll` and `fd`); `event` is a live epoll_event
    // that the kernel only reads (and ignores for EPOLL_CTL_DEL).
    let rc = unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd.as_raw_fd(), &mut event) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::epoll::EpollEvent;

    use crate::vmm::devices::virtio::test_utils::guest_memory;

    fn queues(n: usize) -> Vec<DeviceQueue> {
        (0..n)
            .map(|_| DeviceQueue {
                queue: Queue::new(16).unwrap(),
                notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            })
            .collect()
    }

    fn ready(epoll: &Epoll) -> Vec<u64> {
        let mut events = [EpollEvent::default(); 8];
        let n = epoll.wait(0, &mut events).unwrap();
        let mut tokens: Vec<u64> = events[..n].iter().map(EpollEvent::data).collect();
        tokens.sort_unstable();
        tokens
    }

    #[test]
    fn registers_clears_and_unregisters_the_notifications() {
        let epoll = Epoll::new().unwrap();
        let irq = Arc::new(Interrupt::new().unwrap());
        let active = Active::new(&epoll, 10, 2, guest_memory(), irq, queues(2)).unwrap();
        active.renotify(0).unwrap();
        active.renotify(1).unwrap();
        assert_eq!(ready(&epoll), vec![10, 11]);
        assert_eq!(active.clear_notification(11), Some(1));
        assert_eq!(ready(&epoll), vec![10]);
        assert_eq!(active.clear_notification(9), None);
        assert_eq!(active.clear_notification(12), None);
        drop(active);
        // Still signalled when dropped, but no longer in the set.
        assert!(ready(&epoll).is_empty());
    }

    #[test]
    fn refuses_the_wrong_number_of_queues() {
        let epoll = Epoll::new().unwrap();
        let irq = Arc::new(Interrupt::new().unwrap());
        let err = Active::new(&epoll, 0, 3, guest_memory(), irq, queues(2)).unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount { want: 3, got: 2 }));
    }
}
