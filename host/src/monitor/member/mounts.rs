//! Mount trees moved between mount namespaces: a copy of a tree of the host's (`open_tree` with
//! `OPEN_TREE_CLONE`), detached from every namespace, made read-only or idmapped as a whole
//! (`mount_setattr`), then attached where it belongs in another namespace (`move_mount`): how a
//! pod's container's rootfs and bind mounts reach the share of the sandbox's monitor, whose
//! mount namespace sees nothing of the host's paths.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A detached mount tree.
#[derive(Debug)]
pub(super) struct Detached(OwnedFd);

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in the path"))
}

impl Detached {
    /// A copy of the mount at `path` (with every mount below it when `recursive`), detached.
    pub(super) fn clone_of(path: &Path, recursive: bool) -> std::io::Result<Detached> {
        let path = c_path(path)?;
        let recursive = if recursive { libc::AT_RECURSIVE } else { 0 };
        let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | recursive as u32;
        // SAFETY: open_tree(2) reads the NUL-terminated path and returns a new descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
        match RawFd::try_from(fd) {
            // SAFETY: open_tree returned this descriptor to us and nothing else owns it.
            Ok(fd) if fd >= 0 => Ok(Detached(unsafe { OwnedFd::from_raw_fd(fd) })),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    fn set(&self, attr: &libc::mount_attr) -> std::io::Result<()> {
        // SAFETY: mount_setattr(2) reads `attr`, whose size is passed, and the empty path that
        // AT_EMPTY_PATH makes name the detached tree itself.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                self.0.as_raw_fd(),
                c"".as_ptr(),
                (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as u32,
                std::ptr::from_ref(attr),
                std::mem::size_of::<libc::mount_attr>(),
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// A new mount of a filesystem of type `fstype` with `options` (each `key=value`, or a flag
    /// alone), attached nowhere yet, with `attrs` (`MOUNT_ATTR_*`): fsopen(2), fsconfig(2) and
    /// fsmount(2), with the caller's credentials (the filesystem may keep them, as overlayfs
    /// does for its copy-ups).
    pub(super) fn new_mount(
        fstype: &str,
        options: &[&str],
        attrs: u64,
    ) -> std::io::Result<Detached> {
        let c = |s: &str| {
            CString::new(s).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in a mount option")
            })
        };
        let check = |r: libc::c_long| {
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(r)
            }
        };
        let fstype = c(fstype)?;
        // SAFETY: fsopen(2) reads the NUL-terminated name and returns a new descriptor or -1.
        let fs = check(unsafe {
            libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), libc::FSOPEN_CLOEXEC)
        })?;
        // SAFETY: fsopen returned this descriptor to us and nothing else owns it.
        let fs = unsafe { OwnedFd::from_raw_fd(RawFd::try_from(fs).unwrap_or(-1)) };
        let config = |cmd: libc::c_uint, key: Option<&CString>, value: Option<&CString>| {
            // SAFETY: fsconfig(2) reads the NUL-terminated key and value (or takes NULL where
            // the command has none) and the auxiliary argument 0.
            check(unsafe {
                libc::syscall(
                    libc::SYS_fsconfig,
                    fs.as_raw_fd(),
                    cmd,
                    key.map_or(std::ptr::null(), |k| k.as_ptr()),
                    value.map_or(std::ptr::null(), |v| v.as_ptr()),
                    0,
                )
            })
            .map_err(|e| {
                let what = key
                    .map(|k| k.to_string_lossy().into_owned())
                    .unwrap_or_default();
                std::io::Error::new(e.kind(), format!("{what}: {e}"))
            })
        };
        for option in options {
            match option.split_once('=') {
                Some((key, value)) => {
                    config(libc::FSCONFIG_SET_STRING, Some(&c(key)?), Some(&c(value)?))?
                }
                None => config(libc::FSCONFIG_SET_FLAG, Some(&c(option)?), None)?,
            };
        }
        config(libc::FSCONFIG_CMD_CREATE, None, None)?;
        // SAFETY: fsmount(2) takes the configured context's descriptor and two flag words.
        let mnt = check(unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                fs.as_raw_fd(),
                libc::FSMOUNT_CLOEXEC,
                attrs,
            )
        })?;
        // SAFETY: fsmount returned this descriptor to us and nothing else owns it.
        Ok(Detached(unsafe {
            OwnedFd::from_raw_fd(RawFd::try_from(mnt).unwrap_or(-1))
        }))
    }

    /// Makes the whole tree read-only (every mount in it, not only the top one).
    pub(super) fn set_read_only(&self) -> std::io::Result<()> {
        self.set(&libc::mount_attr {
            attr_set: libc::MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        })
    }

    /// Idmaps the whole tree through the user namespace `userns` (EINVAL: a filesystem in it
    /// cannot be idmapped, an overlay among them).
    pub(super) fn idmap(&self, userns: &OwnedFd) -> std::io::Result<()> {
        self.set(&libc::mount_attr {
            attr_set: libc::MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: u64::try_from(userns.as_raw_fd()).unwrap_or(u64::MAX),
        })
    }

    /// Attaches the tree onto `target` (a descriptor of the mount point, opened in the calling
    /// thread's mount namespace: a path could be swapped for a symbolic link in between).
    pub(super) fn attach(&self, target: &OwnedFd) -> std::io::Result<()> {
        // SAFETY: move_mount(2) attaches the detached tree onto the target descriptor, both
        // named by empty paths (the two EMPTY_PATH flags); it reads nothing else.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                self.0.as_raw_fd(),
                c"".as_ptr(),
                target.as_raw_fd(),
                c"".as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// What the last component of a [`walk`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Last {
    /// A directory.
    Dir,
    /// A regular file (a bind mount's mount point for a file).
    File,
}

