//! A template's key: what decides whether a saved template still fits this host, image and
//! binary. Computed on every `create` from `stat(2)` calls only (hashing the files
//! themselves would cost tens of milliseconds on the startup path).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::error::{TemplateError, io};
use super::shape::TemplateShape;
use crate::assets::GuestImage;

/// A template's key: 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(pub(super) String);

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Key {
    /// The key of a template of `shape` booted from `image` by this `husk`, on this host.
    pub fn new(image: &GuestImage, shape: TemplateShape) -> Result<Key, TemplateError> {
        let mut h = Sha256::new();
        h.update(b"husk template\0");
        h.update(env!("CARGO_PKG_VERSION").as_bytes());
        h.update(crate::vmm::persist::SNAPSHOT_VERSION.to_le_bytes());
        h.update(husk_proto::PROTOCOL_VERSION.to_le_bytes());
        for path in [&image.vmlinux, &image.initramfs] {
            identity(&mut h, path)?;
        }
        identity(&mut h, Path::new("/proc/self/exe"))?;
        h.update([shape.vcpus]);
        h.update(shape.mem_mib.to_le_bytes());
        h.update([u8::from(crate::vmm::host::HostProfile::detect().kvm_pvm)]);
        // A host kernel update can change what KVM saves and accepts.
        let release = Path::new("/proc/sys/kernel/osrelease");
        h.update(std::fs::read(release).map_err(io("reading", release))?);
        let digest = h.finalize();
        Ok(Key(digest[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()))
    }

    /// The key as a file name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` looks like a key.
    pub fn is_key(name: &str) -> bool {
        name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

/// Hashes which file `path` is and its version: device, inode, size, modification time.
fn identity(h: &mut Sha256, path: &Path) -> Result<(), TemplateError> {
    let m = std::fs::metadata(path).map_err(io("reading", path))?;
    for v in [m.dev(), m.ino(), m.size()] {
        h.update(v.to_le_bytes());
    }
    h.update(m.mtime().to_le_bytes());
    h.update(m.mtime_nsec().to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_change_with_the_shape_and_the_image() {
        let dir = std::env::temp_dir().join(format!("husk-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = GuestImage {
            vmlinux: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
        };
        std::fs::write(&image.vmlinux, b"kernel").unwrap();
        std::fs::write(&image.initramfs, b"init").unwrap();
        let shape = TemplateShape {
            vcpus: 1,
            mem_mib: 128,
        };
        let a = Key::new(&image, shape).unwrap();
        assert!(Key::is_key(a.as_str()), "{a}");
        assert_eq!(Key::new(&image, shape).unwrap(), a);
        let bigger = TemplateShape {
            mem_mib: 256,
            ..shape
        };
        assert_ne!(Key::new(&image, bigger).unwrap(), a);
        std::fs::write(&image.initramfs, b"init, rebuilt").unwrap();
        assert_ne!(Key::new(&image, shape).unwrap(), a);
        std::fs::remove_file(&image.vmlinux).unwrap();
        assert!(Key::new(&image, shape).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
