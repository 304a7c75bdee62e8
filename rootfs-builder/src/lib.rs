//! Builds the initramfs every husk VM boots: an uncompressed "newc" cpio archive whose only
//! program is `husk-init` at `/init`.
//!
//! The archive is reproducible: entries are written in path order, with fixed inode numbers,
//! owners (root) and timestamps (0), so the same `husk-init` binary always gives the same bytes.
//! It is uncompressed on purpose: on hosts where guest kernel code is emulated, decompression
//! costs far more boot time than reading the larger archive (see `kernel-config/README.md`).
//!
//! The format is the one the kernel's `init/initramfs.c` reads (`Documentation/driver-api/
//! early-userspace/buffer-format.rst`): a 110-byte ASCII header per entry (magic `070701`, then
//! 13 fields of 8 hex digits), the NUL-terminated name, padding to 4 bytes, the data, padding
//! to 4 bytes, and a final entry named `TRAILER!!!`.

mod cpio;

pub use cpio::{Archive, ArchiveError, Entry, EntryKind};

/// Character device numbers of `/dev/console`: the kernel opens it for init's stdio before
/// husk-init has mounted devtmpfs.
pub const CONSOLE_DEVICE: (u32, u32) = (5, 1);

/// The directories husk-init needs before it has mounted anything (its mount points).
pub const MOUNT_POINTS: &[&str] = &["dev", "proc", "sys", "run", "tmp"];

/// The initramfs of a husk VM: `husk-init` as `/init`, its mount points and `/dev/console`.
pub fn guest_initramfs(init: Vec<u8>) -> Result<Archive, ArchiveError> {
    let mut archive = Archive::new();
    for dir in MOUNT_POINTS {
        archive.add(Entry::dir(dir, 0o755))?;
    }
    archive.add(Entry::char_device(
        "dev/console",
        0o600,
        CONSOLE_DEVICE.0,
        CONSOLE_DEVICE.1,
    ))?;
    archive.add(Entry::file("init", 0o755, init))?;
    Ok(archive)
}
