//! vCPU threads: each runs `KVM_RUN` in a loop and routes port I/O and MMIO exits to the
//! buses. A vCPU stops when the VM's stop flag is set; the VMM kicks it out of `KVM_RUN` with
//! [`kick_signal`], whose handler does nothing (the interrupted ioctl returns `EINTR`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::vmm::arch::x86_64::vcpu::VcpuState;
use crate::vmm::devices::EventFdTrigger;
use crate::vmm::devices::bus::Bus;
use crate::vmm::threads::{SeccompMode, ThreadKind, VmExit, apply_seccomp, lock};

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (process-wide) no-op handler for [`kick_signal`]; without SA_RESTART, so a
/// blocked `KVM_RUN` returns `EINTR`.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Its index.
    pub id: u8,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Stop and pause requests.
    pub run: Arc<RunState>,
    /// Where a vCPU reports why the VM must end.
    pub exits: Sender<VmExit>,
    /// Written together with `exits`, so the event loop wakes up.
    pub exit_evt: EventFdTrigger,
    /// Whether to confine the thread with its seccomp filter before the first entry.
    pub seccomp: SeccompMode,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish()
    }
}

impl Vcpu {
    /// Runs the vCPU until the VM stops. Returns the time of the first `KVM_RUN`.
    pub fn run(mut self) -> Option<Instant> {
        if let Err(e) = apply_seccomp(self.seccomp, ThreadKind::Vcpu) {
            self.exit(VmExit::Error(format!("vCPU {}: {e}", self.id)));
            return None;
        }
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.run.register(me);
        let mut first_entry = None;
        let run = self.run.clone();
        while !run.stop.load(Ordering::Acquire) {
            if run.park_if_paused(self.id, &mut |msrs| self.save_state(msrs)) {
                continue;
            }
            if first_entry.is_none() {
                first_entry = Some(Instant::now());
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    let msg = format!("vCPU {}: KVM_RUN failed: {e}", self.id);
                    self.exit(VmExit::Error(msg));
                    break;
                }
            };
            match exit {
                VcpuExit::IoIn(port, data) => {
                    self.pio.read(u64::from(port), data);
                }
                VcpuExit::IoOut(port, data) => {
                    self.pio.write(u64::from(port), data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.mmio.read(addr, data);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write(addr, data);
                }
                VcpuExit::Shutdown => {
                    // A triple fault, or the guest asked KVM to shut down.
                    self.exit(VmExit::Reset);
                    break;
                }
                VcpuExit::SystemEvent(kind, _) => {
                    let reset = kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET;
                    self.exit(if reset {
                        VmExit::Reset
                    } else {
                        VmExit::PowerOff
                    });
                    break;
                }
                VcpuExit::Hlt => {
                    // With the in-kernel irqchip KVM handles HLT itself; an HLT exit means the
                    // vCPU stopped for good (interrupts off).
                    self.exit(VmExit::Error(format!(
                        "vCPU {} halted with interrupts off",
                        self.id
                    )));
                    break;
                }
                VcpuExit::InternalError => {
                    // Where: the guest's instruction pointer, to look up in System.map.
                    let rip = self
                        .fd
                        .get_regs()
                        .map_or_else(|e| format!("unknown ({e})"), |r| format!("{:#x}", r.rip));
                    self.exit(VmExit::Error(format!(
                        "vCPU {}: KVM internal error at rip {rip} (an instruction KVM could \
                         not emulate?)",
                        self.id
                    )));
                    break;
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    self.exit(VmExit::Error(format!(
                        "vCPU {}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})",
                        self.id
                    )));
                    break;
                }
                VcpuExit::Intr => {}
                other => {
                    let msg = format!("vCPU {}: unexpected exit {other:?}", self.id);
                    self.exit(VmExit::Error(msg));
                    break;
                }
            }
        }
        first_entry
    }

    /// Saves this (parked) vCPU's state for a snapshot.
    fn save_state(&mut self, msr_indices: &[u32]) -> Result<VcpuState, String> {
        // An instruction whose port or MMIO read this thread answered last completes only on
        // the next entry (KVM then writes the value into its register): enter once with
        // `immediate_exit`, which completes it and returns EINTR before running the guest.
        self.fd.set_kvm_immediate_exit(1);
        let entered = self.fd.run().map(|exit| format!("{exit:?}"));
        self.fd.set_kvm_immediate_exit(0);
        match entered {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(format!("vCPU {}: completing its last exit: {e}", self.id)),
            Ok(exit) => {
                return Err(format!(
                    "vCPU {}: exited ({exit}) where it should have stopped",
                    self.id
                ));
            }
        }
        VcpuState::save(&self.fd, self.id, msr_indices).map_err(|e| e.to_string())
    }

    fn exit(&self, why: VmExit) {
        let _ = self.exits.send(why);
        let _ = vm_superio::Trigger::trigger(&self.exit_evt);
    }
}

