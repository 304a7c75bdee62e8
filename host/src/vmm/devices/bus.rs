//! Address-range routing of guest accesses to devices, shared by all vCPU threads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::BusDevice;
use crate::vmm::threads::lock;

/// A device shared between the bus and whoever else drives it (e.g. the event loop).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A registration that overlaps an existing one.
#[derive(Debug, thiserror::Error)]
#[error("device range {base:#x}+{len:#x} overlaps another device")]
pub struct Overlap {
    /// Start of the refused range.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

/// Port I/O or MMIO address space.
#[derive(Default)]
pub struct Bus {
    /// base -> (length, device)
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<String> = self
            .ranges
            .iter()
            .map(|(b, (l, _))| format!("{b:#x}+{l:#x}"))
            .collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Adds a device at [base, base + len).
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        let overlaps = len == 0
            || self
                .ranges
                .range(..end)
                .next_back()
                .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps {
            return Err(Overlap { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Routes a read; `false` when no device is there (the data is then all ones, like an
    /// unconnected bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a write; `false` when no device is there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap());
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_refuses_overlaps() {
        let dev: SharedDevice = Arc::new(Mutex::new(Reg(vec![])));
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.insert(0x108, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0xf8, 0x9, dev.clone()).is_err());
        assert!(bus.insert(0x200, 0, dev.clone()).is_err());
        bus.insert(0xf0, 0x10, dev.clone()).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x105, &mut b));
        assert_eq!(b, [5, 5]);
        assert!(!bus.read(0x110, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert!(bus.write(0x10f, &[7]));
        assert!(!bus.write(0x50, &[7]));
    }
}
