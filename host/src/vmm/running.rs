//! A started VM: [`launch`] starts its threads (the device event loop and one per vCPU),
//! [`RunningVm`] and its [`VmHandle`] stop, pause, resume and save it, and
//! [`RunningVm::wait`] ends it and says why and when each boot phase happened ([`Timeline`]).
//!
//! The builder hands it a built VM; it needs nothing from the builder.

use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_proto::marker::Marker;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::signal::Killable;

use super::arch;
use super::config::{Shape, VmConfig};
use super::device_manager::{Devices, VirtioHandle};
use super::devices::EventFdTrigger;
use super::devices::legacy::marker::MarkerLog;
use super::devices::virtio::vsock::Vsock;
use super::error::{VmError, os};
use super::event_loop::{EventLoop, LoopControl};
use super::persist;
use super::threads::{VmExit, lock};
use super::vstate::{memory, vcpu};

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

/// Reads guest-physical memory at an address into a buffer; `Err` for a range outside guest
/// RAM ([`RunningVm::wait_then`] hands one out).
pub type ReadGuest<'a> = dyn Fn(u64, &mut [u8]) -> Result<(), String> + 'a;

/// A started VM.
pub struct RunningVm {
    // The VM and its memory: KVM's memory slots point into `mem`'s mappings, so both live
    // until every vCPU thread has been joined (fields drop in declaration order, after wait()).
    // The VMM's tests (`vmm/tests.rs`) read `mem` and `markers`.
    vm: VmFd,
    pub(super) mem: memory::GuestMem,
    kvm: kvm_ioctls::Kvm,
    shape: Shape,
    exits: Receiver<VmExit>,
    run: Arc<vcpu::RunState>,
    loop_control: Arc<LoopControl>,
    stop_evt: EventFdTrigger,
    vcpus: Vec<JoinHandle<Option<Instant>>>,
    event_loop: Option<JoinHandle<()>>,
    // Dropped on the waiting thread after the others are joined, so that the device's
    // teardown (removing its socket file) happens there and not on whichever thread lets go
    // last.
    vsock: Option<Arc<Mutex<Vsock>>>,
    devices: Option<Devices>,
    pub(super) markers: Arc<Mutex<MarkerLog>>,
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
    loop_control: Arc<LoopControl>,
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
            .map(Devices::save)
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
    /// what the guest left behind, such as its kernel log ([`super::kernel_log`]).
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

/// Starts the event loop and one thread per vCPU.
pub(super) fn launch(
    kvm: Kvm,
    vm: VmFd,
    mem: memory::GuestMem,
    mut devices: Devices,
    vcpu_fds: Vec<VcpuFd>,
    config: &VmConfig,
    process_start: Instant,
) -> Result<RunningVm, VmError> {
    vcpu::install_kick_handler().map_err(os("installing the vCPU kick signal handler"))?;
    let run = Arc::new(vcpu::RunState::default());
    let (exit_tx, exits) = channel();
    let pio = Arc::new(std::mem::take(&mut devices.pio));
    let mmio = Arc::new(std::mem::take(&mut devices.mmio));
    let mut prepared = Vec::new();
    for (id, fd) in (0u8..).zip(vcpu_fds) {
        prepared.push(vcpu::Vcpu {
            fd,
            id,
            pio: pio.clone(),
            mmio: mmio.clone(),
            run: run.clone(),
            exits: exit_tx.clone(),
            exit_evt: devices.stop_evt.try_clone().map_err(os("eventfd"))?,
            seccomp: config.seccomp,
        });
    }
    let mut vsock = None;
    let (mut fs, mut nets) = (Vec::new(), Vec::new());
    for slot in &devices.virtio {
        match &slot.device {
            VirtioHandle::Vsock(d) => vsock = Some(d.clone()),
            VirtioHandle::Fs(d) => fs.push(d.clone()),
            VirtioHandle::Net(d) => nets.push(d.clone()),
        }
    }
    let control = Arc::new(LoopControl::new().map_err(os("eventfd"))?);
    let event_loop = EventLoop {
        stop_evt: devices.stop_evt.try_clone().map_err(os("eventfd"))?,
        reset_evt: devices.reset_evt.try_clone().map_err(os("eventfd"))?,
        power_off_evt: devices.power_off_evt.try_clone().map_err(os("eventfd"))?,
        vsock: vsock.clone(),
        fs,
        nets,
        exits: exit_tx,
        seccomp: config.seccomp,
        control: control.clone(),
    };
    let vm_ready = Instant::now();
    let event_loop = std::thread::Builder::new()
        .name("vmm".into())
        .spawn(move || event_loop.run())
        .map_err(os("spawning the vmm thread"))?;
    let mut vcpus = Vec::new();
    for v in prepared {
        let name = format!("vcpu{}", v.id);
        vcpus.push(
            std::thread::Builder::new()
                .name(name)
                .spawn(move || v.run())
                .map_err(os("spawning a vCPU thread"))?,
        );
    }
    Ok(RunningVm {
        kvm,
        vm,
        mem,
        shape: Shape::of(config),
        exits,
        run,
        loop_control: control,
        stop_evt: devices.stop_evt.try_clone().map_err(os("eventfd"))?,
        vcpus,
        event_loop: Some(event_loop),
        vsock,
        markers: devices.markers.clone(),
        devices: Some(devices),
        process_start,
        vm_ready,
    })
}
