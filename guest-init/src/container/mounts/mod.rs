//! The container's filesystem view: the root, the spec's mounts in order, device nodes,
//! pivot_root, masked and read-only paths — built the way runc builds them.
//!
//! Every mount destination is resolved *inside* the rootfs with `openat2(RESOLVE_IN_ROOT)`
//! and the mount is made on the resulting `/proc/self/fd/N`, so a symlink in the image can
//! never redirect a mount outside the container's root (the runc CVE-2021-30465 class).
//!
//! This file holds the plan ([`RootfsPlan`]: what `spec` decided) and carries it out in the
//! container's mount namespace: [`RootfsPlan::mount_all`], [`RootfsPlan::pivot`],
//! [`RootfsPlan::finish`]. What it builds on lives beside it:
//!
//! - `options`: the OCI mount option words as mount(2) flags, propagation and data;
//! - `resolve`: paths resolved inside the rootfs, never out of it (the one place that
//!   opens a path of the image);
//! - `devices`: the device nodes and `/dev` links a container gets when /dev is not bound.

mod devices;
mod options;
mod resolve;
#[cfg(test)]
mod tests;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;

pub use self::devices::DevicePlan;
use self::devices::{dev_symlinks, make_device};
pub use self::options::{MountOptions, parse_options, propagation_flags};
pub use self::resolve::is_clean_relative;
use self::resolve::{Create, proc_fd_path, resolve_in_root};
use super::sync::{ChildError, sys_err};

/// One mount of the spec, ready to apply.
#[derive(Debug, Clone)]
pub struct MountPlan {
    /// Its index in the spec (for messages).
    pub index: usize,
    /// Where it goes, absolute inside the container.
    pub destination: PathBuf,
    /// What is mounted.
    pub kind: MountKind,
    /// How.
    pub options: MountOptions,
}

/// What a mount mounts.
#[derive(Debug, Clone)]
pub enum MountKind {
    /// A bind mount of a guest path (the share, or a guest directory).
    Bind {
        /// The guest path.
        source: PathBuf,
    },
    /// A fresh filesystem made in the guest.
    Fs {
        /// Filesystem type (`tmpfs`, `proc`, ...).
        fstype: String,
        /// The mount source string.
        source: String,
    },
}

/// The whole filesystem view of a container.
#[derive(Debug, Clone)]
pub struct RootfsPlan {
    /// The root filesystem, a guest path.
    pub rootfs: PathBuf,
    /// `root.readonly`.
    pub readonly: bool,
    /// `linux.rootfsPropagation` (default rslave).
    pub propagation: MsFlags,
    /// The spec's mounts, in order.
    pub mounts: Vec<MountPlan>,
    /// Device nodes (defaults plus `linux.devices`), unless /dev is bind-mounted.
    pub devices: Vec<DevicePlan>,
    /// `linux.maskedPaths`.
    pub masked_paths: Vec<PathBuf>,
    /// `linux.readonlyPaths`.
    pub readonly_paths: Vec<PathBuf>,
    /// The process's working directory, created if missing.
    pub cwd: PathBuf,
}

/// The flags statvfs reports that a bind remount must keep (the kernel refuses to clear
/// locked ones and silently clearing others is not what the spec asked).
fn current_flags(path: &Path) -> MsFlags {
    use nix::sys::statvfs::FsFlags;
    let Ok(st) = nix::sys::statvfs::statvfs(path) else {
        return MsFlags::empty();
    };
    let f = st.flags();
    let mut out = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(fs) {
            out |= ms;
        }
    }
    out
}

fn bind_remount(target: &Path, flags: MsFlags) -> nix::Result<()> {
    let flags = flags | MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
    match nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
        Err(Errno::EPERM) => nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            flags | current_flags(target),
            None::<&str>,
        ),
        other => other,
    }
}

