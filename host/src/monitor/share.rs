//! The directory the VM's virtio-fs device serves: the bundle's rootfs and the sources of the
//! spec's bind mounts, bind-mounted under `<state dir>/share/` inside the monitor's own private
//! mount namespace. Nothing of it is visible on the host, and it all goes away with the monitor.

use std::path::{Path, PathBuf};

use husk_proto::{FsSource, MountSource, SHARE_TAG};
use nix::mount::{MsFlags, mount};

use crate::mount_ns::MountNsError;
use crate::oci::bundle::Bundle;

/// Enters a private mount namespace and assembles the share. Returns the share directory and
/// where each bind mount's source is in it.
pub fn prepare(state_dir: &Path, bundle: &Bundle) -> Result<(PathBuf, Vec<MountSource>), String> {
    crate::mount_ns::enter().map_err(|e| match e {
        MountNsError::Unshare(e) => format!("creating the monitor's mount namespace: {e}"),
        MountNsError::MakePrivate(e) => format!("making the monitor's mounts private: {e}"),
    })?;
    let share = state_dir.join("share");
    let rootfs = share.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| format!("creating {}: {e}", rootfs.display()))?;
    bind(&bundle.rootfs, &rootfs, true)?;
    if bundle
        .spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        // husk-init makes the container's root read-only too; this keeps the guest from
        // writing through the share even if it tried.
        remount_readonly(&rootfs)?;
    }
    let mut sources = Vec::new();
    let mounts = bundle.spec.mounts().as_deref().unwrap_or_default();
    for (index, m) in (0u32..).zip(mounts) {
        let options = m.options().as_deref().unwrap_or_default();
        let is_bind = m.typ().as_deref() == Some("bind")
            || options.iter().any(|o| o == "bind" || o == "rbind");
        if !is_bind {
            continue;
        }
        let Some(source) = m.source() else {
            return Err(format!(
                "mount {index} ({}): a bind mount needs a source",
                m.destination().display()
            ));
        };
        let source = if source.is_absolute() {
            source.clone()
        } else {
            bundle.dir.join(source)
        };
        let meta = std::fs::metadata(&source).map_err(|e| {
            format!(
                "mount {index} ({}): source {}: {e}",
                m.destination().display(),
                source.display()
            )
        })?;
        let target = share.join("mounts").join(index.to_string());
        std::fs::create_dir_all(share.join("mounts"))
            .map_err(|e| format!("creating {}/mounts: {e}", share.display()))?;
        if meta.is_dir() {
            std::fs::create_dir_all(&target)
        } else {
            std::fs::write(&target, b"")
        }
        .map_err(|e| format!("creating {}: {e}", target.display()))?;
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

/// Makes an existing bind mount read-only (the file server then gets EROFS for any write).
fn remount_readonly(target: &Path) -> Result<(), String> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| format!("making {} read-only: {e}", target.display()))
}

fn bind(source: &Path, target: &Path, recursive: bool) -> Result<(), String> {
    let flags = if recursive {
        MsFlags::MS_BIND | MsFlags::MS_REC
    } else {
        MsFlags::MS_BIND
    };
    mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(|e| {
        format!(
            "bind-mounting {} on {}: {e}",
            source.display(),
            target.display()
        )
    })
}
