//! The boot-marker port (`husk_proto::marker::MARKER_PORT`): husk-init writes one byte at
//! defined points of its life; each write is timestamped here. The `PowerOff` marker means
//! the guest has synced and is done, so the VMM stops the VM at once instead of waiting for
//! the kernel's reboot path.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use husk_proto::marker::Marker;

use crate::vmm::devices::{BusDevice, EventFdTrigger};

/// Marker timestamps, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct MarkerLog {
    /// (when, marker) in arrival order; unknown bytes are kept as `Err(byte)`.
    pub entries: Vec<(Instant, Result<Marker, u8>)>,
}

/// The port device.
#[derive(Debug)]
pub struct MarkerPort {
    log: Arc<Mutex<MarkerLog>>,
    power_off: EventFdTrigger,
}

/// Most entries kept: a guest writing the port in a loop must not grow memory without bound.
const MAX_ENTRIES: usize = 256;

impl MarkerPort {
    /// A port recording into `log` and writing `power_off` on the `PowerOff` marker.
    pub fn new(log: Arc<Mutex<MarkerLog>>, power_off: EventFdTrigger) -> MarkerPort {
        MarkerPort { log, power_off }
    }
}

impl BusDevice for MarkerPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let now = Instant::now();
        if offset != 0 || data.len() != 1 {
            return;
        }
        let marker = Marker::from_byte(data[0]).ok_or(data[0]);
        {
            let mut log = self
                .log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if log.entries.len() < MAX_ENTRIES {
                log.entries.push((now, marker));
            }
        }
        if marker == Ok(Marker::PowerOff) {
            let _ = vm_superio::Trigger::trigger(&self.power_off);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_markers_and_signals_power_off() {
        let log = Arc::new(Mutex::new(MarkerLog::default()));
        let off = EventFdTrigger::new().unwrap();
        let mut port = MarkerPort::new(log.clone(), off.try_clone().unwrap());
        port.write(0, &[Marker::InitStarted as u8]);
        port.write(0, &[0x77]);
        port.write(0, &[1, 2]); // wrong size: ignored
        assert!(off.0.read().is_err());
        port.write(0, &[Marker::PowerOff as u8]);
        assert_eq!(off.0.read().unwrap(), 1);
        let got: Vec<_> = log.lock().unwrap().entries.iter().map(|e| e.1).collect();
        assert_eq!(
            got,
            vec![Ok(Marker::InitStarted), Err(0x77), Ok(Marker::PowerOff)]
        );
        for _ in 0..1000 {
            port.write(0, &[1]);
        }
        assert_eq!(log.lock().unwrap().entries.len(), MAX_ENTRIES);
    }
}
