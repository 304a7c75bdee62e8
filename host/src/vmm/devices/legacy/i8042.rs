//! The i8042 keyboard controller, only so that the guest's `reboot=k` (command 0xfe to port
//! 0x64, "pulse reset line") ends the VM: vm-superio signals the reset eventfd, which the
//! VMM's event loop treats as the guest asking to stop.

use serde::{Deserialize, Serialize};
use vm_superio::I8042Device;

use crate::vmm::devices::persist::Persist;
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

/// What the controller keeps between accesses: nothing. vm-superio's i8042 answers every
/// read from constants and acts on a write at once (the reset command), so a new one is the
/// saved one. The type exists so that the device has its place in the saved VM (and gets a
/// field here the day it keeps something).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

impl Persist for I8042 {
    type State = I8042State;
    /// The reset line.
    type ConstructorArgs = EventFdTrigger;
    type Error = std::convert::Infallible;

    fn save(&self) -> I8042State {
        I8042State {}
    }

    fn restore(reset: EventFdTrigger, _: &I8042State) -> Result<I8042, Self::Error> {
        Ok(I8042::new(reset))
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
