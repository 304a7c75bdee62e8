//! The VMM: a KVM virtual machine that boots the guest kernel directly, with the few devices a
//! container VM needs.

pub mod devices;
