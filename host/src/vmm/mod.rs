//! The VMM: a KVM virtual machine that boots the guest kernel directly, with the few devices a
//! container VM needs.
//!
//! Threads: the caller's thread ("api") starts the VM and waits for it to end; one thread runs
//! the device event loop ("vmm"); one thread per vCPU. Each confines itself with its own
//! seccomp filter (crate `husk-seccomp`) after setup and before it handles anything the guest
//! controls.
//!
//! How a VM ends: husk-init writes the `PowerOff` boot marker (the normal way), the guest
//! resets through the i8042 (`reboot=k`) or triple-faults, KVM reports an error, or the host
//! asks ([`RunningVm::stop`]). Whatever comes first is the [`VmExit`].

mod boot;
mod cpu_setup;
mod cpuid;
pub mod devices;
mod event_loop;
pub mod host;
mod layout;
mod memory;
mod mptable;
mod vcpu;

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_proto::marker::Marker;
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use std::os::fd::FromRawFd;
use vmm_sys_util::signal::Killable;

use devices::EventFdTrigger;
use devices::bus::Bus;
use devices::marker::{MarkerLog, MarkerPort};

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
    /// virtio-net devices, in the order the guest enumerates them (at most [`MAX_NETS`]).
    pub nets: Vec<NetConfig>,
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
    Cpu(#[from] cpu_setup::CpuSetupError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Device setup.
    #[error("setting up devices: {0}")]
    Devices(String),
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
    // The VM and its memory: KVM's memory slots point into `_mem`'s mappings, so both live
    // until every vCPU thread has been joined (fields drop in declaration order, after wait()).
    _vm: VmFd,
    _mem: memory::GuestMem,
    exits: Receiver<VmExit>,
    run: Arc<vcpu::RunState>,
    stop_evt: EventFdTrigger,
    vcpus: Vec<JoinHandle<Option<Instant>>>,
    event_loop: Option<JoinHandle<()>>,
    // Dropped on the waiting thread after the others are joined, so that the device's
    // teardown (removing its socket file) happens there and not on whichever thread lets go
    // last.
    vsock: Option<Arc<Mutex<devices::virtio::vsock::Vsock>>>,
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

/// Builds the VM and starts its threads.
pub fn start(config: &VmConfig, process_start: Instant) -> Result<RunningVm, VmError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(VmError::Config(format!(
            "{} vCPUs requested; 1 to {MAX_VCPUS} are supported",
            config.vcpus
        )));
    }
    if config.nets.len() > MAX_NETS {
        return Err(VmError::Config(format!(
            "{} network interfaces requested; at most {MAX_NETS} are supported",
            config.nets.len()
        )));
    }
    if config.mem_mib < 32 || config.mem_mib > 64 * 1024 {
        return Err(VmError::Config(format!(
            "{} MiB of memory requested; 32 MiB to 64 GiB are supported",
            config.mem_mib
        )));
    }
    let profile = host::HostProfile::detect();
    let kvm = match &config.kvm {
        Some(fd) => {
            let fd = fd.try_clone().map_err(|source| VmError::Os {
                what: "duplicating the /dev/kvm descriptor",
                source,
            })?;
            // SAFETY: `fd` is a fresh duplicate of an open /dev/kvm descriptor that nothing
            // else owns; Kvm takes it over.
            unsafe { Kvm::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) }
        }
        None => Kvm::new().map_err(VmError::Kvm)?,
    };
    let vm = kvm.create_vm().map_err(kvm_call("KVM_CREATE_VM"))?;
    vm.set_tss_address(usize::try_from(layout::KVM_TSS).unwrap_or(0))
        .map_err(kvm_call("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP)
        .map_err(kvm_call("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_call("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_call("KVM_CREATE_PIT2"))?;

    let mem = memory::create(config.mem_mib << 20)?;
    memory::register(&vm, &mem)?;

    // Devices.
    let stop_evt = EventFdTrigger::new().map_err(os("eventfd"))?;
    let reset_evt = EventFdTrigger::new().map_err(os("eventfd"))?;
    let power_off_evt = EventFdTrigger::new().map_err(os("eventfd"))?;
    let markers = Arc::new(Mutex::new(MarkerLog::default()));
    let mut pio = Bus::new();
    let dev_err = |e: devices::bus::Overlap| VmError::Devices(e.to_string());
    pio.insert(
        u64::from(husk_proto::marker::MARKER_PORT),
        1,
        Arc::new(Mutex::new(MarkerPort::new(
            markers.clone(),
            power_off_evt.try_clone().map_err(os("eventfd"))?,
        ))),
    )
    .map_err(dev_err)?;
    pio.insert(
        u64::from(layout::I8042_PORT),
        5,
        Arc::new(Mutex::new(devices::i8042::I8042::new(
            reset_evt.try_clone().map_err(os("eventfd"))?,
        ))),
    )
    .map_err(dev_err)?;
    if config.console {
        let irq = EventFdTrigger::new().map_err(os("eventfd"))?;
        vm.register_irqfd(&irq.0, layout::SERIAL_IRQ)
            .map_err(kvm_call("KVM_IRQFD (serial)"))?;
        pio.insert(
            u64::from(layout::SERIAL_PORT),
            8,
            Arc::new(Mutex::new(devices::serial::SerialDevice::new(
                irq,
                Box::new(std::io::stdout()),
            ))),
        )
        .map_err(dev_err)?;
    }
    let mut mmio = Bus::new();
    let mut virtio_devices = Vec::new();
    let mut vsock_device = None;
    if let Some(uds) = &config.vsock {
        let device = devices::virtio::vsock::Vsock::new(u64::from(husk_proto::GUEST_CID), uds)
            .map_err(|e| VmError::Devices(format!("vsock at {}: {e}", uds.display())))?;
        let device = Arc::new(Mutex::new(device));
        let (base, gsi) = (layout::VIRTIO_MMIO_BASE, layout::VIRTIO_IRQ_BASE);
        attach_virtio(&vm, &mem, &mut mmio, device.clone(), base, gsi)?;
        virtio_devices.push((base, devices::virtio::mmio::MMIO_WINDOW_SIZE, gsi));
        vsock_device = Some(device);
    }
    let mut fs_devices = Vec::new();
    for (i, (tag, dir)) in (1u32..).zip(&config.shares) {
        let device = devices::virtio::fs::Fs::new(tag, dir)
            .map_err(|e| VmError::Devices(format!("virtio-fs {tag:?}: {e}")))?;
        let device = Arc::new(Mutex::new(device));
        let base =
            layout::VIRTIO_MMIO_BASE + u64::from(i) * devices::virtio::mmio::MMIO_WINDOW_SIZE;
        let gsi = layout::VIRTIO_IRQ_BASE + i;
        attach_virtio(&vm, &mem, &mut mmio, device.clone(), base, gsi)?;
        virtio_devices.push((base, devices::virtio::mmio::MMIO_WINDOW_SIZE, gsi));
        fs_devices.push(device);
    }
    let mut net_devices = Vec::new();
    let first_net = 1 + u32::try_from(config.shares.len()).unwrap_or(u32::MAX);
    for (i, net) in (first_net..).zip(&config.nets) {
        let tap = net
            .tap
            .try_clone()
            .map_err(|e| VmError::Devices(format!("virtio-net on {}: {e}", net.tap.name())))?;
        let device = devices::virtio::net::Net::new(tap, net.mac, net.mtu)
            .map_err(|e| VmError::Devices(format!("virtio-net on {}: {e}", net.tap.name())))?;
        let device = Arc::new(Mutex::new(device));
        let base =
            layout::VIRTIO_MMIO_BASE + u64::from(i) * devices::virtio::mmio::MMIO_WINDOW_SIZE;
        let gsi = layout::VIRTIO_IRQ_BASE + i;
        attach_virtio(&vm, &mem, &mut mmio, device.clone(), base, gsi)?;
        virtio_devices.push((base, devices::virtio::mmio::MMIO_WINDOW_SIZE, gsi));
        net_devices.push(device);
    }

    // Guest image.
    let cmdline = host::cmdline(
        profile,
        &host::CmdlineOptions {
            console: config.console,
            virtio_devices,
            extra: config.cmdline_extra.clone(),
        },
    );
    let loaded = boot::load(&mem, &config.kernel, config.initrd.as_deref(), &cmdline)?;
    cpu_setup::write_boot_tables(&mem)?;
    mptable::write(&mem, config.vcpus)?;

    // vCPUs.
    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_call("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu::install_kick_handler().map_err(os("installing the vCPU kick signal handler"))?;
    let run = Arc::new(vcpu::RunState::default());
    let (exit_tx, exits) = channel();
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let mut prepared = Vec::new();
    for id in 0..config.vcpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_call("KVM_CREATE_VCPU"))?;
        let mut cpuid = base_cpuid.clone();
        cpuid::normalize(
            &mut cpuid,
            id,
            cpuid::CpuidOptions {
                vcpus: config.vcpus,
                kvm_pvm: profile.kvm_pvm,
            },
        );
        fd.set_cpuid2(&cpuid).map_err(kvm_call("KVM_SET_CPUID2"))?;
        cpu_setup::setup_common(&fd)?;
        if id == 0 {
            cpu_setup::setup_boot_vcpu(&fd, loaded.entry.0)?;
        }
        prepared.push(vcpu::Vcpu {
            fd,
            id,
            pio: pio.clone(),
            mmio: mmio.clone(),
            run: run.clone(),
            exits: exit_tx.clone(),
            exit_evt: stop_evt.try_clone().map_err(os("eventfd"))?,
            seccomp: config.seccomp,
        });
    }

    let event_loop = event_loop::EventLoop {
        stop_evt: stop_evt.try_clone().map_err(os("eventfd"))?,
        reset_evt,
        power_off_evt,
        vsock: vsock_device.clone(),
        fs: fs_devices,
        nets: net_devices,
        exits: exit_tx,
        seccomp: config.seccomp,
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
        _vm: vm,
        _mem: mem,
        exits,
        run,
        stop_evt,
        vcpus,
        event_loop: Some(event_loop),
        vsock: vsock_device,
        markers,
        process_start,
        vm_ready,
    })
}

