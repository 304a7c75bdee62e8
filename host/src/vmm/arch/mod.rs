//! What depends on the guest architecture: where things go in guest memory, how the kernel is
//! loaded and entered, the CPUID and registers the vCPUs start with, and the firmware tables
//! the kernel reads. husk guests are x86-64 only; another architecture would be a sibling
//! module with the same functions.

pub mod x86_64;

pub use x86_64::*;
