//! Where the guest image (vmlinux + initramfs.cpio) is found.
//!
//! `$HUSK_IMAGE_DIR`, when set (and not empty), is the only place looked at: an image named
//! explicitly that is not there is an error saying which file is missing, never a silent
//! fallback to another image. Otherwise, in order: `<dir of the husk binary>/../share/husk`;
//! `/usr/local/share/husk`; `/usr/share/husk`; and, for a binary built in this workspace, the
//! `target/husk-image` that `cargo xtask build-image` writes.

use std::path::{Path, PathBuf};

/// The environment variable that names the image directory.
pub const IMAGE_DIR_ENV: &str = "HUSK_IMAGE_DIR";

/// The guest image files.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel.
    pub vmlinux: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
}

impl GuestImage {
    fn in_dir(dir: &Path) -> Self {
        Self {
            vmlinux: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
        }
    }

    fn is_complete(&self) -> bool {
        self.vmlinux.is_file() && self.initramfs.is_file()
    }
}

/// Why no guest image was found.
#[derive(Debug, thiserror::Error)]
pub enum ImageNotFound {
    /// `$HUSK_IMAGE_DIR` names a directory without a complete image.
    #[error(
        "guest image from {IMAGE_DIR_ENV}={dir}: {file}: {reason} (build it with `cargo xtask \
         build-image --out {dir}`, or unset {IMAGE_DIR_ENV} to use the default places)"
    )]
    Explicit {
        /// The directory named.
        dir: String,
        /// The file that is missing or not a file.
        file: String,
        /// What is wrong with it.
        reason: std::io::Error,
    },
    /// No default place holds an image.
    #[error(
        "guest image (vmlinux + initramfs.cpio) not found; looked in {looked_in} (build it with \
         `cargo xtask build-image`, or set {IMAGE_DIR_ENV})"
    )]
    Nowhere {
        /// Every directory searched, in order, comma-separated.
        looked_in: String,
    },
}

/// Finds the guest image, or says what is missing (from `$HUSK_IMAGE_DIR`) or everywhere it
/// looked.
pub fn find() -> Result<GuestImage, ImageNotFound> {
    let explicit = std::env::var_os(IMAGE_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    let mut defaults: Vec<PathBuf> = Vec::new();
    if let Some(bin_dir) = std::env::current_exe()
        .ok()
        .as_deref()
        .and_then(Path::parent)
    {
        defaults.push(bin_dir.join("../share/husk"));
    }
    defaults.push("/usr/local/share/husk".into());
    defaults.push("/usr/share/husk".into());
    defaults.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/husk-image"));
    find_in(explicit.as_deref(), &defaults)
}

/// [`find`] with the explicit directory and the default places given.
fn find_in(explicit: Option<&Path>, defaults: &[PathBuf]) -> Result<GuestImage, ImageNotFound> {
    if let Some(dir) = explicit {
        let image = GuestImage::in_dir(dir);
        for file in [&image.vmlinux, &image.initramfs] {
            if let Err(reason) = std::fs::metadata(file).and_then(|m| {
                if m.is_file() {
                    Ok(())
                } else {
                    Err(std::io::Error::other("not a regular file"))
                }
            }) {
                return Err(ImageNotFound::Explicit {
                    dir: dir.display().to_string(),
                    file: file.display().to_string(),
                    reason,
                });
            }
        }
        return Ok(image);
    }
    for dir in defaults {
        let image = GuestImage::in_dir(dir);
        if image.is_complete() {
            return Ok(image);
        }
    }
    let tried: Vec<String> = defaults.iter().map(|d| d.display().to_string()).collect();
    Err(ImageNotFound::Nowhere {
        looked_in: tried.join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_dir(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("vmlinux"), "kernel").unwrap();
        std::fs::write(dir.join("initramfs.cpio"), "init").unwrap();
        dir.to_path_buf()
    }

    #[test]
    fn an_explicit_directory_is_the_only_place_looked_at() {
        let tmp = husk_e2e::TempDir::new("assets");
        let installed = image_dir(&tmp.path().join("installed"));
        let defaults = [tmp.path().join("nothing-here"), installed.clone()];

        // Missing directory: an error naming it and the missing file, not the installed image.
        let missing = tmp.path().join("typo");
        let e = find_in(Some(&missing), &defaults).unwrap_err().to_string();
        assert!(
            e.contains(&format!("HUSK_IMAGE_DIR={}", missing.display()))
                && e.contains(&format!("{}/vmlinux", missing.display())),
            "{e}"
        );
        // Half an image: the missing half is named.
        let half = tmp.path().join("half");
        std::fs::create_dir_all(&half).unwrap();
        std::fs::write(half.join("vmlinux"), "kernel").unwrap();
        let e = find_in(Some(&half), &defaults).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{}/initramfs.cpio", half.display())),
            "{e}"
        );
        // A complete explicit image is used; without one the defaults are searched in order.
        let own = image_dir(&tmp.path().join("own"));
        assert_eq!(
            find_in(Some(&own), &defaults).unwrap().vmlinux,
            own.join("vmlinux")
        );
        assert_eq!(
            find_in(None, &defaults).unwrap().initramfs,
            installed.join("initramfs.cpio")
        );
        let e = find_in(None, &defaults[..1]).unwrap_err().to_string();
        assert!(e.contains("nothing-here"), "{e}");
    }
}
