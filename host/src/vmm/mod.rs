//! The VMM: a KVM virtual machine that boots the guest kernel directly, with the few devices a
//! container VM needs, or that is restored from a saved one (a VM template).
//!
//! Laid out as Firecracker's: [`builder`] makes a VM from a [`VmConfig`] ([`start`]: boot) or
//! from a snapshot of one of the same shape ([`restore`]); `vstate` is the KVM edge (guest
//! memory, vCPU threads); `arch::x86_64` what is x86 (layout, boot protocol, CPUID, registers,
//! MP table, the vCPU's and the VM's saved state); `devices` the models (`legacy`: serial,
//! i8042, boot markers; `virtio`: the MMIO transport, the plumbing every device shares, vsock,
//! fs, net); [`persist`] the [`persist::Persist`] trait every part implements and the
//! snapshot's files; `event_loop` the "vmm" thread.
//!
//! Threads: the caller's thread ("api") starts the VM and waits for it to end; one thread runs
//! the device event loop ("vmm"); one thread per vCPU. Each confines itself with its own
//! seccomp filter (crate `husk-seccomp`) after setup and before it handles anything the guest
//! controls.
//!
//! How a VM ends: husk-init writes the `PowerOff` boot marker (the normal way), the guest
//! resets through the i8042 (`reboot=k`) or triple-faults, KVM reports an error, or the host
//! asks ([`RunningVm::stop`]). Whatever comes first is the [`VmExit`].

pub(crate) mod arch;
mod builder;
pub mod devices;
mod event_loop;
pub mod host;
pub mod kernel_log;
pub mod persist;
mod vstate;

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_proto::marker::Marker;
use kvm_ioctls::VmFd;
use vmm_sys_util::signal::Killable;

use arch::{boot, mptable, regs};
pub use builder::{restore, spare_net_mac, start};
use devices::EventFdTrigger;
use devices::legacy::marker::MarkerLog;
use vstate::{memory, vcpu};

/// Reads guest-physical memory at an address into a buffer; `Err` for a range outside guest
/// RAM.
pub type ReadGuest<'a> = dyn Fn(u64, &mut [u8]) -> Result<(), String> + 'a;

/// How a VM is built.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The uncompressed guest kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel parameters.
    pub cmdline_extra: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Attach the serial console (kernel messages to the monitor's stdout).
    pub console: bool,
    /// How the threads' seccomp filters are applied.
    pub seccomp: SeccompMode,
    /// The vsock device: the host-side Unix socket (guest-initiated connections go to
    /// `<path>_<port>`), `None` for a VM without one.
    pub vsock: Option<PathBuf>,
    /// virtio-fs devices: (tag, host directory) each.
    pub shares: Vec<(String, PathBuf)>,
    /// virtio-net devices, in the order the guest enumerates them (at most [`MAX_NETS`],
    /// spare ones included).
    pub nets: Vec<NetConfig>,
    /// virtio-net devices without a tap after those of `nets`: the slots of a VM template
    /// that this VM does not use (their frames go nowhere).
    pub spare_nets: u8,
    /// `/dev/kvm`, opened by the caller (the monitor opens it before it confines itself);
    /// `None`: [`start`] opens it.
    pub kvm: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
}

/// One virtio-net device.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Its tap. [`start`] gives the device a duplicate of the fd; the tap lives until the
    /// device and every copy of this config are gone.
    pub tap: std::sync::Arc<devices::virtio::net::Tap>,
    /// The MAC address the guest sees.
    pub mac: [u8; 6],
    /// The MTU the device announces.
    pub mtu: u32,
}

/// Most virtio-net devices a VM has.
pub const MAX_NETS: usize = 8;

/// Seccomp for the VMM's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    /// Install the filters; a syscall outside them kills the process.
    Enforce,
    /// Install the filters but only log violations (`dmesg`), to find a missing syscall.
    Log,
    /// No filters (debugging only).
    Off,
}

pub use husk_seccomp::ThreadKind;

/// Installs the calling thread's seccomp filter.
pub fn apply_seccomp(mode: SeccompMode, kind: ThreadKind) -> Result<(), String> {
    let mode = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Enforce => husk_seccomp::Mode::Enforce,
        SeccompMode::Log => husk_seccomp::Mode::Log,
    };
    husk_seccomp::apply_with(kind, mode).map_err(|e| format!("{e:#}"))
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// husk-init powered off (the `PowerOff` marker) or the guest asked KVM for power-off.
    PowerOff,
    /// The guest reset (i8042, triple fault).
    Reset,
    /// The host stopped it.
    Stopped,
    /// Something failed (KVM error, emulation failure, a device model error).
    Error(String),
}

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

/// Locks `mutex`, also when a thread panicked while holding it. The VMM's shared state
/// (device registers, the vCPUs' run flags) stays usable after such a panic, and the panic
/// itself already ends the VM; refusing the lock would only turn it into a hang or a second
/// panic on another thread.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    shape: persist::Shape,
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

/// Most vCPUs a husk VM has (the kernel is built with NR_CPUS=8).
pub const MAX_VCPUS: u8 = 8;

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
        self.stop_all(timeout)
    }

    /// [`RunningVm::wait`], then, with every vCPU stopped and guest memory still mapped,
    /// `inspect` reads guest-physical memory through the reader it is given: for looking at
    /// what the guest left behind, such as its kernel log ([`kernel_log`]).
    pub fn wait_then<R>(
        mut self,
        timeout: Option<Duration>,
        inspect: impl FnOnce(&ReadGuest<'_>) -> R,
    ) -> (VmExit, Timeline, R) {
        let (why, timeline) = self.stop_all(timeout);
        let reader = |addr: u64, buf: &mut [u8]| -> Result<(), String> {
            vm_memory::Bytes::read_slice(&self.mem, buf, vm_memory::GuestAddress(addr))
                .map_err(|e| e.to_string())
        };
        let inspected = inspect(&reader);
        (why, timeline, inspected)
    }

    /// What [`RunningVm::wait`] does; guest memory stays mapped until `self` is dropped.
    fn stop_all(&mut self, timeout: Option<Duration>) -> (VmExit, Timeline) {
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
