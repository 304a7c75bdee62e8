//! Building a VM from a [`VmConfig`], in the order KVM and the guest need it: the VM with its
//! in-kernel irqchip and PIT, guest memory, the devices on their buses, the guest image and
//! the boot tables, the vCPUs; then the threads are started ([`launch`]).

use std::os::fd::FromRawFd;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::arch::{boot, cpuid, layout, mptable, regs};
use super::devices::EventFdTrigger;
use super::devices::bus::Bus;
use super::devices::legacy::i8042::I8042;
use super::devices::legacy::marker::{MarkerLog, MarkerPort};
use super::devices::legacy::serial::SerialDevice;
use super::devices::virtio::fs::Fs;
use super::devices::virtio::mmio::{MMIO_WINDOW_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET};
use super::devices::virtio::net::Net;
use super::devices::virtio::vsock::Vsock;
use super::event_loop::EventLoop;
use super::host::{self, HostProfile};
use super::vstate::{memory, vcpu};
use super::{MAX_NETS, MAX_VCPUS, RunningVm, VmConfig, VmError, kvm_call, os};

/// Boots a VM: builds it from `config` and starts its threads.
pub fn start(config: &VmConfig, process_start: Instant) -> Result<RunningVm, VmError> {
    check(config)?;
    let profile = HostProfile::detect();
    let kvm = open_kvm(config)?;
    let vm = create_vm(&kvm)?;
    let mem = memory::create(config.mem_mib << 20)?;
    memory::register(&vm, &mem)?;
    let devices = Devices::attach(&vm, &mem, config)?;

    let cmdline = host::cmdline(
        profile,
        &host::CmdlineOptions {
            console: config.console,
            virtio_devices: devices.virtio_ranges(),
            extra: config.cmdline_extra.clone(),
        },
    );
    let loaded = boot::load(&mem, &config.kernel, config.initrd.as_deref(), &cmdline)?;
    regs::write_boot_tables(&mem)?;
    mptable::write(&mem, config.vcpus)?;

    let cpuid = base_cpuid(&kvm)?;
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let fd = create_vcpu(&vm, &cpuid, id, config.vcpus, profile)?;
        regs::setup_common(&fd)?;
        if id == 0 {
            regs::setup_boot_vcpu(&fd, loaded.entry.0)?;
        }
        vcpus.push(fd);
    }
    launch(vm, mem, devices, vcpus, config, process_start)
}

/// Refuses shapes the VMM cannot build.
fn check(config: &VmConfig) -> Result<(), VmError> {
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
    Ok(())
}

/// `/dev/kvm`: the caller's descriptor (the monitor opens it before it confines itself), or
/// opened here.
fn open_kvm(config: &VmConfig) -> Result<Kvm, VmError> {
    match &config.kvm {
        Some(fd) => {
            let fd = fd
                .try_clone()
                .map_err(os("duplicating the /dev/kvm descriptor"))?;
            // SAFETY: `fd` is a fresh duplicate of an open /dev/kvm descriptor that nothing
            // else owns; Kvm takes it over.
            Ok(unsafe { Kvm::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) })
        }
        None => Kvm::new().map_err(VmError::Kvm),
    }
}

/// The VM with what x86 needs in the kernel before anything else: the TSS and identity-map
/// pages, the irqchip (PIC, IO-APIC, local APICs) and the PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
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
    Ok(vm)
}

/// What KVM can give a vCPU, before [`cpuid::normalize`] shapes it for one.
fn base_cpuid(kvm: &Kvm) -> Result<CpuId, VmError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_call("KVM_GET_SUPPORTED_CPUID"))
}

/// vCPU `id` of `vcpus`, with its CPUID set.
fn create_vcpu(
    vm: &VmFd,
    base_cpuid: &CpuId,
    id: u8,
    vcpus: u8,
    profile: HostProfile,
) -> Result<VcpuFd, VmError> {
    let fd = vm
        .create_vcpu(u64::from(id))
        .map_err(kvm_call("KVM_CREATE_VCPU"))?;
    let mut cpuid = base_cpuid.clone();
    cpuid::normalize(
        &mut cpuid,
        id,
        cpuid::CpuidOptions {
            vcpus,
            kvm_pvm: profile.kvm_pvm,
        },
    );
    fd.set_cpuid2(&cpuid).map_err(kvm_call("KVM_SET_CPUID2"))?;
    Ok(fd)
}

/// The devices of one VM, on their buses, with the events they raise for the event loop.
pub(super) struct Devices {
    pub pio: Bus,
    pub mmio: Bus,
    pub vsock: Option<Arc<Mutex<Vsock>>>,
    pub fs: Vec<Arc<Mutex<Fs>>>,
    pub nets: Vec<Arc<Mutex<Net>>>,
    /// Every virtio-mmio transport: (its window's base, its GSI).
    pub transports: Vec<(Arc<Mutex<MmioTransport>>, u64, u32)>,
    pub markers: Arc<Mutex<MarkerLog>>,
    /// Written by the vCPUs' exit reports and by a host stop request.
    pub stop_evt: EventFdTrigger,
    /// Written by the i8042 when the guest resets.
    pub reset_evt: EventFdTrigger,
    /// Written by the marker port on husk-init's `PowerOff`.
    pub power_off_evt: EventFdTrigger,
}