/// Opens `names` below the directory `base`, one component at a time and never through a
/// symbolic link (`O_NOFOLLOW` on each), creating what is missing when `create` (directories
/// 0755, a file 0644, owned by the caller). Returns an `O_PATH` descriptor of the last. This
/// is how husk reaches into a share, which its guest can change: a path resolved at once could
/// lead through a link the guest put there to anywhere the resolving process sees.
pub(super) fn walk(
    base: &OwnedFd,
    names: &[&str],
    last: Last,
    create: bool,
) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::Mode;
    let dir_flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut current: Option<OwnedFd> = None;
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() || *name == "." || *name == ".." || name.contains('/') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{name:?} is not a file name"),
            ));
        }
        let parent = current.as_ref().unwrap_or(base);
        let is_last = i + 1 == names.len();
        let next = if is_last && last == Last::File {
            if create {
                match openat(
                    parent,
                    *name,
                    OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_WRONLY
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o644),
                ) {
                    Ok(_) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            openat(
                parent,
                *name,
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?
        } else {
            if create {
                match nix::sys::stat::mkdirat(parent, *name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            openat(parent, *name, dir_flags | OFlag::O_RDONLY, Mode::empty())?
        };
        current = Some(next);
    }
    current.map_or_else(|| base.try_clone(), Ok)
}

/// Detaches (lazily) whatever is mounted on the entry `name` of the directory `parent` in the
/// calling thread's mount namespace, without following a symbolic link there. Changes the
/// working directory (to `parent`): for the helper of [`in_mount_namespace`].
pub(super) fn detach(parent: &OwnedFd, name: &str) -> std::io::Result<()> {
    nix::unistd::fchdir(parent)?;
    nix::mount::umount2(
        name,
        nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
    )
    .map_err(std::io::Error::from)
}

/// Runs `body` in a forked child that has entered the mount namespace `mnt_ns` (a process's
/// `/proc/<pid>/ns/mnt`, opened by the caller): the caller keeps its own view of the host.
/// Returns the child's error, if any. Must be called while the process has one thread.
pub(super) fn in_mount_namespace(
    mnt_ns: &OwnedFd,
    body: impl FnOnce() -> Result<(), String>,
) -> Result<(), String> {
    let (read, write) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the process has one thread (the caller's promise), so the child may run any
    // code; it ends with _exit and never returns into the caller's frames.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        nix::unistd::ForkResult::Child => {
            drop(read);
            let result = nix::sched::setns(mnt_ns, nix::sched::CloneFlags::CLONE_NEWNS)
                .map_err(|e| format!("entering the sandbox monitor's mount namespace: {e}"))
                .and_then(|()| body());
            let code = match result {
                Ok(()) => 0,
                Err(message) => {
                    let _ = nix::unistd::write(&write, message.as_bytes());
                    1
                }
            };
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(write);
            let mut message = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::fs::File::from(read), &mut message);
            let status = nix::sys::wait::waitpid(child, None).map_err(|e| format!("wait: {e}"))?;
            match status {
                nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
                _ if !message.is_empty() => Err(String::from_utf8_lossy(&message).into_owned()),
                other => Err(format!("the helper ended with {other:?}")),
            }
        }
    }
}
