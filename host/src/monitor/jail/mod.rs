//! Confinement of the monitor, done by the monitor itself once it has set up what needs the
//! host's view (the share, the network, the container's terminal) and before the VMM's threads
//! exist (capabilities, no_new_privs and the root are per thread and inherited at creation):
//!
//! - **its cgroup** (see [`super::cgroup`]): `husk/<id>`, or the spec's `cgroupsPath` with its
//!   limits. Joined even with the jail off: limits the engine asked for are not debugging's
//!   to drop;
//! - **a minimal root**: a read-only tmpfs holding, at the paths the monitor uses for them,
//!   only the state directory (sockets, `state.json`, `network.json`, the share, with its bind
//!   mounts), the guest kernel and initramfs (read-only), `/dev/null` and a fresh `/proc` (the
//!   virtio-fs server reopens its O_PATH descriptors through `/proc/self/fd`, long socket
//!   paths go through it too). That `/proc` holds processes' directories only (`subset=pid`):
//!   no `/proc/sys`, whose files are writable by any euid 0 without a capability (a root
//!   monitor could rewrite `kernel.core_pattern`, a program the kernel runs as root at the
//!   next crash), no `/proc/sysrq-trigger`, `/proc/kcore`, ...; and of other processes only
//!   those it could ptrace (`hidepid=invisible`), which are none. The monitor pivots into it
//!   and detaches the host's root.
//!   `/dev/kvm` and the taps were opened before, so neither it nor `/dev/net/tun` is there; the
//!   log, the container's stdio and the `HUSK_PHASES` file are descriptors already;
//! - **a network namespace of its own**, new and empty, unless it is in one it made for the
//!   container (which `/proc/<pid>/ns/net` names to the engine and hooks): in the host's, any
//!   process may connect to the abstract Unix sockets of the host's services (they have no
//!   owner and no mode; containerd's shims used such sockets). The taps and the rtnetlink
//!   socket it took in the container's namespace keep working there, and the vsock device's
//!   sockets are files;
//! - **pinned records**: the monitor writes to its state directory after this (`state.json`,
//!   its vsock sockets), but the files there that husk commands act on as root (see
//!   `crate::oci::state` on what husk trusts) are bind-mounted read-only onto themselves first
//!   ([`PINNED`]; missing ones are created empty, so that none can be added later): the
//!   monitor can neither write them nor unlink or rename over them (EBUSY: they are mount
//!   points in its mount namespace). On the host they stay plain files;
//! - **capabilities**: only what the virtio-fs server needs to act as the guest's root on the
//!   share: CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, and CAP_SETUID/CAP_SETGID for the
//!   per-request credential switch it makes (the fs device's tests fail without any one of
//!   these); CAP_FSETID, CAP_MKNOD and CAP_SETFCAP for what a container's root may do that
//!   those tests do not (keep set-id bits on write, make device nodes, set file capabilities,
//!   as `apt` does for `ping`). Not CAP_DAC_READ_SEARCH: CAP_DAC_OVERRIDE covers reads and
//!   searches, and the server does not use file handles. Plus CAP_NET_ADMIN when the container has a network (the monitor undoes its network
//!   changes at exit, over its rtnetlink socket). Everything else is dropped from the
//!   effective, permitted and inheritable sets; the bounding and ambient sets are emptied;
//!   no_new_privs is set (the monitor never executes anything);
//! - **rlimits**: RLIMIT_NOFILE bounded (the file server holds a descriptor per inode the guest
//!   knows; the bound keeps a guest from eating the host's file table). RLIMIT_CORE is already 0
//!   (see `super::setup::no_core_dumps`). RLIMIT_NPROC is not set: the kernel does not apply
//!   it to uid 0.
//!
//! **An unprivileged uid** (the default: a range of its own, see [`super::uids`]; or
//! `--monitor-uid BASE`; see [`super::userns`]): the share is served
//! as the guest's root (files created with the guest's uids, chowned, whatever the container's
//! root does), so the monitor needs CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER and CAP_SETUID;
//! under a plain other uid that would confine nothing (CAP_SETUID makes it root again). So the
//! monitor becomes root of a user namespace mapped to BASE..BASE+65535, with the share
//! idmapped through it: its capabilities then hold only there. Without CAP_NET_ADMIN and
//! CAP_MKNOD, which would mean nothing there. The root monitor (`--monitor-uid root`, weaker:
//! its euid 0 still owns what root owns within its jail) is confined by the rest of the list
//! above.
//!
//! Besides the jail, every thread of the monitor filters itself with seccomp (see
//! `super::threads`), and `husk create` starts the monitor as the first process of a pid
//! namespace of its own (`crate::cli`'s `spawn_monitor`).
//!
//! `HUSK_JAIL=off` in the environment of `husk create` skips all of this (debugging: a
//! monitor that can see the host, e.g. to `strace` or inspect it); the monitor logs that it is
//! not confined.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::Mode;

