//! Where the guest image (vmlinux + initramfs.cpio) is found.
//!
//! In order: `$HUSK_IMAGE_DIR`; `<dir of the husk binary>/../share/husk`; `/usr/local/share/husk`;
//! `/usr/share/husk`; and, for a binary built in this workspace, the `target/husk-image` that
//! `cargo xtask build-image` writes.

use std::path::{Path, PathBuf};

/// The guest image files.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel.
    pub vmlinux: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
}

/// No directory searched holds the guest image.
#[derive(Debug, thiserror::Error)]
#[error(
    "guest image (vmlinux + initramfs.cpio) not found; looked in {looked_in} (build it with \
     `cargo xtask build-image`, or set HUSK_IMAGE_DIR)"
)]
pub struct ImageNotFound {
    /// Every directory searched, in order, comma-separated.
    looked_in: String,
}

/// Finds the guest image, or says everywhere it looked.
pub fn find() -> Result<GuestImage, ImageNotFound> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("HUSK_IMAGE_DIR") {
        candidates.push(dir.into());
    }
    if let Some(bin_dir) = std::env::current_exe()
        .ok()
        .as_deref()
        .and_then(Path::parent)
    {
        candidates.push(bin_dir.join("../share/husk"));
    }
    candidates.push("/usr/local/share/husk".into());
    candidates.push("/usr/share/husk".into());
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/husk-image"));
    for dir in &candidates {
        let image = GuestImage {
            vmlinux: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
        };
        if image.vmlinux.is_file() && image.initramfs.is_file() {
            return Ok(image);
        }
    }
    let tried: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    Err(ImageNotFound {
        looked_in: tried.join(", "),
    })
}
