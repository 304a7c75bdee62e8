//! The VMM: a KVM virtual machine that boots the guest kernel directly, with the few devices a
//! container VM needs, or that is restored from a saved one (a VM template).
//!
//! Laid out as Firecracker's: [`builder`] makes a VM from a [`VmConfig`] ([`start`]: boot) or
//! from a snapshot of one of the same shape ([`restore`]); [`config`] is what a VM is made of,
//! and its shape; `vstate` is the KVM edge (guest
//! memory, vCPU threads); `arch::x86_64` what is x86 (layout, boot protocol, CPUID, registers,
//! MP table, the vCPU's and the VM's saved state); `devices` the models (`legacy`: serial,
//! i8042, boot markers; `virtio`: the MMIO transport, the plumbing every device shares, vsock,
//! fs, net; `persist`: the `Persist` trait each of them implements next to its own state);
//! [`persist`] the snapshot that gathers those states, and its files; `event_loop` the "vmm"
//! thread.
//!
//! Threads: the caller's thread ("api") starts the VM and waits for it to end; one thread runs
//! the device event loop ("vmm"); one thread per vCPU. What they share (their seccomp
//! filters, the poison-tolerant [`lock`], why the VM ended) is `threads`.
//!
//! How a VM ends: husk-init writes the `PowerOff` boot marker (the normal way), the guest
//! resets through the i8042 (`reboot=k`) or triple-faults, KVM reports an error, or the host
//! asks ([`RunningVm::stop`]). Whatever comes first is the [`VmExit`].

pub(crate) mod arch;
mod builder;
pub mod config;
pub mod devices;
mod event_loop;
pub mod host;
pub mod persist;
mod threads;
mod vstate;

use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_proto::marker::Marker;
use kvm_ioctls::VmFd;
use vmm_sys_util::signal::Killable;

use arch::{boot, mptable, regs};
pub use builder::{restore, spare_net_mac, start};
pub use config::{MAX_NETS, MAX_VCPUS, NetConfig, VmConfig};
use devices::EventFdTrigger;
use devices::legacy::marker::MarkerLog;
use threads::lock;
pub use threads::{SeccompMode, ThreadKind, VmExit, apply_seccomp};
use vstate::{memory, vcpu};