use super::cgroup::{self, CgroupError, Placement};
use super::overlay::{self, OverlayError};
use super::userns::{IdMap, UserNs, UserNsError};
use crate::oci::{hooks, pod, sockets, state};

/// Why the monitor could not be confined. Every step is refused rather than skipped: a
/// monitor that is not confined as asked does not start the VM.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// `/proc/self/task` could not be listed to count the threads.
    #[error("listing /proc/self/task")]
    Tasks(#[source] std::io::Error),
    /// The monitor already runs other threads, which would keep the host's root and
    /// capabilities.
    #[error("confining the monitor: it has {0} threads, it must have one (a bug in husk)")]
    Threads(usize),
    /// The monitor's cgroup.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// An overlay rootfs under `--monitor-uid`.
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    /// The user namespace of `--monitor-uid`.
    #[error(transparent)]
    UserNs(#[from] UserNsError),
    /// The state directory could not be listed to give it to the monitor's uid.
    #[error("listing {path}")]
    ListStateDir {
        /// The state directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file of the state directory could not be given to the monitor's uid.
    #[error("giving {path} to uid {uid}")]
    Give {
        /// The file.
        path: PathBuf,
        /// The monitor's uid.
        uid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file the new root holds could not be found or made.
    #[error("confining the monitor: {what}")]
    File {
        /// What was being done, to which path.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A mount, `pivot_root`, a change of directory or of a limit failed.
    #[error("confining the monitor: {what}")]
    Sys {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// A capability set could not be changed.
    #[error("confining the monitor: {what}")]
    Capabilities {
        /// Which set, how.
        what: &'static str,
        /// Why.
        #[source]
        source: caps::errors::CapsError,
    },
}

/// A [`JailError::Sys`] for `what`.
fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

/// A [`JailError::File`] for `what`.
fn file(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::File { what, source }
}

/// The files of the state directory pinned read-only (see the module docs): the container's
/// fixed facts, the lock, the hooks `start` and `delete` run, the records of the network,
/// cgroups and overlay work directories `delete` undoes, the control socket the commands
/// connect to (bound before), and the pod records (`crate::oci::pod`): the network namespace
/// that later containers of the pod are matched by, and the membership a VM owner has not
/// (pinned empty, so that a monitor cannot make its own container look like a pod's
/// member and have `delete` act on another VM).
pub const PINNED: &[&str] = &[
    state::FIXED_FILE,
    state::LOCK_FILE,
    hooks::HOOKS_FILE,
    super::network::RECORD_FILE,
    cgroup::RECORD_FILE,
    overlay::RECORD_FILE,
    super::uids::RECORD_FILE,
    sockets::MONITOR_SOCKET,
    pod::NETNS_FILE,
    pod::POD_FILE,
];

/// The environment variable that turns the jail off (`HUSK_JAIL=off`).
pub const ENV: &str = "HUSK_JAIL";

/// The bound on open descriptors (see the module docs): well above what a container's file
/// tree needs at once, far below the kernel's default `nr_open` (1 Mi).
const MAX_FILES: u64 = 262_144;

/// The jail's `/proc` (see the module docs): the processes' own directories, none of the
/// kernel's files, and no process the monitor may not ptrace.
const PROC_OPTIONS: &str = "subset=pid,hidepid=invisible";

/// What the monitor keeps after setup.
#[derive(Debug)]
pub struct Jail<'a> {
    /// The container id (names its overlays' work directories).
    pub id: &'a str,
    /// Its cgroup.
    pub cgroup: &'a Placement,
    /// The container's state directory.
    pub state_dir: &'a Path,
    /// Files it still reads (the guest kernel and initramfs).
    pub read_only: Vec<&'a Path>,
    /// Whether it has a network to undo at exit.
    pub network: bool,
    /// Whether to leave the network namespace it is in (the host's, or the engine's it only
    /// works in from a helper thread) for a new, empty one: all but a namespace it made for the
    /// container, which `/proc/<pid>/ns/net` must keep naming.
    pub leave_network_namespace: bool,
    /// `--monitor-uid`: the user namespace to run in, and the share to idmap through it.
    pub user: Option<(IdMap, &'a Path)>,
}

/// Whether the jail is on (it is unless `HUSK_JAIL=off`).
pub fn enabled() -> bool {
    std::env::var_os(ENV).is_none_or(|v| v != "off")
}

/// Confines the calling process (see the module docs), one concern after the other: its
/// cgroup, then (`--monitor-uid`) its user namespace with the share idmapped through it, then
/// the records pinned, the new root, and last the limits and capabilities. Must be called
/// while the process has one thread.
pub fn enter(jail: &Jail<'_>) -> Result<(), JailError> {
    cgroup::join(jail.cgroup, jail.state_dir)?;
    if !enabled() {
        eprintln!("husk monitor: {ENV}=off: the monitor is not confined");
        return Ok(());
    }
    only_thread()?;
    // What the VMM learns from the host's /sys, which the jail does not have.
    crate::vmm::host::HostProfile::detect();
    let user_ns = match jail.user {
        Some((map, share)) => Some(user_namespace(jail, map, share)?),
        None => None,
    };
    // After every record is written (the cgroups', the overlays').
    pin(jail.state_dir)?;
    // The new root is built as host root: the paths to what it holds may pass through
    // directories the namespace's root could not search (containerd's state root is 0700).
    let entries = entries(jail)?;
    pivot_into_new_root(&entries)?;
    drop(entries);
    if let Some(ns) = user_ns {
        ns.enter()?;
    }
    if jail.leave_network_namespace {
        // Its taps and rtnetlink socket stay bound to the namespace they were made in.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(sys("leaving the host's network namespace for a new one"))?;
    }
    limit_resources()?;
    drop_capabilities(&kept_capabilities(jail.network, jail.user.is_some()))
}

/// Capabilities and the root are per thread: a thread that existed before would keep the
/// host's.
fn only_thread() -> Result<(), JailError> {
    let tasks = std::fs::read_dir("/proc/self/task")
        .map_err(JailError::Tasks)?
        .count();
    if tasks == 1 {
        Ok(())
    } else {
        Err(JailError::Threads(tasks))
    }
}

/// `--monitor-uid`: the user namespace of `map`, with the share idmapped through it (and an
/// overlay rootfs mounted anew on idmapped layers, see [`overlay`]), and the state directory
/// given to the namespace's root. The namespace is entered later, after the new root.
fn user_namespace(jail: &Jail<'_>, map: IdMap, share: &Path) -> Result<UserNs, JailError> {
    let overlays = overlay::find(share, jail.state_dir, jail.id)?;
    let ns = UserNs::create(map)?;
    // An overlay cannot be idmapped: off the share, then anew on idmapped layers.
    overlay::take_off(&overlays)?;
    ns.idmap(share, true)?;
    for o in &overlays {
        o.mount_idmapped(&ns, map, jail.id)?;
    }
    give_state_dir(jail.state_dir, share, map.base())?;
    Ok(ns)
}

/// Gives the state directory, and what is in it but the pinned records and the share, to the
/// monitor's uid: it writes its state there, and its vsock device connects to the sockets
/// bound there (which needs write permission on them).
fn give_state_dir(state_dir: &Path, share: &Path, base: u32) -> Result<(), JailError> {
    let give = |path: &Path| {
        std::os::unix::fs::lchown(path, Some(base), Some(base)).map_err(|source| JailError::Give {
            path: path.to_owned(),
            uid: base,
            source,
        })
    };
    let list = |source| JailError::ListStateDir {
        path: state_dir.to_owned(),
        source,
    };
    give(state_dir)?;
    let entries = std::fs::read_dir(state_dir).map_err(list)?;
    for entry in entries {
        let entry = entry.map_err(list)?;
        let name = entry.file_name();
        if entry.path() == share || PINNED.iter().any(|p| name == *p) {
            continue;
        }
        give(&entry.path())?;
    }
    Ok(())
}

/// Bind-mounts each of [`PINNED`] read-only onto itself, creating it empty if missing.
fn pin(state_dir: &Path) -> Result<(), JailError> {
    for name in PINNED {
        let path = state_dir.join(name);
        let err = |what: &str| sys(format!("{what} {}", path.display()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(file(format!("creating {}", path.display()))(e)),
        }
        mount(
            Some(&path),
            &path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err("pinning"))?;
        remount_read_only(&path).map_err(err("making read-only"))?;
    }
    Ok(())
}

/// One thing the new root holds, opened before the old root goes out of reach.
#[derive(Debug)]
struct Entry {
    /// Where it is, on the host and in the jail.
    path: PathBuf,
    /// An O_PATH descriptor for it (bind-mounted from `/proc/self/fd/N`).
    fd: OwnedFd,
    dir: bool,
    /// With the mounts below it (the share's bind mounts below the state directory).
    recursive: bool,
    read_only: bool,
}

fn entries(jail: &Jail<'_>) -> Result<Vec<Entry>, JailError> {
    let mut wanted: Vec<(PathBuf, bool, bool)> = vec![(jail.state_dir.to_path_buf(), true, false)];
    wanted.extend(
        jail.read_only
            .iter()
            .map(|p| (p.to_path_buf(), false, true)),
    );
    wanted.push(("/dev/null".into(), false, false));
    wanted
        .into_iter()
        .map(|(path, recursive, read_only)| {
            let path = std::path::absolute(&path).map_err(file(path.display().to_string()))?;
            let fd = nix::fcntl::open(&path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(sys(format!("opening {}", path.display())))?;
            let dir = std::fs::metadata(&path)
                .map_err(file(path.display().to_string()))?
                .is_dir();
            Ok(Entry {
                path,
                fd,
                dir,
                recursive,
                read_only,
            })
        })
        .collect()
}

/// Builds the new root, with `entries` and a new /proc, and pivots into it.
fn pivot_into_new_root(entries: &[Entry]) -> Result<(), JailError> {
    // Relative paths (a relative --root or HUSK_IMAGE_DIR) keep working if the
    // working directory is the same one in the jail (its path is there when it is an ancestor
    // of what was bound).
    let cwd = std::env::current_dir().ok();
    let old_root = nix::fcntl::open(
        "/",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys("opening /"))?;
    // The new root is assembled on /dev, mounted over in this (private) mount namespace: a
    // directory every host has, and nothing else of the host changes. Every source is already
    // open, so hiding the host's /dev does not matter.
    let new_root = Path::new("/dev");
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k,nr_inodes=256"),
    )
    .map_err(sys("mounting the new root's tmpfs"))?;
    for e in entries {
        let target = new_root.join(e.path.strip_prefix("/").unwrap_or(&e.path));
        let parent = target.parent().unwrap_or(new_root);
        std::fs::create_dir_all(parent).map_err(file(format!("creating {}", parent.display())))?;
        if e.dir {
            std::fs::create_dir(&target)
        } else {
            std::fs::write(&target, b"")
        }
        .map_err(file(format!("creating {}", target.display())))?;
        let source = PathBuf::from(format!("/proc/self/fd/{}", e.fd.as_raw_fd()));
        let mut flags = MsFlags::MS_BIND;
        if e.recursive {
            flags |= MsFlags::MS_REC;
        }
        mount(Some(&source), &target, None::<&str>, flags, None::<&str>)
            .map_err(sys(format!("bind-mounting {}", e.path.display())))?;
        if e.read_only {
            remount_read_only(&target)
                .map_err(sys(format!("making {} read-only", e.path.display())))?;
        }
    }
    let proc = new_root.join("proc");
    std::fs::create_dir(&proc).map_err(file("creating /proc"))?;
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(PROC_OPTIONS),
    )
    .map_err(sys(format!(
        "mounting /proc ({PROC_OPTIONS}, Linux 5.8 or later)"
    )))?;

    // As runc does: pivot_root(".", ".") stacks the old root on the new one, and detaching
    // "." (the old root, from old_root's point of view) leaves the new one.
    nix::unistd::chdir(new_root).map_err(sys("entering the new root"))?;
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root"))?;
    nix::unistd::fchdir(&old_root).map_err(sys("entering the old root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the host's root"))?;
    if cwd.is_none_or(|d| nix::unistd::chdir(&d).is_err()) {
        nix::unistd::chdir("/").map_err(sys("entering /"))?;
    }
    // The tmpfs itself read-only: the monitor writes only below the state directory.
    remount_read_only(Path::new("/")).map_err(sys("making the new root read-only"))
}

/// Makes the mount at `target` read-only, without set-id, devices or execution.
fn remount_read_only(target: &Path) -> nix::Result<()> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
}

fn limit_resources() -> Result<(), JailError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(sys("reading RLIMIT_NOFILE"))?;
    let limit = hard.min(MAX_FILES);
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit)
        .map_err(sys(format!("setting RLIMIT_NOFILE to {limit}")))
}

/// The capabilities the monitor keeps (see the module docs for why each); `in_userns`: those
/// of a user namespace (`--monitor-uid`).
fn kept_capabilities(network: bool, in_userns: bool) -> CapsHashSet {
    let mut keep: CapsHashSet = [
        Capability::CAP_CHOWN,
        Capability::CAP_DAC_OVERRIDE,
        Capability::CAP_FOWNER,
        Capability::CAP_FSETID,
        Capability::CAP_MKNOD,
        Capability::CAP_SETFCAP,
        Capability::CAP_SETUID,
        Capability::CAP_SETGID,
    ]
    .into_iter()
    .collect();
    if in_userns {
        // mknod is refused in a user namespace, and the network is the host's.
        keep.remove(&Capability::CAP_MKNOD);
    } else if network {
        keep.insert(Capability::CAP_NET_ADMIN);
    }
    keep
}

fn drop_capabilities(keep: &CapsHashSet) -> Result<(), JailError> {
    let err = |what| move |source| JailError::Capabilities { what, source };
    caps::clear(None, CapSet::Ambient).map_err(err("clearing the ambient capabilities"))?;
    // Needs CAP_SETPCAP, which goes with the effective set below.
    caps::clear(None, CapSet::Bounding).map_err(err("clearing the bounding set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(err("clearing the inheritable set"))?;
    // Effective first: it must stay a subset of the permitted set.
    caps::set(None, CapSet::Effective, keep).map_err(err("setting the effective set"))?;
    caps::set(None, CapSet::Permitted, keep).map_err(err("setting the permitted set"))?;
    nix::sys::prctl::set_no_new_privs().map_err(sys("setting no_new_privs"))
}

#[cfg(test)]
mod tests;