impl RootfsPlan {
    /// Builds the view up to pivot_root; runs in the container's new mount namespace.
    ///
    /// `rootfsPropagation` is runc's two steps: here it is applied to every mount of the
    /// namespace (by default rslave, so nothing the container mounts reaches husk-init's
    /// mounts), and the mount holding the rootfs is made private (or a slave) so that the
    /// rootfs bind neither joins a shared peer group nor makes pivot_root fail; [`Self::pivot`]
    /// then applies it to the container's own root.
    pub fn mount_all(&self, in_userns: bool) -> Result<(), ChildError> {
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            self.propagation,
            None::<&str>,
        )
        .map_err(sys_err(format!(
            "setting the propagation of / to {:?} (linux.rootfsPropagation)",
            self.propagation
        )))?;
        self.isolate_rootfs_parent()?;
        nix::mount::mount(
            Some(&self.rootfs),
            &self.rootfs,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys_err(format!(
            "bind-mounting the rootfs {}",
            self.rootfs.display()
        )))?;
        let root = nix::fcntl::open(
            &self.rootfs,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(sys_err(format!(
            "opening the rootfs {}",
            self.rootfs.display()
        )))?;

        for m in &self.mounts {
            self.mount_one(&root, m).map_err(|e| ChildError {
                code: e.code,
                message: format!(
                    "mount {} ({}): {}",
                    m.index,
                    m.destination.display(),
                    e.message
                ),
            })?;
        }
        let dev_is_bound = self.mounts.iter().any(|m| {
            m.destination == Path::new("/dev") && matches!(m.kind, MountKind::Bind { .. })
        });
        if !dev_is_bound {
            for d in &self.devices {
                make_device(&root, d, in_userns)?;
            }
            dev_symlinks(&root)?;
        }
        resolve_in_root(&root, &self.cwd, Create::Dir).map_err(sys_err(format!(
            "creating the working directory {}",
            self.cwd.display()
        )))?;
        Ok(())
    }

    /// Makes the mount the rootfs lies on private, or a slave when the root propagation is
    /// one (as runc): the first path up from the rootfs that is a mount point (EINVAL means
    /// "not one").
    fn isolate_rootfs_parent(&self) -> Result<(), ChildError> {
        let flag = if self.propagation.contains(MsFlags::MS_SLAVE) {
            MsFlags::MS_SLAVE
        } else {
            MsFlags::MS_PRIVATE
        };
        let mut path = self.rootfs.as_path();
        loop {
            match nix::mount::mount(None::<&str>, path, None::<&str>, flag, None::<&str>) {
                Ok(()) => return Ok(()),
                Err(Errno::EINVAL) if let Some(parent) = path.parent() => path = parent,
                Err(e) => {
                    return Err(ChildError::sys(
                        format!(
                            "making {} (the mount holding the rootfs) {flag:?}",
                            path.display()
                        ),
                        e,
                    ));
                }
            }
        }
    }

