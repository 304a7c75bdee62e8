//! Direct boot of the uncompressed `vmlinux`: load the ELF, place the initramfs and the
//! command line, and fill in `boot_params` (the "zero page") with the e820 memory map.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{KernelLoader, load_cmdline};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};

use super::layout::{
    CMDLINE, CMDLINE_MAX, EBDA, HIGH_MEMORY, MMIO_GAP_END, MMIO_GAP_START, ZERO_PAGE,
};
use crate::vmm::vstate::memory::{GuestMem, low_ram_end};

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("kernel image {path}: {source}")]
    KernelFile {
        /// The path given.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel is not a loadable x86-64 ELF vmlinux.
    #[error(
        "kernel image {path} cannot be loaded (is it an uncompressed x86-64 vmlinux?): {source}"
    )]
    KernelLoad {
        /// The path given.
        path: String,
        /// Why.
        source: linux_loader::loader::Error,
    },
    /// The initramfs file cannot be read.
    #[error("initramfs {path}: {source}")]
    InitrdFile {
        /// The path given.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the end of low memory.
    #[error(
        "initramfs of {size} bytes does not fit in guest RAM below {limit:#x} after the kernel (ends at {kernel_end:#x}); give the VM more memory"
    )]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// Where the kernel ends.
        kernel_end: u64,
        /// The end of low RAM.
        limit: u64,
    },
    /// The command line is too long or has invalid characters.
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// Writing the command line into guest memory failed.
    #[error("writing the kernel command line: {source}")]
    CmdlineLoad {
        /// Why.
        source: linux_loader::loader::Error,
    },
    /// Writing into guest memory failed.
    #[error("writing {what} into guest memory: {source}")]
    Memory {
        /// What.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// Writing boot_params failed.
    #[error("writing boot_params: {0}")]
    BootParams(#[from] linux_loader::configurator::Error),
}

/// Where the guest was loaded.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// The kernel's 64-bit entry point.
    pub entry: GuestAddress,
}

/// `boot_params` as plain bytes for guest memory.
#[derive(Clone, Copy, Default)]
struct ZeroPage(#[expect(dead_code, reason = "read as bytes through ByteValued")] boot_params);

// SAFETY: boot_params is a bindgen-generated `repr(C, packed)` struct made only of integers and
// arrays of integers: every byte pattern is a valid value and it has no padding or pointers.
unsafe impl ByteValued for ZeroPage {}

/// The Linux boot protocol's magic values.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Loads `kernel` (and `initrd`) into `mem` and writes the command line and boot_params.
pub fn load(
    mem: &GuestMem,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<Loaded, BootError> {
    let mut file = File::open(kernel).map_err(|source| BootError::KernelFile {
        path: kernel.display().to_string(),
        source,
    })?;
    let result =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY))).map_err(|source| {
            BootError::KernelLoad {
                path: kernel.display().to_string(),
                source,
            }
        })?;

    let initrd = match initrd {
        Some(path) => Some(load_initrd(mem, path, result.kernel_end)?),
        None => None,
    };

    let mut cl = Cmdline::new(CMDLINE_MAX)?;
    cl.insert_str(cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cl)
        .map_err(|source| BootError::CmdlineLoad { source })?;
    let cmdline_len = cl.as_cstring()?.as_bytes().len();

    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE).unwrap_or(0);
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(0);
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = u32::try_from(addr.raw_value()).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(0);
    }
    let e820 = e820_map(mem);
    for (i, (addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
        };
    }
    params.e820_entries = u8::try_from(e820.len()).unwrap_or(0);
    LinuxBootConfigurator::write_bootparams::<GuestMem>(
        &BootParams::new(&ZeroPage(params), GuestAddress(ZERO_PAGE)),
        mem,
    )?;
    Ok(Loaded {
        entry: result.kernel_load,
    })
}

/// Reads the initramfs to the top of low RAM (page aligned), above the kernel.
fn load_initrd(
    mem: &GuestMem,
    path: &Path,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let file_err = |source| BootError::InitrdFile {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(file_err)?;
    let size = file.metadata().map_err(file_err)?.len();
    let limit = low_ram_end(mem).raw_value();
    let too_large = BootError::InitrdTooLarge {
        size,
        kernel_end,
        limit,
    };
    let Some(start) = limit.checked_sub(size).map(|a| a & !0xfff) else {
        return Err(too_large);
    };
    if start < kernel_end {
        return Err(too_large);
    }
    let len = usize::try_from(size).map_err(|_| BootError::InitrdFile {
        path: path.display().to_string(),
        source: std::io::Error::other("too large"),
    })?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, len)
        .map_err(|source| BootError::Memory {
            what: "the initramfs",
            source,
        })?;
    Ok((GuestAddress(start), size))
}

/// The e820 map: RAM below the EBDA, RAM from 1 MiB to the MMIO gap, RAM above 4 GiB.
/// [EBDA, 1 MiB) is reserved (MP table, legacy ROM/VGA hole).
pub fn e820_map(mem: &GuestMem) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA, E820_RAM),
        (EBDA, HIGH_MEMORY - EBDA, E820_RESERVED),
    ];
    let low_end = low_ram_end(mem).raw_value();
    if low_end > HIGH_MEMORY {
        map.push((HIGH_MEMORY, low_end - HIGH_MEMORY, E820_RAM));
    }
    let high: u64 = mem
        .iter()
        .filter(|r| r.start_addr().raw_value() >= MMIO_GAP_END)
        .map(GuestMemoryRegion::len)
        .sum();
    if high > 0 {
        map.push((MMIO_GAP_END, high, E820_RAM));
    }
    debug_assert!(low_end <= MMIO_GAP_START);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_the_legacy_hole() {
        let mem = crate::vmm::vstate::memory::create(64 << 20).unwrap();
        let map = e820_map(&mem);
        assert_eq!(
            map,
            vec![
                (0, EBDA, E820_RAM),
                (EBDA, HIGH_MEMORY - EBDA, E820_RESERVED),
                (HIGH_MEMORY, (64 << 20) - HIGH_MEMORY, E820_RAM)
            ]
        );
    }

    #[test]
    fn missing_and_bogus_kernels_are_clear_errors() {
        let mem = crate::vmm::vstate::memory::create(64 << 20).unwrap();
        let err = load(&mem, Path::new("/nonexistent/vmlinux"), None, "").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
        let bogus = std::env::temp_dir().join(format!("husk-bogus-kernel-{}", std::process::id()));
        std::fs::write(&bogus, b"this is not an ELF file at all, just text").unwrap();
        let err = load(&mem, &bogus, None, "").unwrap_err();
        std::fs::remove_file(&bogus).unwrap();
        assert!(matches!(err, BootError::KernelLoad { .. }), "{err}");
        assert!(err.to_string().contains("uncompressed x86-64 vmlinux"));
    }
}
