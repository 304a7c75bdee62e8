//! The container's filesystem view: the root, the spec's mounts in order, device nodes,
//! pivot_root, masked and read-only paths — built the way runc builds them.
//!
//! Every mount destination is resolved *inside* the rootfs with `openat2(RESOLVE_IN_ROOT)`
//! and the mount is made on the resulting `/proc/self/fd/N`, so a symlink in the image can
//! never redirect a mount outside the container's root (the runc CVE-2021-30465 class).

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag};

use super::sync::ChildError;
use husk_proto::ErrorCode;

/// Parsed OCI mount options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Flags to set.
    pub flags: MsFlags,
    /// Propagation changes, applied after the mount in order.
    pub propagation: Vec<MsFlags>,
    /// Filesystem-specific options (`mode=755`, `size=64k`, ...), comma-joined for mount(2).
    pub data: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            flags: MsFlags::empty(),
            propagation: Vec::new(),
            data: String::new(),
        }
    }
}

impl MountOptions {
    /// Whether these options make a bind mount.
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }
}

/// Parses OCI mount options (runc's table). Unknown words are filesystem data.
pub fn parse_options(options: &[String]) -> MountOptions {
    let mut out = MountOptions::default();
    let mut data = Vec::new();
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" | "rro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" | "rrw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" | "rnosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" | "rsuid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" | "rnodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" | "rdev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" | "rnoexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" | "rexec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" | "ratime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" | "rnoatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" | "rdiratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" | "rnodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" | "rrelatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" | "rnorelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" | "rstrictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" | "rnostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                out.propagation
                    .push(propagation_flags(opt).unwrap_or(MsFlags::MS_PRIVATE));
                continue;
            }
            // Handled by engines or meaningless in a VM: SELinux relabel requests, copy-up of
            // the image's content into a tmpfs (podman), and the cross-VM id-mapping requests.
            "z" | "Z" | "tmpcopyup" | "notmpcopyup" | "copy" | "nocopy" | "U" => continue,
            other => {
                data.push(other);
                continue;
            }
        };
        out.flags.insert(set);
        out.flags.remove(clear);
    }
    out.data = data.join(",");
    out
}

/// The mount(2) flags of a propagation word (`rslave`, `private`, ...).
pub fn propagation_flags(word: &str) -> Option<MsFlags> {
    let (rec, base) = match word.strip_prefix('r') {
        Some(b) if b != "o" && b != "w" => (MsFlags::MS_REC, b),
        _ => (MsFlags::empty(), word),
    };
    let flag = match base {
        "private" => MsFlags::MS_PRIVATE,
        "shared" => MsFlags::MS_SHARED,
        "slave" => MsFlags::MS_SLAVE,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        _ => return None,
    };
    Some(flag | rec)
}

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

/// A device node to create in the container's /dev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    /// Absolute path in the container.
    pub path: PathBuf,
    /// Character, block or fifo.
    pub kind: SFlag,
    /// Major number.
    pub major: u64,
    /// Minor number.
    pub minor: u64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

impl DevicePlan {
    fn char(path: &str, major: u64, minor: u64) -> Self {
        Self {
            path: path.into(),
            kind: SFlag::S_IFCHR,
            major,
            minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        }
    }

    /// The devices every container gets (runc's default set).
    pub fn defaults() -> Vec<Self> {
        vec![
            Self::char("/dev/null", 1, 3),
            Self::char("/dev/zero", 1, 5),
            Self::char("/dev/full", 1, 7),
            Self::char("/dev/tty", 5, 0),
            Self::char("/dev/urandom", 1, 9),
            Self::char("/dev/random", 1, 8),
        ]
    }
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

fn sys_err(what: impl std::fmt::Display) -> impl FnOnce(Errno) -> ChildError {
    move |e| ChildError::sys(what, e)
}

fn proc_fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// What to create when a path does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Nothing: a missing path is an error.
    Nothing,
    /// Directories all the way.
    Dir,
    /// Directories, then an empty file as the last component.
    File,
}

fn open_in_root(root: &OwnedFd, rel: &Path) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    nix::fcntl::openat2(root.as_fd(), rel, how)
}

