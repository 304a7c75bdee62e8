//! Building a VM from a [`VmConfig`], in the order KVM and the guest need it: the VM with its
//! in-kernel irqchip and PIT, guest memory, the devices on their buses, the guest image and
//! the boot tables, the vCPUs; then `running::launch` starts its threads. The devices and
//! their buses are `device_manager`'s.

use std::os::fd::FromRawFd;
use std::time::Instant;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::arch::{boot, cpuid, layout, mptable, regs};
use super::config::{MAX_NETS, MAX_VCPUS, Shape, VmConfig};
use super::device_manager::{Devices, Origin};
use super::error::{VmError, kvm_call, mismatch, os};
use super::host::{self, HostProfile};
use super::persist::{Snapshot, SnapshotError};
use super::running::{RunningVm, launch};
use super::vstate::memory;

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
