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
use super::config::{MAX_NETS, MAX_VCPUS, Shape, VmConfig};
use super::devices::EventFdTrigger;
use super::devices::bus::Bus;
use super::devices::legacy::i8042::I8042;
use super::devices::legacy::marker::{MarkerLog, MarkerPort};
use super::devices::legacy::serial::SerialDevice;
use super::devices::persist::Persist;
use super::devices::virtio::fs::Fs;
use super::devices::virtio::mmio::{MMIO_WINDOW_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET};
use super::devices::virtio::net::Net;
use super::devices::virtio::vsock::Vsock;
use super::event_loop::{EventLoop, LoopControl};
use super::host::{self, HostProfile};
use super::persist::{DevicesState, Snapshot, SnapshotError, VirtioDeviceState, VirtioState};
use super::threads::lock;
use super::vstate::{memory, vcpu};
use super::{RunningVm, VmError, kvm_call, os};

/// Boots a VM: builds it from `config` and starts its threads.
pub fn start(config: &VmConfig, process_start: Instant) -> Result<RunningVm, VmError> {
    check(config)?;
    let profile = HostProfile::detect();
    let kvm = open_kvm(config)?;
    let vm = create_vm(&kvm)?;
    let mem = memory::create(config.mem_mib << 20)?;
    memory::register(&vm, &mem)?;
    let devices = Devices::attach(&vm, &mem, config, Origin::New)?;

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
    launch(kvm, vm, mem, devices, vcpus, config, process_start)
}

/// Builds a VM from `snapshot` (which must be of `config`'s shape) on `config`'s host
/// resources (its vsock socket, shared directories, taps) and starts its threads: the guest
/// goes on from where it was saved.
pub fn restore(
    config: &VmConfig,
    snapshot: &Snapshot,
    process_start: Instant,
) -> Result<RunningVm, VmError> {
    check(config)?;
    let saved = &snapshot.state;
    let shape = Shape::of(config);
    if saved.shape != shape {
        return Err(SnapshotError::Shape {
            saved: saved.shape,
            wanted: shape,
        }
        .into());
    }
    if saved.vcpus.len() != usize::from(config.vcpus) {
        return Err(mismatch("the vCPUs"));
    }
    let kvm = open_kvm(config)?;
    let vm = create_vm(&kvm)?;
    let mem = memory::restore(&snapshot.memory, shape.mem_mib << 20)?;
    memory::register(&vm, &mem)?;
    let devices = Devices::attach(&vm, &mem, config, Origin::Saved(&saved.devices))?;
    let mut vcpus = Vec::new();
    for (id, state) in (0u8..).zip(&saved.vcpus) {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_call("KVM_CREATE_VCPU"))?;
        state
            .restore(&fd, id)
            .map_err(|e| SnapshotError::Restore(e.to_string()))?;
        vcpus.push(fd);
    }
    saved
        .arch
        .restore(&vm)
        .map_err(|e| SnapshotError::Restore(e.to_string()))?;
    launch(kvm, vm, mem, devices, vcpus, config, process_start)
}