impl Devices {
    /// Creates the devices `config` asks for and puts them on the buses: the marker port and
    /// the i8042 always, the serial console on request, then the virtio devices (vsock, the
    /// virtio-fs shares, the NICs) in consecutive MMIO windows and GSIs, in that order.
    fn attach(vm: &VmFd, mem: &memory::GuestMem, config: &VmConfig) -> Result<Self, VmError> {
        let mut devices = Devices {
            pio: Bus::new(),
            mmio: Bus::new(),
            vsock: None,
            fs: Vec::new(),
            nets: Vec::new(),
            transports: Vec::new(),
            markers: Arc::new(Mutex::new(MarkerLog::default())),
            stop_evt: EventFdTrigger::new().map_err(os("eventfd"))?,
            reset_evt: EventFdTrigger::new().map_err(os("eventfd"))?,
            power_off_evt: EventFdTrigger::new().map_err(os("eventfd"))?,
        };
        devices.attach_legacy(vm, config.console)?;
        if let Some(uds) = &config.vsock {
            let device = Vsock::new(u64::from(husk_proto::GUEST_CID), uds)
                .map_err(|e| VmError::Devices(format!("vsock at {}: {e}", uds.display())))?;
            let device = Arc::new(Mutex::new(device));
            devices.attach_virtio(vm, mem, device.clone())?;
            devices.vsock = Some(device);
        }
        for (tag, dir) in &config.shares {
            let device = Fs::new(tag, dir)
                .map_err(|e| VmError::Devices(format!("virtio-fs {tag:?}: {e}")))?;
            let device = Arc::new(Mutex::new(device));
            devices.attach_virtio(vm, mem, device.clone())?;
            devices.fs.push(device);
        }
        for net in &config.nets {
            let err = |e: &dyn std::fmt::Display| {
                VmError::Devices(format!("virtio-net on {}: {e}", net.tap.name()))
            };
            let tap = net.tap.try_clone().map_err(|e| err(&e))?;
            let device = Net::new(tap, net.mac, net.mtu).map_err(|e| err(&e))?;
            let device = Arc::new(Mutex::new(device));
            devices.attach_virtio(vm, mem, device.clone())?;
            devices.nets.push(device);
        }
        Ok(devices)
    }

    /// The port-I/O devices.
    fn attach_legacy(&mut self, vm: &VmFd, console: bool) -> Result<(), VmError> {
        let dev_err = |e: super::devices::bus::Overlap| VmError::Devices(e.to_string());
        let power_off = self.power_off_evt.try_clone().map_err(os("eventfd"))?;
        let marker = MarkerPort::new(self.markers.clone(), power_off);
        self.pio
            .insert(
                u64::from(husk_proto::marker::MARKER_PORT),
                1,
                Arc::new(Mutex::new(marker)),
            )
            .map_err(dev_err)?;
        let reset = self.reset_evt.try_clone().map_err(os("eventfd"))?;
        self.pio
            .insert(
                u64::from(layout::I8042_PORT),
                5,
                Arc::new(Mutex::new(I8042::new(reset))),
            )
            .map_err(dev_err)?;
        if console {
            let irq = EventFdTrigger::new().map_err(os("eventfd"))?;
            vm.register_irqfd(&irq.0, layout::SERIAL_IRQ)
                .map_err(kvm_call("KVM_IRQFD (serial)"))?;
            let serial = SerialDevice::new(irq, Box::new(std::io::stdout()));
            self.pio
                .insert(
                    u64::from(layout::SERIAL_PORT),
                    8,
                    Arc::new(Mutex::new(serial)),
                )
                .map_err(dev_err)?;
        }
        Ok(())
    }

    /// Puts a virtio device on the MMIO bus in the next window, with the next GSI: its queue
    /// notifications become ioeventfds and its interrupt an irqfd, so neither costs a trip
    /// through the VMM's threads.
    fn attach_virtio(
        &mut self,
        vm: &VmFd,
        mem: &memory::GuestMem,
        device: super::devices::virtio::SharedDevice,
    ) -> Result<(), VmError> {
        let index = u32::try_from(self.transports.len()).unwrap_or(u32::MAX);
        let base = layout::VIRTIO_MMIO_BASE + u64::from(index) * MMIO_WINDOW_SIZE;
        let gsi = layout::VIRTIO_IRQ_BASE + index;
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
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(base, MMIO_WINDOW_SIZE, transport.clone())
            .map_err(|e| VmError::Devices(e.to_string()))?;
        self.transports.push((transport, base, gsi));
        Ok(())
    }

    /// The `virtio_mmio.device=` entries for the kernel command line: (base, size, GSI).
    fn virtio_ranges(&self) -> Vec<(u64, u64, u32)> {
        self.transports
            .iter()
            .map(|(_, base, gsi)| (*base, MMIO_WINDOW_SIZE, *gsi))
            .collect()
    }
}

/// Starts the event loop and one thread per vCPU.
fn launch(
    vm: VmFd,
    mem: memory::GuestMem,
    devices: Devices,
    vcpu_fds: Vec<VcpuFd>,
    config: &VmConfig,
    process_start: Instant,
) -> Result<RunningVm, VmError> {
    vcpu::install_kick_handler().map_err(os("installing the vCPU kick signal handler"))?;
    let run = Arc::new(vcpu::RunState::default());
    let (exit_tx, exits) = channel();
    let pio = Arc::new(devices.pio);
    let mmio = Arc::new(devices.mmio);
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
    let event_loop = EventLoop {
        stop_evt: devices.stop_evt.try_clone().map_err(os("eventfd"))?,
        reset_evt: devices.reset_evt,
        power_off_evt: devices.power_off_evt,
        vsock: devices.vsock.clone(),
        fs: devices.fs,
        nets: devices.nets,
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
        stop_evt: devices.stop_evt,
        vcpus,
        event_loop: Some(event_loop),
        vsock: devices.vsock,
        markers: devices.markers,
        process_start,
        vm_ready,
    })
}
