//! Saving and restoring what KVM keeps for the whole x86-64 VM: the in-kernel interrupt
//! controllers (both 8259 PICs and the IO-APIC), the PIT and the KVM clock.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// The VM-wide state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmArchState {
    /// The KVM clock (what the guest's kvmclock reads).
    pub clock: kvm_clock_data,
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IO-APIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
}

/// A KVM call on the VM failed.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
pub struct VmStateError {
    /// The ioctl.
    pub call: &'static str,
    /// Why.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn err(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { call, source }
}

impl VmArchState {
    /// Reads the state of a VM whose vCPUs are all stopped.
    pub fn save(vm: &VmFd) -> Result<Self, VmStateError> {
        let pit = vm.get_pit2().map_err(err("KVM_GET_PIT2"))?;
        let clock = vm.get_clock().map_err(err("KVM_GET_CLOCK"))?;
        let chip = |id| -> Result<kvm_irqchip, VmStateError> {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip).map_err(err("KVM_GET_IRQCHIP"))?;
            Ok(chip)
        };
        Ok(VmArchState {
            clock,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit,
        })
    }

    /// Gives a new VM (irqchip and PIT created, no vCPU run yet) this state.
    ///
    /// The clock is set to the saved value as it is: the guest's monotonic time goes on from
    /// where it was saved, whenever the restore happens (the flags that would make KVM add the
    /// time elapsed since, or read the host's TSC, are cleared). The wall clock is the guest's
    /// own business (husk-init sets it from the host after a restore).
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        vm.set_pit2(&self.pit).map_err(err("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
        for (chip, id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            // The chip id decides which union member KVM reads: never trust the saved one.
            let chip = kvm_irqchip {
                chip_id: id,
                ..*chip
            };
            vm.set_irqchip(&chip).map_err(err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
