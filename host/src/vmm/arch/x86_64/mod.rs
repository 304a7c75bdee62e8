//! x86-64: the guest-physical layout ([`layout`]), the Linux 64-bit boot protocol ([`boot`]),
//! the CPUID the guest sees ([`cpuid`]), the registers and page tables a vCPU starts with
//! ([`regs`]) and the MP table that announces the vCPUs and the IO-APIC ([`mptable`]).

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod vcpu;
pub mod vm;
