//! Saving and restoring an x86-64 vCPU: every register file KVM keeps for it.
//!
//! The order of the `KVM_GET_*`/`KVM_SET_*` calls matters (the same order Firecracker and QEMU
//! use, for the same reasons):
//! - saving: `MP_STATE` first (it lets the local APIC accept pending events, which changes
//!   what the other calls return), `VCPU_EVENTS` last;
//! - restoring: `CPUID2` before anything that depends on the CPU model; `REGS` before
//!   `VCPU_EVENTS` (setting the registers drops pending exceptions, which the events bring
//!   back); `SREGS` before `LAPIC` (the APIC base MSR travels in the special registers);
//!   `LAPIC` before the MSRs (the TSC deadline MSR only takes when the APIC is in
//!   TSC-deadline mode).
//!
//! The MSRs saved are every one `KVM_GET_MSR_INDEX_LIST` reports that this vCPU can read
//! (kvm_pvm's own MSRs are among them). The FPU state is saved with `KVM_GET_XSAVE`, which
//! KVM answers in the legacy FXSAVE layout when the guest has no XSAVE (kvm_pvm hosts boot
//! it with `noxsave`).

use kvm_bindings::{
    CpuId, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Most MSRs read or written in one ioctl.
const MSR_CHUNK: usize = 64;

/// Everything KVM holds for one vCPU.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Running, halted, waiting for an INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, control registers, EFER, the APIC base, a pending interrupt.
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state.
    pub xsave: kvm_xsave,
    /// XCR0, where KVM has `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    /// DR0-DR7.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Every readable MSR of `KVM_GET_MSR_INDEX_LIST`, with its value.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub vcpu_events: kvm_vcpu_events,
}

/// A KVM call on a vCPU failed.
#[derive(Debug, thiserror::Error)]
#[error("{call} on vCPU {vcpu}: {source}")]
pub struct VcpuStateError {
    /// The vCPU.
    pub vcpu: u8,
    /// The ioctl that failed.
    pub call: &'static str,
    /// Why.
    #[source]
    pub source: kvm_ioctls::Error,
}

/// MSRs KVM refused to take back on restore.
#[derive(Debug, thiserror::Error)]
#[error("KVM refused MSRs {indices:#x?} of vCPU {vcpu}")]
pub struct MsrRefused {
    /// The vCPU.
    pub vcpu: u8,
    /// The MSRs KVM did not set.
    pub indices: Vec<u32>,
}

/// Why a vCPU could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum VcpuPersistError {
    /// A KVM call failed.
    #[error(transparent)]
    Kvm(#[from] VcpuStateError),
    /// KVM did not take some MSRs back.
    #[error(transparent)]
    Msrs(#[from] MsrRefused),
    /// The state's MSR or CPUID list cannot be handed to KVM.
    #[error("vCPU {vcpu}: {what} has too many entries for KVM ({len})")]
    TooMany {
        /// The vCPU.
        vcpu: u8,
        /// Which list.
        what: &'static str,
        /// Its length.
        len: usize,
    },
}

impl VcpuState {
    /// Reads vCPU `id`'s state. The vCPU must not be running, and no other vCPU of the VM
    /// either (`KVM_GET_VCPU_EVENTS` is not safe against running siblings). `msr_indices` is
    /// `KVM_GET_MSR_INDEX_LIST`.
    pub fn save(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<Self, VcpuPersistError> {
        let err = |call| {
            move |source| VcpuStateError {
                vcpu: id,
                call,
                source,
            }
        };
        let mp_state = fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().ok();
        let debug_regs = fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = read_msrs(fd, id, msr_indices)?;
        let vcpu_events = fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
        })
    }

    /// Gives vCPU `id` this state. The vCPU must not have run yet.
    pub fn restore(&self, fd: &VcpuFd, id: u8) -> Result<(), VcpuPersistError> {
        let err = |call| {
            move |source| VcpuStateError {
                vcpu: id,
                call,
                source,
            }
        };
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VcpuPersistError::TooMany {
            vcpu: id,
            what: "the CPUID",
            len: self.cpuid.len(),
        })?;
        fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(err("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(err("KVM_SET_SREGS"))?;
        // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy layout that KVM_SET_XSAVE reads in
        // full; the value is a whole struct (KVM checks its contents).
        unsafe { fd.set_xsave(&self.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(err("KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&self.debug_regs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(err("KVM_SET_LAPIC"))?;
        write_msrs(fd, id, &self.msrs)?;
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        // Tells a guest using kvmclock that the vCPU was stopped, so its soft-lockup watchdog
        // does not count the pause. Not every KVM has it (kvm_pvm may not): best effort.
        let _ = fd.kvmclock_ctrl();
        Ok(())
    }
}

/// Reads every MSR of `indices` that the vCPU can read. `KVM_GET_MSRS` stops at the first
/// MSR it cannot read and says how many it read: that one is skipped and the rest asked
/// again.
fn read_msrs(fd: &VcpuFd, id: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuPersistError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuPersistError::TooMany {
            vcpu: id,
            what: "the MSR list",
            len: entries.len(),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(|source| VcpuStateError {
            vcpu: id,
            call: "KVM_GET_MSRS",
            source,
        })?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(chunk.len())]);
        // Skip the unreadable one (if the chunk stopped early) and go on after it.
        let consumed = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[consumed.max(1)..];
    }
    Ok(out)
}

/// Writes `entries` back; fails naming every MSR KVM did not take.
fn write_msrs(fd: &VcpuFd, id: u8, entries: &[kvm_msr_entry]) -> Result<(), VcpuPersistError> {
    let mut refused = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuPersistError::TooMany {
            vcpu: id,
            what: "the MSR list",
            len: chunk.len(),
        })?;
        let written = fd.set_msrs(&msrs).map_err(|source| VcpuStateError {
            vcpu: id,
            call: "KVM_SET_MSRS",
            source,
        })?;
        let consumed = if written < chunk.len() {
            refused.push(chunk[written].index);
            written + 1
        } else {
            written
        };
        rest = &rest[consumed.max(1)..];
    }
    if refused.is_empty() {
        Ok(())
    } else {
        Err(MsrRefused {
            vcpu: id,
            indices: refused,
        }
        .into())
    }
}