/// What the vCPU threads share with whoever controls the VM: the stop flag, the pause flag
/// they park on, and their pthread ids for kicks.
#[derive(Debug, Default)]
pub struct RunState {
    /// Set when the VM stops for good.
    pub stop: AtomicBool,
    paused: Mutex<bool>,
    wake: Condvar,
    parked: AtomicUsize,
    /// The vCPU threads (cleared, under the lock, before they are joined: a kick never goes
    /// to a thread that is gone).
    threads: Mutex<Vec<libc::pthread_t>>,
    /// An open request to save the vCPUs' state, and their answers.
    save: Mutex<SaveRequest>,
    /// Signalled when a vCPU answered.
    saved: Condvar,
}

/// A request to the parked vCPUs to save their state ([`RunState::save_all`]).
#[derive(Debug, Default)]
struct SaveRequest {
    /// The MSRs to save, while the request is open.
    msr_indices: Option<Arc<Vec<u32>>>,
    /// Each vCPU's answer, by id.
    results: Vec<Option<Result<VcpuState, String>>>,
}

impl RunState {
    fn register(&self, thread: libc::pthread_t) {
        lock(&self.threads).push(thread);
    }

    /// Called by vCPU `id` before each entry: parks while the VM is paused, saving its state
    /// with `save` when asked to ([`RunState::save_all`]). Returns whether it parked (the
    /// caller re-checks the stop flag).
    fn park_if_paused(
        &self,
        id: u8,
        save: &mut dyn FnMut(&[u32]) -> Result<VcpuState, String>,
    ) -> bool {
        let mut paused = lock(&self.paused);
        if !*paused {
            return false;
        }
        self.parked.fetch_add(1, Ordering::AcqRel);
        while *paused && !self.stop.load(Ordering::Acquire) {
            if let Some(msr_indices) = self.save_requested(id) {
                drop(paused);
                let result = save(&msr_indices);
                let mut request = lock(&self.save);
                if let Some(slot) = request.results.get_mut(usize::from(id)) {
                    *slot = Some(result);
                }
                self.saved.notify_all();
                drop(request);
                paused = lock(&self.paused);
                continue;
            }
            paused = self
                .wake
                .wait(paused)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        self.parked.fetch_sub(1, Ordering::AcqRel);
        true
    }

    /// The MSRs to save, if a save request is open that vCPU `id` has not answered.
    fn save_requested(&self, id: u8) -> Option<Arc<Vec<u32>>> {
        let request = lock(&self.save);
        let msr_indices = request.msr_indices.clone()?;
        let unanswered = request
            .results
            .get(usize::from(id))
            .is_some_and(Option::is_none);
        unanswered.then_some(msr_indices)
    }

    /// Has each of the `vcpus` (paused: see [`RunState::pause`]) save its state on its own
    /// thread; returns the states in id order, or why not (a vCPU failed, or did not answer
    /// within `timeout`).
    pub fn save_all(
        &self,
        vcpus: usize,
        msr_indices: Vec<u32>,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, String> {
        {
            let mut request = lock(&self.save);
            request.msr_indices = Some(Arc::new(msr_indices));
            request.results = (0..vcpus).map(|_| None).collect();
        }
        // Under the pause lock, so that a vCPU between its check and its wait cannot miss it.
        drop(lock(&self.paused));
        self.wake.notify_all();
        let deadline = std::time::Instant::now() + timeout;
        let mut request = lock(&self.save);
        while request.results.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            request = self
                .saved
                .wait_timeout(request, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        request.msr_indices = None;
        let results = std::mem::take(&mut request.results);
        drop(request);
        results
            .into_iter()
            .enumerate()
            .map(|(id, result)| match result {
                Some(result) => result,
                None => Err(format!(
                    "vCPU {id} did not save its state within {timeout:?}"
                )),
            })
            .collect()
    }

    /// Kicks every registered vCPU out of KVM_RUN.
    pub fn kick_all(&self) {
        for t in lock(&self.threads).iter() {
            // SAFETY: the ids belong to live vCPU threads: the list is emptied (under this
            // lock) before any of them is joined.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Forgets the threads (before joining them).
    pub fn forget_threads(&self) {
        lock(&self.threads).clear();
    }

    /// Pauses the vCPUs; returns once all `vcpus` are parked (or after a second, false).
    pub fn pause(&self, vcpus: usize) -> bool {
        *lock(&self.paused) = true;
        for _ in 0..500 {
            if self.parked.load(Ordering::Acquire) >= vcpus {
                return true;
            }
            self.kick_all();
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        *lock(&self.paused) = false;
        self.wake.notify_all();
    }

    /// Stops for good: sets the flag and wakes parked vCPUs.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _guard = lock(&self.paused);
        self.wake.notify_all();
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        *lock(&self.paused)
    }
}
