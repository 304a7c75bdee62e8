//! The KVM edge of the VMM: guest memory and its KVM slots ([`memory`]) and the vCPU threads
//! that run `KVM_RUN` ([`vcpu`]). Devices never call KVM themselves.

pub mod memory;
pub mod vcpu;
