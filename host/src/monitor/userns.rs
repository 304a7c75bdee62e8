//! The monitor as an unprivileged host uid (the default, a range allocated per container by
//! [`super::uids`]; or `husk --monitor-uid BASE`, `HUSK_MONITOR_UID`): what Firecracker's
//! jailer does with `--uid`/`--gid`, for a monitor that also serves the container's files as the
//! guest's root.
//!
//! The monitor enters a user namespace in which uids and gids 0-65535 are the host's
//! BASE..BASE+65535 (a subordinate range, as podman's `--userns=auto` uses), and becomes its
//! root: host uid and gid BASE, no supplementary groups. The capabilities the jail keeps then
//! hold only in that namespace: over files whose owner and group are in the range, and over
//! nothing else of the host (not root's files, not other processes, not the host's network).
//!
//! The container's files keep their owners on disk: the share (the rootfs and the bind mounts'
//! sources) is remounted idmapped through the same namespace (`mount_setattr(2)`,
//! `MOUNT_ATTR_IDMAP`), so a file that uid N owns on disk is BASE+N to the host, N to the
//! monitor and to the guest, and what the guest's uid N creates is owned by N on disk.
//!
//! What it needs, and what changes:
//! - the filesystems under the rootfs and the bind mounts, and the one under `--root`, must
//!   support idmapped mounts (ext4, xfs, btrfs, and tmpfs from Linux 6.3); otherwise `create`
//!   fails naming each mount under the share with its type. An overlay rootfs (what podman,
//!   Docker and containerd give) cannot be idmapped itself; it is mounted anew on idmapped
//!   views of its layers (see [`super::overlay`]), so it is the layers' filesystem that must;
//! - ids above 65535 on the share are seen as the overflow id (65534) and cannot be given;
//! - the guest cannot make device nodes on the share (mknod is refused in a user namespace);
//! - the container's state directory is owned by BASE, because the monitor writes its state
//!   and sockets there; what husk acts on as root stays root's and is pinned (`jail::PINNED`).
//!   The sockets `husk exec` binds there get the directory's owner, so the monitor can
//!   connect to them;
//! - `/dev/kvm` is opened before (as on most hosts, it is root's and the kvm group's);
//! - the monitor cannot undo its network changes itself (CAP_NET_ADMIN in its namespace is
//!   not CAP_NET_ADMIN over the container's network namespace): `husk delete` does, from the
//!   pinned `network.json`, as it does for a killed monitor;
//! - the jail's root is built and pivoted into as host root, and the namespace entered only
//!   then (its new mount namespace is a copy of the jail's, whose mounts it cannot change or
//!   unmount): the paths to the state directory may pass through directories only root may
//!   search (containerd's state root is 0700), and a fresh `/proc` needs privilege over the
//!   host's pid namespace;
//! - monitors started with the same BASE share a host uid: each is in a pid namespace of its
//!   own, so they cannot name, signal or ptrace one another, but they can write one another's
//!   files if a path to them is in both jails (none is). The default (see [`super::uids`])
//!   gives each monitor a range of its own, as Firecracker's jailer wants a uid per microVM.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// How many uids (and gids) the namespace maps.
pub const RANGE: u32 = 65_536;

/// The environment variable `--monitor-uid` falls back to.
pub const ENV: &str = "HUSK_MONITOR_UID";

/// Why a `--monitor-uid` is not one the monitor can run as.
#[derive(Debug, thiserror::Error)]
pub enum IdMapError {
    /// Not a number. (The parser's words are part of the message: clap shows only that.)
    #[error("{given:?}: not a uid: {error}")]
    NotAUid {
        /// What was given.
        given: String,
        /// Why.
        error: std::num::ParseIntError,
    },
    /// Root: the namespace would map to the host's root.
    #[error("0 is root: the monitor's uid must be another")]
    Root,
    /// The range would pass 2^32.
    #[error("{0}: the {RANGE} ids from it do not fit below 2^32")]
    TooHigh(u32),
}