/// Errors building or starting a VM (bad input names what was wrong).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` missing or not accessible.
    #[error("cannot open /dev/kvm: {0} (is KVM available and do you have access to it?)")]
    Kvm(kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("{what}: {source}")]
    KvmCall {
        /// Which call.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// The configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Loading the kernel/initramfs.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// vCPU setup.
    #[error(transparent)]
    Cpu(#[from] regs::CpuSetupError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Device setup.
    #[error("setting up devices: {0}")]
    Devices(String),
    /// Saving or restoring a snapshot.
    #[error(transparent)]
    Snapshot(#[from] persist::SnapshotError),
    /// Threads, eventfds, signals.
    #[error("{what}: {source}")]
    Os {
        /// What.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Os { what, source }
}

/// When each boot phase happened.
#[derive(Debug, Clone)]
pub struct Timeline {
    /// The monitor process started (the caller's clock origin).
    pub process_start: Instant,
    /// The VM was fully built (memory, kernel, devices, vCPUs) and about to start.
    pub vm_ready: Instant,
    /// The boot vCPU's first `KVM_RUN`.
    pub first_entry: Option<Instant>,
    /// Each boot marker husk-init wrote.
    pub markers: Vec<(Instant, Result<Marker, u8>)>,
    /// The VM ended.
    pub exit: Instant,
}

impl Timeline {
    /// Milliseconds from the process start.
    pub fn ms(&self, t: Instant) -> f64 {
        t.duration_since(self.process_start).as_secs_f64() * 1000.0
    }

    /// The phases as (name, ms since process start), in order.
    pub fn phases(&self) -> Vec<(String, f64)> {
        let mut out = vec![("process start".to_string(), 0.0)];
        out.push(("VM ready".into(), self.ms(self.vm_ready)));
        if let Some(t) = self.first_entry {
            out.push(("first vCPU entry".into(), self.ms(t)));
        }
        for (t, m) in &self.markers {
            let name = match m {
                Ok(m) => format!("marker {}", m.name()),
                Err(b) => format!("marker {b:#04x} (unknown)"),
            };
            out.push((name, self.ms(*t)));
        }
        out.push(("exit".into(), self.ms(self.exit)));
        out
    }
}

/// A started VM.
pub struct RunningVm {
    // The VM and its memory: KVM's memory slots point into `mem`'s mappings, so both live
    // until every vCPU thread has been joined (fields drop in declaration order, after wait()).
    vm: VmFd,
    mem: memory::GuestMem,
    kvm: kvm_ioctls::Kvm,
    shape: config::Shape,
    exits: Receiver<VmExit>,
    run: Arc<vcpu::RunState>,
    loop_control: Arc<event_loop::LoopControl>,
    stop_evt: EventFdTrigger,
    vcpus: Vec<JoinHandle<Option<Instant>>>,
    event_loop: Option<JoinHandle<()>>,
    // Dropped on the waiting thread after the others are joined, so that the device's
    // teardown (removing its socket file) happens there and not on whichever thread lets go
    // last.
    vsock: Option<Arc<Mutex<devices::virtio::vsock::Vsock>>>,
    devices: Option<builder::Devices>,
    markers: Arc<Mutex<MarkerLog>>,
    process_start: Instant,
    vm_ready: Instant,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vcpus", &self.vcpus.len())
            .finish()
    }
}

/// A handle that controls a running VM from any thread: stop, pause, resume.
#[derive(Debug, Clone)]
pub struct VmHandle {
    run: Arc<vcpu::RunState>,
    evt: Arc<EventFdTrigger>,
    loop_control: Arc<event_loop::LoopControl>,
    vcpus: usize,
}

impl VmHandle {
    /// Asks the VM to stop (its exit is then [`VmExit::Stopped`] unless something else came
    /// first).
    pub fn stop(&self) {
        self.run.request_stop();
        self.loop_control.resume();
        let _ = vm_superio::Trigger::trigger(&*self.evt);
    }

    /// Pauses every vCPU (devices keep serving what is in flight). Returns once they are
    /// all out of the guest.
    pub fn pause(&self) -> Result<(), String> {
        if self.run.pause(self.vcpus) {
            Ok(())
        } else {
            self.run.resume();
            Err("the vCPUs did not stop within a second".into())
        }
    }

    /// Lets the vCPUs (and, after a snapshot, the devices) run again.
    pub fn resume(&self) {
        self.loop_control.resume();
        self.run.resume();
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.run.is_paused()
    }
}

impl RunningVm {
    /// A handle for stopping, pausing and resuming the VM from another thread.
    pub fn handle(&self) -> Result<VmHandle, VmError> {
        Ok(VmHandle {
            run: self.run.clone(),
            evt: Arc::new(self.stop_evt.try_clone().map_err(os("eventfd"))?),
            loop_control: self.loop_control.clone(),
            vcpus: self.vcpus.len(),
        })
    }

    /// Asks the VM to stop (the exit is then [`VmExit::Stopped`] unless something else came
    /// first).
    pub fn stop(&self) {
        self.run.request_stop();
        self.loop_control.resume();
        let _ = vm_superio::Trigger::trigger(&self.stop_evt);
    }

    /// Whether the VM has ended (its event loop is gone); [`RunningVm::wait`] says why.
    pub fn has_ended(&self) -> bool {
        self.event_loop.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Whether husk-init has written `marker` yet.
    pub fn marker_seen(&self, marker: Marker) -> bool {
        lock(&self.markers)
            .entries
            .iter()
            .any(|(_, m)| *m == Ok(marker))
    }

    /// Saves the VM into `dir` (an existing, empty directory): pauses it, has every vCPU save
    /// its registers on its own thread, saves the irqchip, PIT and clock, every device and
    /// guest memory (see [`persist`] for the files). The VM stays paused; [`VmHandle::resume`]
    /// lets it go on, [`RunningVm::stop`] ends it.
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<(), persist::SnapshotError> {
        use persist::SnapshotError;
        let failed = |e: String| SnapshotError::Save(e);
        if !self.run.pause(self.vcpus.len()) {
            return Err(failed("the vCPUs did not stop within a second".into()));
        }
        if !self.loop_control.pause(Duration::from_secs(5)) {
            return Err(failed(
                "the device event loop did not stop within 5 s".into(),
            ));
        }
        let msr_indices = self
            .kvm
            .get_msr_index_list()
            .map_err(|e| failed(format!("KVM_GET_MSR_INDEX_LIST: {e}")))?
            .as_slice()
            .to_vec();
        let vcpus = self
            .run
            .save_all(self.vcpus.len(), msr_indices, Duration::from_secs(5))
            .map_err(failed)?;
        let arch = arch::vm::VmArchState::save(&self.vm).map_err(|e| failed(e.to_string()))?;
        let devices = self
            .devices
            .as_ref()
            .map(builder::Devices::save)
            .ok_or_else(|| failed("the VM has ended".into()))?;
        let io = |what, path: &std::path::Path| {
            let path = path.display().to_string();
            move |source| SnapshotError::Io { what, path, source }
        };
        let create = |path: &std::path::Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io("creating", path))
        };
        let memory_path = dir.join(persist::MEMORY_FILE);
        let memory_file = create(&memory_path)?;
        memory::save(&self.mem, &memory_file).map_err(|e| failed(e.to_string()))?;
        memory_file
            .sync_all()
            .map_err(io("syncing", &memory_path))?;
        let memory =
            persist::FileIdentity::of(&memory_file).map_err(io("reading", &memory_path))?;
        let state = persist::VmState {
            shape: self.shape,
            memory,
            arch,
            vcpus,
            devices,
        };
        let bytes = persist::encode_state(&state)?;
        let state_path = dir.join(persist::STATE_FILE);
        let mut state_file = create(&state_path)?;
        std::io::Write::write_all(&mut state_file, &bytes).map_err(io("writing", &state_path))?;
        state_file.sync_all().map_err(io("syncing", &state_path))
    }

    /// Waits for the VM to end (or `timeout`), stops every thread and returns why it ended.
    pub fn wait(mut self, timeout: Option<Duration>) -> (VmExit, Timeline) {
        let why = match timeout {
            Some(t) => self
                .exits
                .recv_timeout(t)
                .unwrap_or_else(|_| VmExit::Error(format!("the VM did not finish within {t:?}"))),
            None => self
                .exits
                .recv()
                .unwrap_or_else(|_| VmExit::Error("every VM thread is gone".into())),
        };
        let exit = Instant::now();
        self.stop();
        // Kick the vCPUs out of KVM_RUN until they notice the stop flag.
        let mut first_entry = None;
        self.run.forget_threads();
        for (i, handle) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            while !handle.is_finished() {
                let _ = handle.kill(vcpu::kick_signal());
                std::thread::sleep(Duration::from_millis(2));
            }
            let entry = handle.join().ok().flatten();
            if i == 0 {
                first_entry = entry;
            }
        }
        if let Some(h) = self.event_loop.take() {
            let _ = h.join();
        }
        drop(self.devices.take());
        drop(self.vsock.take());
        let markers = self
            .markers
            .lock()
            .map(|m| m.entries.clone())
            .unwrap_or_default();
        let timeline = Timeline {
            process_start: self.process_start,
            vm_ready: self.vm_ready,
            first_entry,
            markers,
            exit,
        };
        (why, timeline)
    }
}
#[cfg(test)]
mod tests;