    fn mount_one(&self, root: &OwnedFd, m: &MountPlan) -> Result<(), ChildError> {
        let create = match &m.kind {
            MountKind::Bind { source } if !source.is_dir() => Create::File,
            _ => Create::Dir,
        };
        let target_fd = resolve_in_root(root, &m.destination, create)
            .map_err(sys_err("creating the mount point"))?;
        let target = proc_fd_path(&target_fd);
        let opts = &m.options;
        let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
        match &m.kind {
            MountKind::Bind { source } => {
                let rec = opts.flags & MsFlags::MS_REC;
                nix::mount::mount(
                    Some(source),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND | rec,
                    None::<&str>,
                )
                .map_err(sys_err(format!("bind-mounting {}", source.display())))?;
                let extra = opts.flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
                if !extra.is_empty() {
                    // The bind mount is a new mount: reopen it so the remount hits it, not
                    // the directory underneath.
                    let fd = resolve_in_root(root, &m.destination, Create::Nothing)
                        .map_err(sys_err("reopening the bind mount"))?;
                    bind_remount(&proc_fd_path(&fd), extra)
                        .map_err(sys_err("remounting the bind mount with its options"))?;
                }
            }
            MountKind::Fs { fstype, source } => {
                let fstype = if fstype == "cgroup" {
                    "cgroup2"
                } else {
                    fstype.as_str()
                };
                let res = nix::mount::mount(
                    Some(source.as_str()),
                    &target,
                    Some(fstype),
                    opts.flags,
                    data,
                );
                match res {
                    Ok(()) => {}
                    // In a user namespace without its own network namespace sysfs cannot be
                    // mounted; runc binds the existing one instead.
                    Err(Errno::EPERM) if fstype == "sysfs" => nix::mount::mount(
                        Some("/sys"),
                        &target,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REC,
                        None::<&str>,
                    )
                    .map_err(sys_err("bind-mounting /sys (sysfs was refused)"))?,
                    Err(e) => return Err(ChildError::sys(format!("mounting {fstype}"), e)),
                }
            }
        }
        for p in &opts.propagation {
            let fd = resolve_in_root(root, &m.destination, Create::Nothing)
                .map_err(sys_err("reopening the mount"))?;
            nix::mount::mount(
                None::<&str>,
                &proc_fd_path(&fd),
                None::<&str>,
                *p,
                None::<&str>,
            )
            .map_err(sys_err("setting mount propagation"))?;
        }
        Ok(())
    }

    /// pivot_root into the rootfs and detach the old root.
    pub fn pivot(&self) -> Result<(), ChildError> {
        nix::unistd::chdir(&self.rootfs).map_err(sys_err("entering the rootfs"))?;
        nix::unistd::pivot_root(".", ".").map_err(sys_err("pivot_root"))?;
        // The old root is now stacked under the new one at "/"; keep its unmount from
        // propagating anywhere, then detach it.
        nix::mount::mount(
            None::<&str>,
            ".",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys_err("making the old root a slave"))?;
        nix::mount::umount2(".", MntFlags::MNT_DETACH)
            .map_err(sys_err("detaching the old root"))?;
        nix::unistd::chdir("/").map_err(sys_err("chdir /"))?;
        // Now "/" is the container's root: give it its propagation. Private and slave are
        // what its parent was made before the bind, so it has them already.
        if !self
            .propagation
            .intersects(MsFlags::MS_PRIVATE | MsFlags::MS_SLAVE)
        {
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                self.propagation,
                None::<&str>,
            )
            .map_err(sys_err(format!(
                "setting the propagation of the container's root to {:?} \
                 (linux.rootfsPropagation)",
                self.propagation
            )))?;
        }
        Ok(())
    }

    /// After pivot_root: masked paths, read-only paths, read-only root.
    pub fn finish(&self) -> Result<(), ChildError> {
        for p in &self.readonly_paths {
            if !p.exists() {
                continue;
            }
            nix::mount::mount(
                Some(p),
                p,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .and_then(|()| bind_remount(p, MsFlags::MS_RDONLY | MsFlags::MS_REC))
            .map_err(sys_err(format!("making {} read-only", p.display())))?;
        }
        for p in &self.masked_paths {
            let res = match std::fs::symlink_metadata(p) {
                Err(_) => continue,
                Ok(md) if md.is_dir() => nix::mount::mount(
                    Some("tmpfs"),
                    p,
                    Some("tmpfs"),
                    MsFlags::MS_RDONLY,
                    None::<&str>,
                ),
                Ok(_) => nix::mount::mount(
                    Some("/dev/null"),
                    p,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                ),
            };
            res.map_err(sys_err(format!("masking {}", p.display())))?;
        }
        if self.readonly {
            bind_remount(Path::new("/"), MsFlags::MS_RDONLY)
                .map_err(sys_err("remounting the root read-only"))?;
        }
        Ok(())
    }
}
