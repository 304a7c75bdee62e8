//! The i8042 keyboard controller, only so that the guest's `reboot=k` (command 0xfe to port
//! 0x64, "pulse reset line") ends the VM: vm-superio signals the reset eventfd, which the
//! VMM's event loop treats as the guest asking to stop.

use vm_superio::I8042Device;

use crate::vmm::devices::{BusDevice, EventFdTrigger};

/// The controller at ports 0x60-0x64.
#[derive(Debug)]
pub struct I8042 {
    dev: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller writing `reset` when the guest resets the machine.
    pub fn new(reset: EventFdTrigger) -> I8042 {
        I8042 {
            dev: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.dev.read(off),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            // The only failure is the reset eventfd's write, which cannot fail short of a
            // counter overflow; nothing more to do either way.
            let _ = self.dev.write(off, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_the_reset_event() {
        let reset = EventFdTrigger::new().unwrap();
        let mut dev = I8042::new(reset.try_clone().unwrap());
        assert!(reset.0.read().is_err(), "no reset yet");
        dev.write(4, &[0xfe]);
        assert_eq!(reset.0.read().unwrap(), 1);
    }
}