/// Why the monitor's user namespace could not be made, used or entered.
#[derive(Debug, thiserror::Error)]
pub enum UserNsError {
    /// A step of making the namespace (the helper process, its pipes) failed.
    #[error("making the monitor's user namespace: {what}")]
    Make {
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The helper process did not report.
    #[error("making the monitor's user namespace")]
    Helper(#[source] nix::Error),
    /// The kernel refused the namespace.
    #[error(
        "making the monitor's user namespace: unshare(CLONE_NEWUSER) failed (are user \
         namespaces disabled, e.g. user.max_user_namespaces = 0?)"
    )]
    Unshare,
    /// The namespace's uid or gid map could not be written.
    #[error("writing {path} ({line})")]
    Map {
        /// The map file.
        path: String,
        /// The mapping.
        line: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The namespace could not be opened.
    #[error("opening {path}")]
    Open {
        /// Its `/proc` path.
        path: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// A path to idmap holds a NUL byte.
    #[error("{dir}: a NUL in the path")]
    Nul {
        /// The path.
        dir: PathBuf,
    },
    /// A step of the idmapped remount failed.
    #[error("idmapping {dir} for the monitor's uid: {what}")]
    Idmap {
        /// The directory.
        dir: PathBuf,
        /// The call (`open_tree`, `mount_setattr`, `move_mount`).
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A filesystem under the directory cannot be idmapped (`mount_setattr` said EINVAL).
    #[error(
        "idmapping {dir} for the monitor's uid: mount_setattr: {error} (a filesystem under it \
         does not support idmapped mounts; they are: {filesystems}; a monitor with a uid of \
         its own, the default, needs the rootfs and bind mounts, or an overlay rootfs's layers, \
         on e.g. ext4, xfs, btrfs or tmpfs; --monitor-uid root serves them as they are, a \
         weaker confinement)"
    )]
    NotIdmappable {
        /// The directory.
        dir: PathBuf,
        /// What the kernel said.
        error: std::io::Error,
        /// The mounts under it, with their types.
        filesystems: String,
    },
    /// A step of entering the namespace failed.
    #[error("entering the monitor's user namespace: {what}")]
    Enter {
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// The host uid and gid the monitor's namespace starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    base: u32,
}

impl IdMap {
    /// The range BASE..BASE+65535, for uids and gids alike.
    pub fn new(base: u32) -> Result<IdMap, IdMapError> {
        if base == 0 {
            return Err(IdMapError::Root);
        }
        if base.checked_add(RANGE).is_none() {
            return Err(IdMapError::TooHigh(base));
        }
        Ok(IdMap { base })
    }

    /// The host uid and gid of the namespace's root.
    pub fn base(self) -> u32 {
        self.base
    }
}

impl std::str::FromStr for IdMap {
    type Err = IdMapError;

    fn from_str(s: &str) -> Result<IdMap, IdMapError> {
        let base = s.parse::<u32>().map_err(|error| IdMapError::NotAUid {
            given: s.to_owned(),
            error,
        })?;
        IdMap::new(base)
    }
}

/// A user namespace with an [`IdMap`], held by a descriptor.
#[derive(Debug)]
pub struct UserNs {
    fd: OwnedFd,
}

impl UserNs {
    /// Makes the namespace: a helper process unshares it, this one (root on the host) writes
    /// its maps and keeps a descriptor of it; the helper then exits. Must be called while the
    /// process has one thread (fork).
    pub fn create(map: IdMap) -> Result<UserNs, UserNsError> {
        let err = |what| move |source| UserNsError::Make { what, source };
        let (ready_r, ready_w) = nix::unistd::pipe().map_err(err("pipe"))?;
        let (go_r, go_w) = nix::unistd::pipe().map_err(err("pipe"))?;
        // SAFETY: the monitor has one thread here (the jail checks it before calling), so the
        // child is a full copy; it only makes async-signal-safe calls (unshare, write, read,
        // _exit) on descriptors it owns.
        match unsafe { nix::unistd::fork() }.map_err(err("fork"))? {
            nix::unistd::ForkResult::Child => {
                // SAFETY: raw syscalls on the pipe descriptors this process holds; _exit ends it
                // without running the parent's exit handlers.
                unsafe {
                    // The parent's ends: `go` must see EOF when the parent closes its copy.
                    libc::close(go_w.as_raw_fd());
                    libc::close(ready_r.as_raw_fd());
                    // The report: whether the namespace was made, then this process's pid as
                    // the mounted /proc knows it (the monitor runs in a pid namespace of its
                    // own, where the pid fork returned is not the one /proc/<pid> names).
                    let mut report = [0u8; 24];
                    report[0] = u8::from(libc::unshare(libc::CLONE_NEWUSER) == 0);
                    let n = libc::readlink(
                        c"/proc/self".as_ptr(),
                        report[1..].as_mut_ptr().cast(),
                        report.len() - 1,
                    );
                    let len = 1 + usize::try_from(n).unwrap_or(0);
                    libc::write(ready_w.as_raw_fd(), report.as_ptr().cast(), len);
                    // Until the parent has the namespace (it closes its end of `go`).
                    let mut b = 0u8;
                    libc::read(go_r.as_raw_fd(), (&raw mut b).cast(), 1);
                    libc::_exit(0)
                }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop((ready_w, go_r));
                let made = Self::adopt(child, map, ready_r);
                drop(go_w);
                let _ = nix::sys::wait::waitpid(child, None);
                made
            }
        }
    }

    /// Writes the maps of the helper's namespace and opens it.
    fn adopt(child: nix::unistd::Pid, map: IdMap, ready: OwnedFd) -> Result<UserNs, UserNsError> {
        let mut report = [0u8; 24];
        let n = nix::unistd::read(&ready, &mut report).map_err(UserNsError::Helper)?;
        if n < 1 || report[0] != 1 {
            return Err(UserNsError::Unshare);
        }
        let pid = std::str::from_utf8(&report[1..n])
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .map_or(child.to_string(), |p| p.to_string());
        let proc = format!("/proc/{pid}");
        let line = format!("0 {} {RANGE}\n", map.base);
        for file in ["uid_map", "gid_map"] {
            std::fs::write(format!("{proc}/{file}"), &line).map_err(|source| UserNsError::Map {
                path: format!("{proc}/{file}"),
                line: line.trim().to_owned(),
                source,
            })?;
        }
        let fd = nix::fcntl::open(
            format!("{proc}/ns/user").as_str(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|source| UserNsError::Open {
            path: format!("{proc}/ns/user"),
            source,
        })?;
        Ok(UserNs { fd })
    }

    /// Remounts `dir` idmapped through this namespace, in place (in the calling process's
    /// mount namespace); `recursive`: with every mount below it, otherwise covering them.
    pub fn idmap(&self, dir: &Path, recursive: bool) -> Result<(), UserNsError> {
        let err = |what| {
            move |source| UserNsError::Idmap {
                dir: dir.to_owned(),
                what,
                source,
            }
        };
        let path = CString::new(dir.as_os_str().as_bytes()).map_err(|_| UserNsError::Nul {
            dir: dir.to_owned(),
        })?;
        let recursive = if recursive { libc::AT_RECURSIVE } else { 0 };
        let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | recursive as u32;
        // SAFETY: open_tree(2) reads the NUL-terminated path and returns a new descriptor or -1.
        let tree =
            unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
        let Ok(tree) = RawFd::try_from(tree) else {
            return Err(err("open_tree")(std::io::Error::last_os_error()));
        };
        if tree < 0 {
            return Err(err("open_tree")(std::io::Error::last_os_error()));
        }
        // SAFETY: open_tree returned this descriptor to us and nothing else owns it.
        let tree = unsafe { OwnedFd::from_raw_fd(tree) };
        let attr = libc::mount_attr {
            attr_set: libc::MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: u64::try_from(self.fd.as_raw_fd()).unwrap_or(u64::MAX),
        };
        // SAFETY: mount_setattr(2) reads `attr`, whose size is passed, and the empty path that
        // AT_EMPTY_PATH makes name the detached tree itself.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                c"".as_ptr(),
                (libc::AT_EMPTY_PATH | recursive) as u32,
                &raw const attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Err(UserNsError::NotIdmappable {
                    dir: dir.to_owned(),
                    error: e,
                    filesystems: filesystems_under(dir),
                });
            }
            return Err(err("mount_setattr")(e));
        }
        // SAFETY: move_mount(2) attaches the detached tree (named by the empty path) onto the
        // NUL-terminated target path.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if r < 0 {
            return Err(err("move_mount")(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Enters the namespace as its root (host uid and gid BASE, no supplementary groups) and
    /// a new mount namespace it owns (a copy of the current one, whose mounts it may not
    /// unmount to reveal what they cover). Must be called while the process has one thread.
    pub fn enter(self) -> Result<(), UserNsError> {
        let err = |what| move |source| UserNsError::Enter { what, source };
        nix::sched::setns(&self.fd, nix::sched::CloneFlags::CLONE_NEWUSER).map_err(err("setns"))?;
        // Root's supplementary groups (root's group among them) go first.
        nix::unistd::setgroups(&[]).map_err(err("setgroups"))?;
        let root_gid = nix::unistd::Gid::from_raw(0);
        nix::unistd::setresgid(root_gid, root_gid, root_gid).map_err(err("setresgid"))?;
        let root_uid = nix::unistd::Uid::from_raw(0);
        nix::unistd::setresuid(root_uid, root_uid, root_uid).map_err(err("setresuid"))?;
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
            .map_err(err("a mount namespace of its own"))?;
        Ok(())
    }
}

/// The mounts at and below `dir` in this mount namespace, as `type at path` (for errors).
fn filesystems_under(dir: &Path) -> String {
    let found: Vec<String> = super::mountinfo::under(dir)
        .unwrap_or_default()
        .iter()
        .map(|m| format!("{} at {}", m.kind, m.at.display()))
        .collect();
    if found.is_empty() {
        "none mounted there".into()
    } else {
        found.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_must_leave_room_for_the_range_and_not_be_root() {
        assert_eq!("100000".parse::<IdMap>().unwrap().base(), 100_000);
        assert!(
            "0".parse::<IdMap>()
                .unwrap_err()
                .to_string()
                .contains("root")
        );
        assert!(
            "-1".parse::<IdMap>()
                .unwrap_err()
                .to_string()
                .contains("not a uid")
        );
        let top = u32::MAX - RANGE + 1;
        assert!(
            top.to_string()
                .parse::<IdMap>()
                .unwrap_err()
                .to_string()
                .contains("2^32")
        );
        assert!((top - 1).to_string().parse::<IdMap>().is_ok());
    }
}
