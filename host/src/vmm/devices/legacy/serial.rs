//! The 16550 UART (vm-superio) at 0x3f8/IRQ 4, output only: the kernel console when
//! debugging. Every byte the guest writes is a VM exit, so husk attaches it only on request
//! (`--console`).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::Serial;
use vm_superio::serial::NoEvents;

use crate::vmm::devices::persist::Persist;
use crate::vmm::devices::{BusDevice, EventFdTrigger};

/// The UART as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

impl SerialDevice {
    /// A UART raising its interrupt through `irq` and writing to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> SerialDevice {
        SerialDevice {
            serial: Serial::new(irq, out),
        }
    }
}

/// The UART's registers and receive FIFO (vm-superio's `SerialState`, which is not serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl Persist for SerialDevice {
    type State = SerialState;
    /// The interrupt and where the output goes.
    type ConstructorArgs = (EventFdTrigger, Box<dyn Write + Send>);
    type Error = String;

    fn save(&self) -> SerialState {
        let s = self.serial.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore((irq, out): Self::ConstructorArgs, s: &SerialState) -> Result<SerialDevice, String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, irq, NoEvents, out)
            .map_err(|e| format!("serial console: {e:?}"))?;
        Ok(SerialDevice { serial })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) if off < 8 => data[0] = self.serial.read(off),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data)
            && off < 8
            && let Err(e) = self.serial.write(off, *value)
        {
            // The output (a pipe or terminal) failed: the console is for debugging only, so
            // losing it must not stop the VM.
            let _ = e;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let irq = EventFdTrigger::new().unwrap();
        let mut serial = SerialDevice::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        serial.write(3, &[0x80]); // LCR: divisor latch access
        serial.write(0, &[0x0c]); // 9600 baud
        serial.write(3, &[0x03]); // 8N1
        serial.write(7, &[0x5a]); // scratch
        let state = serial.save();
        let mut restored = SerialDevice::restore((irq, Box::new(std::io::sink())), &state).unwrap();
        assert_eq!(restored.save(), state);
        let mut b = [0u8];
        restored.read(7, &mut b);
        assert_eq!(b, [0x5a]);
        restored.read(3, &mut b);
        assert_eq!(b, [0x03]);
        let full = SerialState {
            in_buffer: vec![0; 4096],
            ..state
        };
        let irq = EventFdTrigger::new().unwrap();
        assert!(SerialDevice::restore((irq, Box::new(std::io::sink())), &full).is_err());
    }
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let sink = Sink::default();
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        // Wrong sizes and offsets are ignored.
        dev.write(0, &[1, 2]);
        dev.write(99, &[1]);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }
}
