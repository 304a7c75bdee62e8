//! The 16550 UART (vm-superio) at 0x3f8/IRQ 4, output only: the kernel console when
//! debugging. Every byte the guest writes is a VM exit, so husk attaches it only on request
//! (`--console`).

use std::io::Write;

use vm_superio::Serial;
use vm_superio::serial::NoEvents;

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
