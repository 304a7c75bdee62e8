//! The directory the VM's virtio-fs device serves: the bundle's rootfs and the sources of the
//! spec's bind mounts, bind-mounted under `<state dir>/share/` inside the monitor's own private
//! mount namespace. Nothing of it is visible on the host, and it all goes away with the monitor.

use std::path::{Path, PathBuf};

use husk_proto::{FsSource, MountSource, SHARE_TAG};
use nix::mount::{MsFlags, mount};

use crate::mount_ns::MountNsError;
use crate::oci::bundle::Bundle;

/// Why the share could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The monitor's mount namespace could not be made (no CAP_SYS_ADMIN?).
    #[error("creating the monitor's mount namespace")]
    Namespace(#[source] nix::Error),
    /// The monitor's mounts could not be made private: the share would show on the host.
    #[error("making the monitor's mounts private")]
    Private(#[source] nix::Error),
    /// A directory or file of the share could not be made.
    #[error("creating {path}")]
    Create {
        /// What.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bind mount of the spec has no source.
    #[error("mount {index} ({destination}): a bind mount needs a source")]
    NoSource {
        /// Its index in `mounts`.
        index: u32,
        /// Its destination in the container.
        destination: PathBuf,
    },
    /// A bind mount's source is not there.
    #[error("mount {index} ({destination}): source {source_path}")]
    Source {
        /// Its index in `mounts`.
        index: u32,
        /// Its destination in the container.
        destination: PathBuf,
        /// The source, absolute.
        source_path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The rootfs or a bind mount's source could not be bound into the share.
    #[error("bind-mounting {from} on {to}")]
    Bind {
        /// The source.
        from: PathBuf,
        /// The place in the share.
        to: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// A read-only rootfs or bind mount could not be made read-only.
    #[error("making {path} read-only")]
    ReadOnly {
        /// Its place in the share.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// Enters a private mount namespace and assembles the share. Returns the share directory and
/// where each bind mount's source is in it.
pub fn prepare(
    state_dir: &Path,
    bundle: &Bundle,
) -> Result<(PathBuf, Vec<MountSource>), ShareError> {
    crate::mount_ns::enter().map_err(|e| match e {
        MountNsError::Unshare(e) => ShareError::Namespace(e),
        MountNsError::MakePrivate(e) => ShareError::Private(e),
    })?;
    let create = |path: &Path| {
        let path = path.to_owned();
        move |source| ShareError::Create { path, source }
    };
    let share = state_dir.join("share");
    let rootfs = share.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(create(&rootfs))?;
    // Writable even for `root.readonly`: as runc does, husk-init creates the mount points the
    // image lacks (a bundle from `runc spec` on a bare rootfs has no /proc) and the working
    // directory, and only then makes the container's root read-only, in the guest.
    bind(&bundle.rootfs, &rootfs, true)?;
    let mut sources = Vec::new();
    for (index, m, source) in bundle.bind_mounts() {
        let options = m.options().as_deref().unwrap_or_default();
        let Some(source) = source else {
            return Err(ShareError::NoSource {
                index,
                destination: m.destination().clone(),
            });
        };
        let meta = std::fs::metadata(&source).map_err(|e| ShareError::Source {
            index,
            destination: m.destination().clone(),
            source_path: source.clone(),
            source: e,
        })?;
        let target = share.join("mounts").join(index.to_string());
        std::fs::create_dir_all(share.join("mounts")).map_err(create(&share.join("mounts")))?;
        if meta.is_dir() {
            std::fs::create_dir_all(&target)
        } else {
            std::fs::write(&target, b"")
        }
        .map_err(create(&target))?;
        bind(&source, &target, options.iter().any(|o| o == "rbind"))?;
        if options.iter().any(|o| o == "ro") {
            remount_readonly(&target)?;
        }
        sources.push(MountSource {
            index,
            source: FsSource::Share {
                tag: SHARE_TAG.into(),
                path: format!("mounts/{index}"),
            },
        });
    }
    Ok((share, sources))
}

/// Makes an existing bind mount read-only, with every mount below it (an `rbind` brings the
/// source's submounts, and a remount reaches only the top one): the file server then gets
/// EROFS for any write. `mount_setattr(2)` with `AT_RECURSIVE` does the whole tree at once.
fn remount_readonly(target: &Path) -> Result<(), ShareError> {
    let err = |source| ShareError::ReadOnly {
        path: target.to_owned(),
        source,
    };
    let path = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| err(nix::Error::EINVAL))?;
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr(2) reads the NUL-terminated path and `attr`, whose size is
    // passed; both outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &raw const attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(err(nix::Error::last()));
    }
    Ok(())
}

fn bind(source: &Path, target: &Path, recursive: bool) -> Result<(), ShareError> {
    let flags = if recursive {
        MsFlags::MS_BIND | MsFlags::MS_REC
    } else {
        MsFlags::MS_BIND
    };
    mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(|e| ShareError::Bind {
        from: source.to_owned(),
        to: target.to_owned(),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read-only bind mount with `rbind` brings the mounts below its source: they must be
    /// read-only too, not only its top.
    #[test]
    fn a_read_only_rbind_is_read_only_below_its_top() {
        if !husk_e2e::is_root() {
            husk_e2e::skip::<()>("needs root (mounts)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("husk-share-ro-{}", std::process::id()));
        let (source, target) = (dir.join("source"), dir.join("target"));
        std::fs::create_dir_all(source.join("sub")).unwrap();
        std::fs::create_dir_all(&target).unwrap();
        // On a thread of its own: the mount namespace is the thread's, gone with it.
        let writes = std::thread::scope(|s| {
            s.spawn(|| {
                crate::mount_ns::enter().unwrap();
                // A mount below the source, as a volume with a mount inside it has.
                mount(
                    Some("tmpfs"),
                    &source.join("sub"),
                    Some("tmpfs"),
                    MsFlags::empty(),
                    None::<&str>,
                )
                .unwrap();
                bind(&source, &target, true).unwrap();
                remount_readonly(&target).unwrap();
                [target.join("top"), target.join("sub/below")]
                    .map(|p| std::fs::write(&p, b"x").map_err(|e| e.raw_os_error()))
            })
            .join()
            .unwrap()
        });
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(writes[0], Err(Some(libc::EROFS)), "the top");
        assert_eq!(writes[1], Err(Some(libc::EROFS)), "the mount below it");
    }
}
