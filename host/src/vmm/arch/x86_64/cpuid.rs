//! The CPUID the guest sees: what KVM supports, normalised for a microVM (topology, APIC ids,
//! hypervisor bit), plus the masks only kvm_pvm hosts need.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// CPUID.1:ECX bits.
const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_POPCNT: u32 = 1 << 23;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX HTT (more than one logical processor per package).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CPUID.7.0:EBX SMAP.
const LEAF7_EBX_SMAP: u32 = 1 << 20;
/// KVM's paravirtual features (CPUID 0x4000_0001 EAX): asynchronous page faults, and their
/// "page ready" interrupt (which guests since Linux 5.8 require to use them at all).
const KVM_FEATURE_ASYNC_PF: u32 = 1 << 4;
const KVM_FEATURE_ASYNC_PF_INT: u32 = 1 << 14;

/// How the guest's CPUID is shaped.
#[derive(Debug, Clone, Copy)]
pub struct CpuidOptions {
    /// Number of vCPUs (one core each, one package).
    pub vcpus: u8,
    /// Apply the kvm_pvm compatibility masks (see `kernel-config/README.md`): no CMPXCHG16B,
    /// POPCNT, XSAVE or SMAP, which that host's emulator cannot run in guest kernel mode.
    /// Guest user code there runs CPUID natively and is not bound by these masks (see
    /// `kernel-config/README.md` on the AVX state).
    pub kvm_pvm: bool,
}

/// Adjusts `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `id`.
pub fn normalize(cpuid: &mut CpuId, id: u8, opts: CpuidOptions) {
    for entry in cpuid.as_mut_slice() {
        normalize_entry(entry, id, opts);
    }
}

fn normalize_entry(e: &mut kvm_cpuid_entry2, id: u8, opts: CpuidOptions) {
    match e.function {
        0x1 => {
            // EBX: [31:24] initial APIC id, [23:16] logical processors per package,
            // [15:8] CLFLUSH line size in 8-byte units.
            e.ebx = (u32::from(id) << 24) | (u32::from(opts.vcpus) << 16) | (8 << 8);
            e.ecx |= LEAF1_ECX_HYPERVISOR;
            if opts.vcpus > 1 {
                e.edx |= LEAF1_EDX_HTT;
            } else {
                e.edx &= !LEAF1_EDX_HTT;
            }
            if opts.kvm_pvm {
                e.ecx &= !(LEAF1_ECX_CX16 | LEAF1_ECX_POPCNT | LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE);
            }
        }
        0x4 => {
            // Deterministic cache parameters: EAX[31:26] = cores per package - 1,
            // [25:14] = logical processors sharing this cache - 1 (private caches: 0, the
            // last level shared by all).
            let cores = u32::from(opts.vcpus.max(1)) - 1;
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { cores } else { 0 };
            e.eax = (e.eax & 0x3fff) | (sharing << 14) | (cores << 26);
        }
        0x6 => {
            // No thermal/power management: clear "APERF/MPERF" and friends.
            e.ecx &= !1;
        }
        0x7 if e.index == 0 && opts.kvm_pvm => {
            e.ebx &= !LEAF7_EBX_SMAP;
        }
        0xb => {
            // Extended topology: level 0 = SMT (1 thread per core), level 1 = cores.
            e.edx = u32::from(id);
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    e.eax = 32
                        - u32::from(opts.vcpus.max(1))
                            .saturating_sub(1)
                            .leading_zeros();
                    e.ebx = u32::from(opts.vcpus);
                    e.ecx = (2 << 8) | 1;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        0x4000_0001 => {
            // No asynchronous page faults (KVM tells the guest a page is not there yet and
            // lets it run something else meanwhile): a microVM of one container gains little
            // from them, and a snapshot then carries no half-delivered "page ready" events.
            // (They were not the cause of the guest SIGSEGVs on kvm_pvm hosts: those came from
            // vector registers the guest kernel does not switch, kernel-config/README.md.)
            e.eax &= !(KVM_FEATURE_ASYNC_PF | KVM_FEATURE_ASYNC_PF_INT);
        }
        0xd if opts.kvm_pvm => {
            // No XSAVE: no XSAVE state components either.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32, ebx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            ebx,
            ..Default::default()
        }
    }

    #[test]
    fn sets_apic_id_and_hypervisor_bit() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0, 0, 0xffff_ffff)]).unwrap();
        normalize(
            &mut cpuid,
            3,
            CpuidOptions {
                vcpus: 4,
                kvm_pvm: false,
            },
        );
        let e = cpuid.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn no_asynchronous_page_faults() {
        let mut cpuid = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 0x4000_0001,
            eax: 0x0100_7fff,
            ..Default::default()
        }])
        .unwrap();
        normalize(
            &mut cpuid,
            0,
            CpuidOptions {
                vcpus: 1,
                kvm_pvm: false,
            },
        );
        let eax = cpuid.as_slice()[0].eax;
        assert_eq!(eax & (KVM_FEATURE_ASYNC_PF | KVM_FEATURE_ASYNC_PF_INT), 0);
        // The clock and the rest stay.
        assert_eq!(
            eax | KVM_FEATURE_ASYNC_PF | KVM_FEATURE_ASYNC_PF_INT,
            0x0100_7fff
        );
    }

    #[test]
    fn kvm_pvm_masks_apply_only_there() {
        let all = LEAF1_ECX_CX16 | LEAF1_ECX_POPCNT | LEAF1_ECX_XSAVE;
        let mut real =
            CpuId::from_entries(&[entry(1, 0, all, 0), entry(7, 0, 0, LEAF7_EBX_SMAP)]).unwrap();
        let mut pvm = real.clone();
        normalize(
            &mut real,
            0,
            CpuidOptions {
                vcpus: 1,
                kvm_pvm: false,
            },
        );
        normalize(
            &mut pvm,
            0,
            CpuidOptions {
                vcpus: 1,
                kvm_pvm: true,
            },
        );
        assert_eq!(real.as_slice()[0].ecx & all, all);
        assert_eq!(real.as_slice()[1].ebx, LEAF7_EBX_SMAP);
        assert_eq!(pvm.as_slice()[0].ecx & all, 0);
        assert_eq!(pvm.as_slice()[1].ebx & LEAF7_EBX_SMAP, 0);
    }
}
