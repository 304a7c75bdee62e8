//! Guest RAM: anonymous, private, `MAP_NORESERVE` mappings (vm-memory's default), split around
//! the 32-bit MMIO gap, and registered with KVM as memory slots.
//!
//! Saved, guest RAM is one file: the regions one after the other, zero pages left as holes
//! ([`save`]). Restored, each region is a private (copy-on-write) mapping of its part of that
//! file ([`restore`]): the file is never written, and the page cache holds one copy of the
//! pages every VM restored from it has only read.

use std::fs::File;
use std::os::unix::fs::FileExt;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

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
    /// Saving guest memory to its file failed.
    #[error("writing guest memory at {addr:#x} to its file: {source}")]
    Save {
        /// The guest address being written.
        addr: u64,
        /// Why.
        source: std::io::Error,
    },
    /// Mapping the saved memory file failed.
    #[error("mapping the saved guest memory: {0}")]
    MapFile(String),
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

/// Pages [`save`] reads and checks at a time.
const SAVE_CHUNK: usize = 2 << 20;
const PAGE: usize = 4096;

/// Writes `mem` into `file` (empty, opened for writing), region after region; pages that are
/// all zeroes are not written and stay holes, so the file takes the disk space of what the
/// guest touched. The guest must not run meanwhile.
pub fn save(mem: &GuestMem, file: &File) -> Result<(), MemoryError> {
    let total: u64 = mem.iter().map(GuestMemoryRegion::len).sum();
    let mut buf = vec![0u8; SAVE_CHUNK];
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(SAVE_CHUNK as u64)).unwrap_or(SAVE_CHUNK);
            let addr = start + done;
            let save_err = |source| MemoryError::Save { addr, source };
            mem.read_slice(&mut buf[..n], GuestAddress(addr))
                .map_err(|e| save_err(std::io::Error::other(e)))?;
            // Runs of non-zero pages, each written with one pwrite.
            let mut page = 0;
            while page < n {
                if is_zero(&buf[page..page + PAGE]) {
                    page += PAGE;
                    continue;
                }
                let run_start = page;
                while page < n && !is_zero(&buf[page..page + PAGE]) {
                    page += PAGE;
                }
                let at = file_offset + done + run_start as u64;
                file.write_all_at(&buf[run_start..page], at)
                    .map_err(save_err)?;
            }
            done += n as u64;
        }
        file_offset += len;
    }
    // Holes at the end count too: the file is exactly the memory's size.
    file.set_len(total).map_err(|source| MemoryError::Save {
        addr: total,
        source,
    })
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// Guest RAM of `size` bytes mapped privately from `file` (as [`save`] wrote it, and exactly
/// `size` bytes long): copy on write, the file is never written.
pub fn restore(file: &File, size: u64) -> Result<GuestMem, MemoryError> {
    if size == 0 || !size.is_multiple_of(PAGE as u64) {
        return Err(MemoryError::BadSize(size));
    }
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (addr, len) in ram_ranges(size) {
        let file = file
            .try_clone()
            .map_err(|e| MemoryError::MapFile(format!("duplicating the file: {e}")))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file, file_offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| MemoryError::MapFile(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, addr)
            .ok_or_else(|| MemoryError::MapFile(format!("region at {:#x}", addr.0)))?;
        regions.push(region);
        file_offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::MapFile(e.to_string()))
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
    fn saved_memory_restores_copy_on_write_with_holes_for_zero_pages() {
        let mem = create(8 << 20).unwrap();
        mem.write_slice(b"kernel", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[7u8; 4096], GuestAddress(5 << 20))
            .unwrap();
        let path = std::env::temp_dir().join(format!("husk-mem-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        save(&mem, &file).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 8 << 20);
        // Two pages of data: the rest are holes.
        let blocks = std::os::unix::fs::MetadataExt::blocks(&file.metadata().unwrap());
        assert!(blocks * 512 <= 64 << 10, "{blocks} blocks allocated");

        let ro = File::open(&path).unwrap();
        let restored = restore(&ro, 8 << 20).unwrap();
        let mut word = [0u8; 6];
        restored
            .read_slice(&mut word, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(&word, b"kernel");
        assert_eq!(restored.read_obj::<u8>(GuestAddress(5 << 20)).unwrap(), 7);
        restored.write_obj(9u8, GuestAddress(5 << 20)).unwrap();
        drop(restored);
        // The write stayed in the private copy.
        let mut byte = [0u8; 1];
        ro.read_exact_at(&mut byte, 5 << 20).unwrap();
        assert_eq!(byte, [7]);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(create(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(create(4095), Err(MemoryError::BadSize(_))));
        let mem = create(16 << 20).unwrap();
        assert_eq!(low_ram_end(&mem), GuestAddress(16 << 20));
    }
}