/// Puts a virtio device on the MMIO bus at `base` with interrupt `gsi`: its queue
/// notifications become ioeventfds and its interrupt an irqfd, so neither costs a trip
/// through the VMM's threads.
fn attach_virtio(
    vm: &VmFd,
    mem: &memory::GuestMem,
    mmio: &mut Bus,
    device: devices::virtio::SharedDevice,
    base: u64,
    gsi: u32,
) -> Result<(), VmError> {
    use devices::virtio::mmio::{MMIO_WINDOW_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET};
    let transport = MmioTransport::new(mem.clone(), device)
        .map_err(|e| VmError::Devices(format!("virtio-mmio transport at {base:#x}: {e}")))?;
    vm.register_irqfd(transport.interrupt().irq_evt(), gsi)
        .map_err(kvm_call("KVM_IRQFD (virtio)"))?;
    for (i, evt) in (0u32..).zip(transport.queue_evts()) {
        vm.register_ioevent(
            evt,
            &kvm_ioctls::IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
            i,
        )
        .map_err(kvm_call("KVM_IOEVENTFD (virtio queue notify)"))?;
    }
    mmio.insert(base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)))
        .map_err(|e| VmError::Devices(e.to_string()))
}

/// A handle that controls a running VM from any thread: stop, pause, resume.
#[derive(Debug, Clone)]
pub struct VmHandle {
    run: Arc<vcpu::RunState>,
    evt: Arc<EventFdTrigger>,
    vcpus: usize,
}

impl VmHandle {
    /// Asks the VM to stop (its exit is then [`VmExit::Stopped`] unless something else came
    /// first).
    pub fn stop(&self) {
        self.run.request_stop();
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

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
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
            vcpus: self.vcpus.len(),
        })
    }

    /// Asks the VM to stop (the exit is then [`VmExit::Stopped`] unless something else came
    /// first).
    pub fn stop(&self) {
        self.run.request_stop();
        let _ = vm_superio::Trigger::trigger(&self.stop_evt);
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
