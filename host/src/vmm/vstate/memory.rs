//! Guest RAM: anonymous, private, `MAP_NORESERVE` mappings (vm-memory's default), split around
//! the 32-bit MMIO gap, and registered with KVM as memory slots.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::vmm::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory as the VMM uses it.
pub type GuestMem = GuestMemoryMmap<()>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is zero or not whole pages.
    #[error("guest memory of {0} bytes is not a positive multiple of 4 KiB")]
    BadSize(u64),
    /// mmap failed.
    #[error("mapping {size} bytes of guest memory: {source}")]
    Map {
        /// The size asked for.
        size: u64,
        /// Why.
        source: vm_memory::mmap::FromRangesError,
    },
    /// A region has no host mapping (cannot happen for memory we mapped ourselves).
    #[error("guest memory region at {addr:#x} has no host mapping: {source}")]
    HostAddress {
        /// The region's start.
        addr: u64,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// KVM refused a memory slot.
    #[error("registering guest memory slot {slot} with KVM: {source}")]
    Register {
        /// The slot.
        slot: u32,
        /// Why.
        source: kvm_ioctls::Error,
    },
}

/// The guest-physical ranges RAM of `size` bytes occupies: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), usize::try_from(low).unwrap_or(usize::MAX))];
    if size > MMIO_GAP_START {
        let high = size - MMIO_GAP_START;
        ranges.push((
            GuestAddress(MMIO_GAP_END),
            usize::try_from(high).unwrap_or(usize::MAX),
        ));
    }
    ranges
}

/// Maps guest RAM, asking for transparent huge pages.
///
/// Huge pages mean one host page fault (and, on shadow-paging hosts such as kvm_pvm, one
/// shadow entry) per 2 MiB the guest touches instead of per 4 KiB; the kernel's early boot
/// touches much of a small VM's memory. QEMU does the same for its RAM. Where THP is off the
/// advice is ignored.
pub fn create(size: u64) -> Result<GuestMem, MemoryError> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(MemoryError::BadSize(size));
    }
    let mem = GuestMemoryMmap::from_ranges(&ram_ranges(size))
        .map_err(|source| MemoryError::Map { size, source })?;
    for region in mem.iter() {
        if let Ok(host) = mem.get_host_address(region.start_addr()) {
            let len = usize::try_from(region.len()).unwrap_or(0);
            // SAFETY: madvise only changes how the kernel backs this mapping, which `mem` owns
            // and keeps mapped; MADV_HUGEPAGE does not alter its contents.
            unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) };
        }
    }
    Ok(mem)
}

/// Registers every region of `mem` with KVM, one slot each.
pub fn register(vm: &VmFd, mem: &GuestMem) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        // The host address of the region's first byte.
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|source| MemoryError::HostAddress {
                addr: region.start_addr().raw_value(),
                source,
            })? as u64;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the VM outlives: the
        // VMM keeps `mem` until after the VM fd is closed. KVM only accesses it as guest RAM.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

/// The end of the RAM below the MMIO gap.
pub fn low_ram_end(mem: &GuestMem) -> GuestAddress {
    mem.iter()
        .map(|r| r.last_addr())
        .filter(|a| a.raw_value() < MMIO_GAP_START)
        .max()
        .map(|a| a.unchecked_add(1))
        .unwrap_or(GuestAddress(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), 0xc000_0000));
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), 1 << 30));
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(create(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(create(4095), Err(MemoryError::BadSize(_))));
        let mem = create(16 << 20).unwrap();
        assert_eq!(low_ram_end(&mem), GuestAddress(16 << 20));
    }
}
