//! The device nodes of a container's `/dev` (runc's default set and `linux.devices`) and
//! the links every `/dev` has (`fd`, `stdin`, `ptmx`, ...), made when the spec does not bind
//! a /dev of its own. Where mknod is refused (in a user namespace, or on the share, whose host
//! side makes no device nodes), the guest's node is bound instead, as runc does.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use husk_proto::ErrorCode;
use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sys::stat::{Mode, SFlag};

use super::resolve::{Create, proc_fd_path, resolve_in_root};
use crate::container::sync::{ChildError, sys_err};

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

pub(super) fn make_device(
    root: &OwnedFd,
    d: &DevicePlan,
    in_userns: bool,
) -> Result<(), ChildError> {
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
        return bind_guest_node(root, d).map_err(sys_err(what()));
    }
    let dev = nix::sys::stat::makedev(d.major, d.minor);
    match nix::sys::stat::mknodat(
        dir.as_fd(),
        name,
        d.kind,
        Mode::from_bits_truncate(d.mode),
        dev,
    ) {
        Ok(()) => {}
        // A /dev on the share (the spec mounts no tmpfs there): the host side may not make
        // device nodes (the monitor has no CAP_MKNOD), so bind the guest's node, as runc
        // does when mknod is refused.
        Err(Errno::EPERM) => return bind_guest_node(root, d).map_err(sys_err(what())),
        Err(e) => return Err(sys_err(what())(e)),
    }
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

/// Binds the guest's own node at `d.path` onto an empty file made in the container's root.
fn bind_guest_node(root: &OwnedFd, d: &DevicePlan) -> Result<(), Errno> {
    let node = resolve_in_root(root, &d.path, Create::File)?;
    nix::mount::mount(
        Some(&d.path),
        &proc_fd_path(&node),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
}

pub(super) fn dev_symlinks(root: &OwnedFd) -> Result<(), ChildError> {
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
