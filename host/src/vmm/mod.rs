//! The VMM: a KVM virtual machine that boots the guest kernel directly, with the few devices a
//! container VM needs, or that is restored from a saved one (a VM template).
//!
//! Laid out as Firecracker's: [`builder`] makes a VM from a [`VmConfig`] ([`start`]: boot) or
//! from a snapshot of one of the same shape ([`restore`]), with its devices on their buses
//! (`device_manager`); `running` is the started VM ([`RunningVm`]: its threads, pausing,
//! saving, waiting for its end); [`config`] what a VM is made of, and its shape; `vstate` the
//! KVM edge (guest memory, vCPU threads); `arch::x86_64` what is x86 (layout, boot protocol,
//! CPUID, registers, MP table, the vCPU's and the VM's saved state); `devices` the models
//! (`legacy`: serial, i8042, boot markers; `virtio`: the MMIO transport, the plumbing every
//! device shares, vsock, fs, net; `persist`: the `Persist` trait each of them implements next
//! to its own state); [`persist`] the snapshot that gathers those states, and its files;
//! `event_loop` the "vmm" thread; `error` the [`VmError`]. This file only names the parts and
//! what the rest of the crate uses of them: every part depends on the ones below it, never on
//! this file.
//!
//! Threads: the caller's thread ("api") starts the VM and waits for it to end; one thread runs
//! the device event loop ("vmm"); one thread per vCPU. What they share (their seccomp
//! filters, a lock that survives a panic, why the VM ended) is `threads`.
//!
//! How a VM ends: husk-init writes the `PowerOff` boot marker (the normal way), the guest
//! resets through the i8042 (`reboot=k`) or triple-faults, KVM reports an error, or the host
//! asks ([`RunningVm::stop`]). Whatever comes first is the [`VmExit`].

pub(crate) mod arch;
mod builder;
pub mod config;
mod device_manager;
pub mod devices;
mod error;
mod event_loop;
pub mod host;
pub mod kernel_log;
pub mod persist;
mod running;
mod threads;
mod vstate;

pub use builder::{restore, start};
pub use config::{MAX_NETS, MAX_VCPUS, NetConfig, VmConfig};
pub use device_manager::spare_net_mac;
pub use error::VmError;
pub use running::{RunningVm, Timeline, VmHandle};
pub use threads::{SeccompMode, ThreadKind, VmExit, apply_seccomp};

#[cfg(test)]
mod tests;