/// Refuses shapes the VMM cannot build.
fn check(config: &VmConfig) -> Result<(), VmError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(VmError::Config(format!(
            "{} vCPUs requested; 1 to {MAX_VCPUS} are supported",
            config.vcpus
        )));
    }
    let nets = config.nets.len() + usize::from(config.spare_nets);
    if nets > MAX_NETS {
        return Err(VmError::Config(format!(
            "{nets} network interfaces requested; at most {MAX_NETS} are supported"
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

/// A virtio device of the VM, as the snapshot code needs to reach it.
pub(super) enum VirtioHandle {
    Vsock(Arc<Mutex<Vsock>>),
    Fs(Arc<Mutex<Fs>>),
    Net(Arc<Mutex<Net>>),
}

/// One virtio-mmio window: the transport and the device behind it.
pub(super) struct VirtioSlot {
    pub transport: Arc<Mutex<MmioTransport>>,
    pub device: VirtioHandle,
    /// The window's base address.
    pub base: u64,
    pub gsi: u32,
}

/// The devices of one VM, on their buses, with the events they raise for the event loop.
pub(super) struct Devices {
    pub pio: Bus,
    pub mmio: Bus,
    pub i8042: Arc<Mutex<I8042>>,
    pub serial: Option<Arc<Mutex<SerialDevice>>>,
    /// The virtio devices in window order: vsock, the shares, the NICs.
    pub virtio: Vec<VirtioSlot>,
    pub markers: Arc<Mutex<MarkerLog>>,
    /// Written by the vCPUs' exit reports and by a host stop request.
    pub stop_evt: EventFdTrigger,
    /// Written by the i8042 when the guest resets.
    pub reset_evt: EventFdTrigger,
    /// Written by the marker port on husk-init's `PowerOff`.
    pub power_off_evt: EventFdTrigger,
}

/// How [`Devices`] come to be: made new for a boot, or restored from a snapshot.
#[derive(Clone, Copy)]
enum Origin<'a> {
    New,
    Saved(&'a DevicesState),
}

impl Devices {
    /// Creates the devices `config` asks for (or restores them in their saved state) and puts
    /// them on the buses: the marker port and the i8042 always, the serial console on
    /// request, then the virtio devices (vsock, the virtio-fs shares, the NICs, the spare NICs)
    /// in consecutive MMIO windows and GSIs, in that order.
    fn attach(
        vm: &VmFd,
        mem: &memory::GuestMem,
        config: &VmConfig,
        origin: Origin<'_>,
    ) -> Result<Self, VmError> {
        let stop_evt = EventFdTrigger::new().map_err(os("eventfd"))?;
        let reset_evt = EventFdTrigger::new().map_err(os("eventfd"))?;
        let power_off_evt = EventFdTrigger::new().map_err(os("eventfd"))?;
        let reset = reset_evt.try_clone().map_err(os("eventfd"))?;
        let i8042 = match origin {
            Origin::New => I8042::new(reset),
            Origin::Saved(saved) => match I8042::restore(reset, &saved.i8042) {
                Ok(dev) => dev,
                Err(never) => match never {},
            },
        };
        let mut devices = Devices {
            pio: Bus::new(),
            mmio: Bus::new(),
            i8042: Arc::new(Mutex::new(i8042)),
            serial: None,
            virtio: Vec::new(),
            markers: Arc::new(Mutex::new(MarkerLog::default())),
            stop_evt,
            reset_evt,
            power_off_evt,
        };
        devices.attach_legacy(vm, config.console, origin)?;
        let mut saved = match origin {
            Origin::New => None,
            Origin::Saved(s) => Some(s.virtio.iter()),
        };
        let mut next_saved = |what: &str| -> Result<Option<&VirtioState>, VmError> {
            match &mut saved {
                None => Ok(None),
                Some(it) => it.next().map(Some).ok_or_else(|| {
                    VmError::Snapshot(SnapshotError::Restore(format!("no saved state for {what}")))
                }),
            }
        };
        if let Some(uds) = &config.vsock {
            let what = format!("vsock at {}", uds.display());
            let saved = next_saved(&what)?;
            let device = match saved.map(|s| &s.device) {
                None => Vsock::new(u64::from(husk_proto::GUEST_CID), uds),
                Some(VirtioDeviceState::Vsock(s)) => Vsock::restore(uds.clone(), s),
                Some(_) => return Err(mismatch(&what)),
            }
            .map_err(|e| VmError::Devices(format!("{what}: {e}")))?;
            let device = Arc::new(Mutex::new(device));
            let handle = VirtioHandle::Vsock(device.clone());
            devices.attach_virtio(vm, mem, device, handle, saved)?;
        }
        for (tag, dir) in &config.shares {
            let what = format!("virtio-fs {tag:?}");
            let saved = next_saved(&what)?;
            let device = match saved.map(|s| &s.device) {
                None => Fs::new(tag, dir),
                Some(VirtioDeviceState::Fs(s)) if s.tag == *tag => Fs::restore(dir.clone(), s),
                Some(_) => return Err(mismatch(&what)),
            }
            .map_err(|e| VmError::Devices(format!("{what}: {e}")))?;
            let device = Arc::new(Mutex::new(device));
            let handle = VirtioHandle::Fs(device.clone());
            devices.attach_virtio(vm, mem, device, handle, saved)?;
        }
        let spares = (0..config.spare_nets).map(|_| None);
        for (slot, net) in (0u8..).zip(config.nets.iter().map(Some).chain(spares)) {
            let what = match net {
                Some(net) => format!("virtio-net on {}", net.tap.name()),
                None => "a spare virtio-net".to_owned(),
            };
            let err = |e: &dyn std::fmt::Display| VmError::Devices(format!("{what}: {e}"));
            let tap = match net {
                Some(net) => Some(net.tap.try_clone().map_err(|e| err(&e))?),
                None => None,
            };
            let (mac, mtu) = net.map_or((spare_net_mac(slot), SPARE_NET_MTU), |n| (n.mac, n.mtu));
            let saved = next_saved(&what)?;
            let device = match saved.map(|s| &s.device) {
                None => match tap {
                    Some(tap) => Net::new(tap, mac, mtu),
                    None => Net::unattached(mac, mtu),
                },
                Some(VirtioDeviceState::Net(s)) => Net::restore((tap, mac, mtu), s),
                Some(_) => return Err(mismatch(&what)),
            }
            .map_err(|e| err(&e))?;
            let device = Arc::new(Mutex::new(device));
            let handle = VirtioHandle::Net(device.clone());
            devices.attach_virtio(vm, mem, device, handle, saved)?;
        }
        if saved.is_some_and(|mut rest| rest.next().is_some()) {
            return Err(mismatch("the virtio devices (more were saved)"));
        }
        Ok(devices)
    }

    /// The port-I/O devices.
    fn attach_legacy(
        &mut self,
        vm: &VmFd,
        console: bool,
        origin: Origin<'_>,
    ) -> Result<(), VmError> {
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
        self.pio
            .insert(u64::from(layout::I8042_PORT), 5, self.i8042.clone())
            .map_err(dev_err)?;
        if console {
            let irq = EventFdTrigger::new().map_err(os("eventfd"))?;
            vm.register_irqfd(&irq.0, layout::SERIAL_IRQ)
                .map_err(kvm_call("KVM_IRQFD (serial)"))?;
            let out: Box<dyn std::io::Write + Send> = Box::new(std::io::stdout());
            let serial = match origin {
                Origin::Saved(DevicesState {
                    serial: Some(saved),
                    ..
                }) => SerialDevice::restore((irq, out), saved)
                    .map_err(|e| VmError::Snapshot(SnapshotError::Restore(e)))?,
                Origin::Saved(_) => return Err(mismatch("the serial console")),
                Origin::New => SerialDevice::new(irq, out),
            };
            let serial = Arc::new(Mutex::new(serial));
            self.pio
                .insert(u64::from(layout::SERIAL_PORT), 8, serial.clone())
                .map_err(dev_err)?;
            self.serial = Some(serial);
        }
        Ok(())
    }

    /// Puts a virtio device on the MMIO bus in the next window, with the next GSI, behind a
    /// new transport or one restored from `saved`: its queue notifications become ioeventfds
    /// and its interrupt an irqfd, so neither costs a trip through the VMM's threads.
    fn attach_virtio(
        &mut self,
        vm: &VmFd,
        mem: &memory::GuestMem,
        device: super::devices::virtio::SharedDevice,
        handle: VirtioHandle,
        saved: Option<&VirtioState>,
    ) -> Result<(), VmError> {
        let index = u32::try_from(self.virtio.len()).unwrap_or(u32::MAX);
        let base = layout::VIRTIO_MMIO_BASE + u64::from(index) * MMIO_WINDOW_SIZE;
        let gsi = layout::VIRTIO_IRQ_BASE + index;
        let what = || format!("virtio-mmio transport at {base:#x}");
        let transport = match saved {
            None => MmioTransport::new(mem.clone(), device)
                .map_err(|e| VmError::Devices(format!("{}: {e}", what())))?,
            Some(saved) => MmioTransport::restore((mem.clone(), device), &saved.transport)
                .map_err(|e| {
                    VmError::Snapshot(SnapshotError::Restore(format!("{}: {e}", what())))
                })?,
        };
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
        self.virtio.push(VirtioSlot {
            transport,
            device: handle,
            base,
            gsi,
        });
        Ok(())
    }

    /// The `virtio_mmio.device=` entries for the kernel command line: (base, size, GSI).
    fn virtio_ranges(&self) -> Vec<(u64, u64, u32)> {
        self.virtio
            .iter()
            .map(|slot| (slot.base, MMIO_WINDOW_SIZE, slot.gsi))
            .collect()
    }

    /// Every device's state. The vCPUs and the event loop must be paused.
    pub fn save(&self) -> DevicesState {
        DevicesState {
            i8042: lock(&self.i8042).save(),
            serial: self.serial.as_ref().map(|s| lock(s).save()),
            virtio: self
                .virtio
                .iter()
                .map(|slot| VirtioState {
                    transport: lock(&slot.transport).save(),
                    device: match &slot.device {
                        VirtioHandle::Vsock(d) => VirtioDeviceState::Vsock(lock(d).save()),
                        VirtioHandle::Fs(d) => VirtioDeviceState::Fs(lock(d).save()),
                        VirtioHandle::Net(d) => VirtioDeviceState::Net(lock(d).save()),
                    },
                })
                .collect(),
        }
    }
}

/// The MAC of the spare NIC in slot `slot` (its index among the VM's NICs), until a
/// container's configuration gives it its own: locally administered, unicast, one per slot.
pub fn spare_net_mac(slot: u8) -> [u8; 6] {
    [0x02, 0x68, 0x75, 0x73, 0x6b, slot]
}

/// The MTU a spare NIC announces: the largest, so that whatever MTU a container's network
/// has later, the guest can set it (the driver takes the announced MTU as its maximum).
pub const SPARE_NET_MTU: u32 = 65535;

fn mismatch(what: &str) -> VmError {
    VmError::Snapshot(SnapshotError::Restore(format!(
        "the saved devices do not match the VM's: {what}"
    )))
}

/// Starts the event loop and one thread per vCPU.
fn launch(
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
