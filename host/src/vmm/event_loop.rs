//! The "vmm" thread: waits on the VM's events (stop requests and power-off markers, the
//! i8042 reset) and on the device back-ends, and turns them into a [`VmExit`].

use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::devices::EventFdTrigger;
use super::devices::virtio::fs::Fs;
use super::devices::virtio::net::Net;
use super::devices::virtio::vsock::Vsock;
use super::threads::{SeccompMode, ThreadKind, VmExit, apply_seccomp, lock};

const TOKEN_STOP: u64 = 0;
const TOKEN_RESET: u64 = 1;
const TOKEN_POWER_OFF: u64 = 2;
const TOKEN_VSOCK: u64 = 3;
const TOKEN_PAUSE: u64 = 4;
/// virtio-net device `i` has token `TOKEN_NET + i` (below `TOKEN_FS`: at most 8 devices).
const TOKEN_NET: u64 = 8;
/// virtio-fs device `i` has token `TOKEN_FS + i`.
const TOKEN_FS: u64 = 16;

/// The event loop's inputs.
pub struct EventLoop {
    /// Written by vCPUs reporting an exit and by [`super::RunningVm::stop`].
    pub stop_evt: EventFdTrigger,
    /// Written by the boot-marker port on husk-init's `PowerOff` marker.
    pub power_off_evt: EventFdTrigger,
    /// Written by the i8042 when the guest resets.
    pub reset_evt: EventFdTrigger,
    /// The vsock device, whose back-end (host sockets, queue notifications) this loop drives.
    pub vsock: Option<Arc<Mutex<Vsock>>>,
    /// The virtio-fs devices (their FUSE servers run on this thread).
    pub fs: Vec<Arc<Mutex<Fs>>>,
    /// The virtio-net devices (their tap I/O runs on this thread).
    pub nets: Vec<Arc<Mutex<Net>>>,
    /// Where the reason for the end goes.
    pub exits: Sender<VmExit>,
    /// Seccomp for this thread.
    pub seccomp: SeccompMode,
    /// Pausing the loop from another thread.
    pub control: Arc<LoopControl>,
}

/// Lets another thread hold the event loop between two events: a snapshot must see devices
/// (and the guest memory they write) that do not change under it.
#[derive(Debug)]
pub struct LoopControl {
    evt: EventFdTrigger,
    state: Mutex<LoopPause>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct LoopPause {
    requested: bool,
    parked: bool,
}

impl LoopControl {
    /// A control for one loop.
    pub fn new() -> std::io::Result<Self> {
        Ok(LoopControl {
            evt: EventFdTrigger::new()?,
            state: Mutex::new(LoopPause::default()),
            changed: Condvar::new(),
        })
    }

    /// Stops the loop once it is done with the event at hand; returns whether it stopped
    /// within `timeout` (if not, the request is withdrawn).
    pub fn pause(&self, timeout: Duration) -> bool {
        lock(&self.state).requested = true;
        let _ = vm_superio::Trigger::trigger(&self.evt);
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.state);
        while !state.parked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                state.requested = false;
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Lets a paused loop go on.
    pub fn resume(&self) {
        lock(&self.state).requested = false;
        self.changed.notify_all();
    }

    /// On the loop's thread: waits while a pause is requested.
    fn park(&self) {
        let _ = self.evt.0.read();
        let mut state = lock(&self.state);
        state.parked = true;
        self.changed.notify_all();
        while state.requested {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.parked = false;
    }
}

impl EventLoop {
    /// Runs until the VM must end.
    pub fn run(self) {
        if let Err(e) = self.serve() {
            let _ = self
                .exits
                .send(VmExit::Error(format!("vmm event loop: {e}")));
        }
    }

    fn serve(&self) -> Result<(), String> {
        let epoll = Epoll::new().map_err(|e| format!("epoll_create: {e}"))?;
        for (fd, token) in [
            (&self.stop_evt, TOKEN_STOP),
            (&self.reset_evt, TOKEN_RESET),
            (&self.power_off_evt, TOKEN_POWER_OFF),
            (&self.control.evt, TOKEN_PAUSE),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    std::os::fd::AsRawFd::as_raw_fd(&fd.0),
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| format!("epoll_ctl: {e}"))?;
        }
        if let Some(vsock) = &self.vsock {
            let fd = lock(vsock).epoll_fd();
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, TOKEN_VSOCK),
                )
                .map_err(|e| format!("epoll_ctl: {e}"))?;
        }
        for (i, fs) in (0u64..).zip(&self.fs) {
            let fd = lock(fs).epoll_fd();
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, TOKEN_FS + i),
                )
                .map_err(|e| format!("epoll_ctl: {e}"))?;
        }
        for (i, net) in (0u64..).zip(&self.nets) {
            let fd = lock(net).epoll_fd();
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, TOKEN_NET + i),
                )
                .map_err(|e| format!("epoll_ctl: {e}"))?;
        }
        if !self.fs.is_empty() {
            // The FUSE server sets umask(0) on every INIT; the umask is per fs_struct, which
            // threads share unless one unshares it. Keep it to this thread.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
                .map_err(|e| format!("unshare(CLONE_FS) for the virtio-fs server: {e}"))?;
        }
        apply_seccomp(self.seccomp, ThreadKind::Vmm)?;
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("epoll_wait: {e}")),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => {
                        // A vCPU's exit report (already in the channel, so it wins) or a host
                        // stop request.
                        let _ = self.stop_evt.0.read();
                        let _ = self.exits.send(VmExit::Stopped);
                        return Ok(());
                    }
                    TOKEN_POWER_OFF => {
                        let _ = self.power_off_evt.0.read();
                        let _ = self.exits.send(VmExit::PowerOff);
                        return Ok(());
                    }
                    TOKEN_RESET => {
                        let _ = self.reset_evt.0.read();
                        let _ = self.exits.send(VmExit::Reset);
                        return Ok(());
                    }
                    TOKEN_PAUSE => self.control.park(),
                    TOKEN_VSOCK => {
                        if let Some(vsock) = &self.vsock {
                            lock(vsock).process_events();
                        }
                    }
                    token if (TOKEN_NET..TOKEN_FS).contains(&token) => {
                        let i = usize::try_from(token - TOKEN_NET).unwrap_or(usize::MAX);
                        if let Some(net) = self.nets.get(i) {
                            lock(net).process_events();
                        }
                    }
                    token if token >= TOKEN_FS => {
                        let i = usize::try_from(token - TOKEN_FS).unwrap_or(usize::MAX);
                        if let Some(fs) = self.fs.get(i) {
                            lock(fs).process_events();
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
