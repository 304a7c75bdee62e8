//! The boot vCPU's initial state for the Linux 64-bit boot protocol: long mode with paging on
//! (the first GiB identity-mapped), a flat GDT, `rsi` = boot_params, `rip` = the kernel's
//! 64-bit entry. Also the MSRs, FPU and local-APIC setup every vCPU needs.

use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{BOOT_GDT, BOOT_IDT, BOOT_STACK, PD, PDPT, PML4, ZERO_PAGE};
use crate::vmm::vstate::memory::GuestMem;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuSetupError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// Writing tables into guest memory failed.
    #[error("writing {what} into guest memory: {source}")]
    Memory {
        /// Which table.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// KVM did not take every MSR.
    #[error("KVM set {set} of {wanted} MSRs")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuSetupError {
    move |source| CpuSetupError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_NE: u64 = 0x20;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT entry from flags, base and limit (the Intel SDM's layout).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
const GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The `kvm_segment` a GDT entry describes.
fn segment(entry: u64, index: u8) -> kvm_segment {
    let bits =
        |shift: u32, width: u32| u8::try_from((entry >> shift) & ((1 << width) - 1)).unwrap_or(0);
    let limit_lo = entry & 0xffff;
    let limit_hi = (entry >> 48) & 0xf;
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    kvm_segment {
        base,
        limit: u32::try_from((limit_hi << 16) | limit_lo).unwrap_or(u32::MAX),
        selector: u16::from(index) * 8,
        type_: bits(40, 4),
        present: bits(47, 1),
        dpl: bits(45, 2),
        db: bits(54, 1),
        s: bits(44, 1),
        l: bits(53, 1),
        g: bits(55, 1),
        avl: bits(52, 1),
        padding: 0,
        unusable: u8::from(bits(47, 1) == 0),
    }
}

/// Writes the GDT, IDT and identity page tables into guest memory (once per VM).
pub fn write_boot_tables(mem: &GuestMem) -> Result<(), CpuSetupError> {
    let w = |what: &'static str, addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|source| CpuSetupError::Memory { what, source })
    };
    for (i, entry) in GDT.iter().enumerate() {
        w("GDT", BOOT_GDT + 8 * i as u64, *entry)?;
    }
    w("IDT", BOOT_IDT, 0)?;
    // PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] = 2 MiB page i (present, writable, huge).
    w("PML4", PML4, PDPT | 0x03)?;
    w("PDPT", PDPT, PD | 0x03)?;
    for i in 0..512u64 {
        w("page directory", PD + i * 8, (i << 21) | 0x83)?;
    }
    Ok(())
}

/// Puts the boot vCPU in 64-bit mode at `entry`.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), CpuSetupError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = segment(GDT[1], 1);
    let data = segment(GDT[2], 2);
    let tss = segment(GDT[3], 3);
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&GDT) - 1).unwrap_or(u16::MAX);
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4;
    sregs.cr4 |= X86_CR4_PAE;
    // Caches on (the reset value has CD and NW set).
    sregs.cr0 = X86_CR0_PE | X86_CR0_PG | X86_CR0_ET | X86_CR0_NE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    Ok(())
}

/// FPU, MSRs and LAPIC for any vCPU.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), CpuSetupError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuSetupError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(CpuSetupError::Msrs {
            set,
            wanted: entries.len(),
        });
    }

    // Local APIC: LINT0 = ExtINT (the PIC's output), LINT1 = NMI, as a BIOS would leave it.
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let get = |regs: &[std::os::raw::c_char], off: usize| {
        let b = [
            regs[off] as u8,
            regs[off + 1] as u8,
            regs[off + 2] as u8,
            regs[off + 3] as u8,
        ];
        u32::from_le_bytes(b)
    };
    let set_reg = |regs: &mut [std::os::raw::c_char], off: usize, val: u32| {
        for (i, b) in val.to_le_bytes().into_iter().enumerate() {
            regs[off + i] = b as std::os::raw::c_char;
        }
    };
    let lvt0 = get(&lapic.regs, APIC_LVT0);
    set_reg(
        &mut lapic.regs,
        APIC_LVT0,
        (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lvt1 = get(&lapic.regs, APIC_LVT1);
    set_reg(
        &mut lapic.regs,
        APIC_LVT1,
        (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
    );
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let code = segment(GDT[1], 1);
        assert_eq!(
            (code.l, code.db, code.present, code.s, code.type_),
            (1, 0, 1, 1, 0xb)
        );
        assert_eq!(
            (code.base, code.limit, code.selector, code.g),
            (0, 0xfffff, 8, 1)
        );
        let data = segment(GDT[2], 2);
        assert_eq!((data.l, data.db, data.type_, data.selector), (0, 1, 3, 16));
        let null = segment(GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = crate::vmm::vstate::memory::create(16 << 20).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT);
        let pd_last: u64 = mem.read_obj(GuestAddress(PD + 511 * 8)).unwrap();
        assert_eq!(pd_last, (511 << 21) | 0x83);
    }
}