/// Resolves `path` (absolute or relative, taken as relative to the root) inside `root`,
/// following symlinks as if `root` were `/`, creating what is missing as `create` says.
/// Returns an `O_PATH` descriptor of the result.
pub fn resolve_in_root(root: &OwnedFd, path: &Path, create: Create) -> nix::Result<OwnedFd> {
    let comps: Vec<&OsStr> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            Component::ParentDir => Some(OsStr::new("..")),
            _ => None,
        })
        .collect();
    let full: PathBuf = comps.iter().collect();
    match open_in_root(root, &full) {
        Err(Errno::ENOENT) if create != Create::Nothing => {}
        other => return other,
    }
    let mut prefix = PathBuf::new();
    for (i, comp) in comps.iter().enumerate() {
        let next = prefix.join(comp);
        match open_in_root(root, &next) {
            Ok(_) => {}
            Err(Errno::ENOENT) => {
                let parent = open_in_root(root, &prefix)?;
                let last = i + 1 == comps.len();
                let made = if last && create == Create::File {
                    nix::sys::stat::mknodat(
                        parent.as_fd(),
                        *comp,
                        SFlag::S_IFREG,
                        Mode::from_bits_truncate(0o644),
                        0,
                    )
                } else {
                    nix::sys::stat::mkdirat(parent.as_fd(), *comp, Mode::from_bits_truncate(0o755))
                };
                match made {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
        prefix = next;
    }
    open_in_root(root, &full)
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

fn make_device(root: &OwnedFd, d: &DevicePlan, in_userns: bool) -> Result<(), ChildError> {
    let what = || format!("creating device {}", d.path.display());
    let parent = d.path.parent().unwrap_or(Path::new("/"));
    let name = d.path.file_name().ok_or_else(|| ChildError {
        code: ErrorCode::InvalidSpec,
        message: format!("device path {} has no file name", d.path.display()),
    })?;
    let dir = resolve_in_root(root, parent, Create::Dir).map_err(sys_err(what()))?;
    // Replace whatever the image has there.
    let _ = nix::unistd::unlinkat(dir.as_fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir);
    if in_userns {
        // mknod is not allowed in a user namespace: bind the guest's node instead.
        let node = resolve_in_root(root, &d.path, Create::File).map_err(sys_err(what()))?;
        return nix::mount::mount(
            Some(&d.path),
            &proc_fd_path(&node),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys_err(what()));
    }
    let dev = nix::sys::stat::makedev(d.major, d.minor);
    nix::sys::stat::mknodat(
        dir.as_fd(),
        name,
        d.kind,
        Mode::from_bits_truncate(d.mode),
        dev,
    )
    .map_err(sys_err(what()))?;
    // mknod applies the umask; set the owner and mode exactly.
    nix::unistd::fchownat(
        dir.as_fd(),
        name,
        Some(nix::unistd::Uid::from_raw(d.uid)),
        Some(nix::unistd::Gid::from_raw(d.gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(sys_err(what()))?;
    // The node was just made by us and is not a link, so following is safe.
    nix::sys::stat::fchmodat(
        dir.as_fd(),
        name,
        Mode::from_bits_truncate(d.mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(sys_err(what()))
}

fn dev_symlinks(root: &OwnedFd) -> Result<(), ChildError> {
    let dev =
        resolve_in_root(root, Path::new("/dev"), Create::Dir).map_err(sys_err("opening /dev"))?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
        ("core", "/proc/kcore"),
    ] {
        match nix::unistd::symlinkat(target, dev.as_fd(), name) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(ChildError::sys(format!("creating /dev/{name}"), e)),
        }
    }
    Ok(())
}

/// Whether a path is relative and free of `..` (for paths inside a share).
pub fn is_clean_relative(p: &str) -> bool {
    let path = Path::new(p);
    !path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && !p.as_bytes().contains(&0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(words: &[&str]) -> MountOptions {
        parse_options(&words.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let o = opts(&[
            "nosuid",
            "noexec",
            "mode=755",
            "size=65536k",
            "rprivate",
            "ro",
        ]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY
        );
        assert_eq!(o.data, "mode=755,size=65536k");
        assert_eq!(o.propagation, vec![MsFlags::MS_PRIVATE | MsFlags::MS_REC]);
        let o = opts(&["rbind", "rw", "ro", "rw"]);
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(o.is_bind());
        assert!(opts(&["ro", "rro"]).flags.contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn propagation_words() {
        assert_eq!(
            propagation_flags("rslave"),
            Some(MsFlags::MS_SLAVE | MsFlags::MS_REC)
        );
        assert_eq!(propagation_flags("shared"), Some(MsFlags::MS_SHARED));
        assert_eq!(propagation_flags("ro"), None);
        assert_eq!(propagation_flags("bogus"), None);
    }

    #[test]
    fn clean_relative_paths() {
        assert!(is_clean_relative("rootfs"));
        assert!(is_clean_relative("mounts/3"));
        assert!(!is_clean_relative("/etc"));
        assert!(!is_clean_relative("a/../../etc"));
        assert!(!is_clean_relative(".."));
    }

    #[test]
    fn resolution_stays_inside_the_root_whatever_the_links_say() {
        let dir = tempfile::tempdir().unwrap();
        let root_path = dir.path().join("root");
        std::fs::create_dir_all(root_path.join("etc")).unwrap();
        std::fs::write(root_path.join("etc/shadow"), "inside").unwrap();
        // Hostile links: absolute, relative climbing out, and a chain.
        std::os::unix::fs::symlink("/etc", root_path.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", root_path.join("climb")).unwrap();
        std::os::unix::fs::symlink("climb", root_path.join("chain")).unwrap();
        let root = nix::fcntl::open(
            &root_path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        for p in [
            "abs/shadow",
            "climb/shadow",
            "chain/shadow",
            "../../etc/shadow",
            "/etc/shadow",
        ] {
            let fd = resolve_in_root(&root, Path::new(p), Create::Nothing).unwrap();
            let real = std::fs::read_link(proc_fd_path(&fd)).unwrap();
            assert_eq!(real, root_path.join("etc/shadow"), "{p}");
        }
        // Creating through a link creates inside the root.
        let fd = resolve_in_root(&root, Path::new("abs/new/dir"), Create::Dir).unwrap();
        let real = std::fs::read_link(proc_fd_path(&fd)).unwrap();
        assert_eq!(real, root_path.join("etc/new/dir"));
        let fd = resolve_in_root(&root, Path::new("climb/hosts"), Create::File).unwrap();
        let real = std::fs::read_link(proc_fd_path(&fd)).unwrap();
        assert_eq!(real, root_path.join("etc/hosts"));
        assert!(root_path.join("etc/hosts").is_file());
    }
}
