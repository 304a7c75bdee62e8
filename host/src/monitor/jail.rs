//! Confinement of the monitor, done by the monitor itself once it has set up what needs the
//! host's view (the share, the network, the container's terminal) and before the VMM's threads
//! exist (capabilities, no_new_privs and the root are per thread and inherited at creation):
//!
//! - **its own cgroup** (see [`super::cgroup`]);
//! - **a minimal root**: a read-only tmpfs holding, at the paths the monitor uses for them,
//!   only the state directory (sockets, `state.json`, `network.json`, the share, with its bind
//!   mounts), the guest kernel and initramfs (read-only), `/dev/null` and a fresh `/proc` (the
//!   virtio-fs server reopens its O_PATH descriptors through `/proc/self/fd`, long socket
//!   paths go through it too). The monitor pivots into it and detaches the host's root.
//!   `/dev/kvm` and the taps were opened before, so neither it nor `/dev/net/tun` is there; the
//!   log, the container's stdio and the `HUSK_PHASES` file are descriptors already;
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
//!   (see `no_core_dumps`). RLIMIT_NPROC is not set: the kernel does not apply it to uid 0.
//!
//! **An unprivileged uid** (`--monitor-uid BASE`, see [`super::userns`]): the share is served
//! as the guest's root (files created with the guest's uids, chowned, whatever the container's
//! root does), so the monitor needs CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER and CAP_SETUID;
//! under a plain other uid that would confine nothing (CAP_SETUID makes it root again). So the
//! monitor becomes root of a user namespace mapped to BASE..BASE+65535, with the share
//! idmapped through it: its capabilities then hold only there. Without CAP_NET_ADMIN and
//! CAP_MKNOD, which would mean nothing there. The root monitor (the default) is confined by
//! the rest of the list above.
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

use super::userns::{IdMap, UserNs};
use super::{cgroup, overlay};
use crate::oci::{hooks, sockets, state};

/// The files of the state directory pinned read-only (see the module docs): the container's
/// fixed facts, the lock, the hooks `start` and `delete` run, the records of the network,
/// cgroups and overlay work directories `delete` undoes, and the control socket the commands
/// connect to (bound before).
pub const PINNED: &[&str] = &[
    state::FIXED_FILE,
    state::LOCK_FILE,
    hooks::HOOKS_FILE,
    super::network::RECORD_FILE,
    cgroup::RECORD_FILE,
    overlay::RECORD_FILE,
    sockets::MONITOR_SOCKET,
];

/// The environment variable that turns the jail off (`HUSK_JAIL=off`).
pub const ENV: &str = "HUSK_JAIL";

/// The bound on open descriptors (see the module docs): well above what a container's file
/// tree needs at once, far below the kernel's default `nr_open` (1 Mi).
const MAX_FILES: u64 = 262_144;

/// What the monitor keeps after setup.
#[derive(Debug)]
pub struct Jail<'a> {
    /// The container id (names its cgroup).
    pub id: &'a str,
    /// The container's state directory.
    pub state_dir: &'a Path,
    /// Files it still reads (the guest kernel and initramfs).
    pub read_only: Vec<&'a Path>,
    /// Whether it has a network to undo at exit.
    pub network: bool,
    /// `--monitor-uid`: the user namespace to run in, and the share to idmap through it.
    pub user: Option<(IdMap, &'a Path)>,
}

/// Whether the jail is on (it is unless `HUSK_JAIL=off`).
pub fn enabled() -> bool {
    std::env::var_os(ENV).is_none_or(|v| v != "off")
}

/// Confines the calling process (see the module docs). Must be called while it has one thread.
pub fn enter(jail: &Jail<'_>) -> Result<(), String> {
    if !enabled() {
        eprintln!("husk monitor: {ENV}=off: the monitor is not confined");
        return Ok(());
    }
    only_thread()?;
    // What the VMM learns from the host's /sys, which the jail does not have.
    crate::vmm::host::HostProfile::detect();
    cgroup::join(jail.id, jail.state_dir)?;
    // Recorded before the records are pinned.
    let overlays = match jail.user {
        Some((_, share)) => overlay::find(share, jail.state_dir, jail.id)?,
        None => Vec::new(),
    };
    pin(jail.state_dir)?;
    let user_ns = match jail.user {
        Some((map, share)) => {
            let ns = UserNs::create(map)?;
            // An overlay cannot be idmapped: off the share, then anew on idmapped layers.
            overlay::take_off(&overlays)?;
            ns.idmap(share, true)?;
            for o in &overlays {
                o.mount_idmapped(&ns, map, jail.id)?;
            }
            give_state_dir(jail.state_dir, share, map.base())?;
            Some(ns)
        }
        None => None,
    };
    // The new root is built as host root: the paths to what it holds may pass through
    // directories the namespace's root could not search (containerd's state root is 0700).
    let entries = entries(jail)?;
    pivot_into_new_root(&entries)?;
    drop(entries);
    if let Some(ns) = user_ns {
        ns.enter()?;
    }
    limit_resources()?;
    drop_capabilities(&kept_capabilities(jail.network, jail.user.is_some()))
}

/// Capabilities and the root are per thread: a thread that existed before would keep the
/// host's.
fn only_thread() -> Result<(), String> {
    let tasks = std::fs::read_dir("/proc/self/task")
        .map_err(|e| format!("listing /proc/self/task: {e}"))?
        .count();
    if tasks == 1 {
        Ok(())
    } else {
        Err(format!(
            "confining the monitor: it has {tasks} threads, it must have one (a bug in husk)"
        ))
    }
}

/// Gives the state directory, and what is in it but the pinned records and the share, to the
/// monitor's uid: it writes its state there, and its vsock device connects to the sockets
/// bound there (which needs write permission on them).
fn give_state_dir(state_dir: &Path, share: &Path, base: u32) -> Result<(), String> {
    let give = |path: &Path| {
        std::os::unix::fs::lchown(path, Some(base), Some(base))
            .map_err(|e| format!("giving {} to uid {base}: {e}", path.display()))
    };
    give(state_dir)?;
    let entries = std::fs::read_dir(state_dir)
        .map_err(|e| format!("listing {}: {e}", state_dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("listing {}: {e}", state_dir.display()))?;
        let name = entry.file_name();
        if entry.path() == share || PINNED.iter().any(|p| name == *p) {
            continue;
        }
        give(&entry.path())?;
    }
    Ok(())
}

/// Bind-mounts each of [`PINNED`] read-only onto itself, creating it empty if missing.
fn pin(state_dir: &Path) -> Result<(), String> {
    for name in PINNED {
        let path = state_dir.join(name);
        let err = |what: &str| {
            let what = format!("confining the monitor: {what} {}", path.display());
            move |e: nix::Error| format!("{what}: {e}")
        };
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(format!(
                    "confining the monitor: creating {}: {e}",
                    path.display()
                ));
            }
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

fn entries(jail: &Jail<'_>) -> Result<Vec<Entry>, String> {
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
            let path = std::path::absolute(&path)
                .map_err(|e| format!("confining the monitor: {}: {e}", path.display()))?;
            let fd = nix::fcntl::open(&path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|e| format!("confining the monitor: opening {}: {e}", path.display()))?;
            let dir = std::fs::metadata(&path)
                .map_err(|e| format!("confining the monitor: {}: {e}", path.display()))?
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
fn pivot_into_new_root(entries: &[Entry]) -> Result<(), String> {
    let err = |what: String| move |e: nix::Error| format!("confining the monitor: {what}: {e}");
    // Relative paths (a relative --root or HUSK_IMAGE_DIR) keep working if the
    // working directory is the same one in the jail (its path is there when it is an ancestor
    // of what was bound).
    let cwd = std::env::current_dir().ok();
    let old_root = nix::fcntl::open(
        "/",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(err("opening /".into()))?;
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
    .map_err(err("mounting the new root's tmpfs".into()))?;
    for e in entries {
        let target = new_root.join(e.path.strip_prefix("/").unwrap_or(&e.path));
        let parent = target.parent().unwrap_or(new_root);
        std::fs::create_dir_all(parent)
            .map_err(|x| format!("confining the monitor: creating {}: {x}", parent.display()))?;
        if e.dir {
            std::fs::create_dir(&target)
        } else {
            std::fs::write(&target, b"")
        }
        .map_err(|x| format!("confining the monitor: creating {}: {x}", target.display()))?;
        let source = PathBuf::from(format!("/proc/self/fd/{}", e.fd.as_raw_fd()));
        let mut flags = MsFlags::MS_BIND;
        if e.recursive {
            flags |= MsFlags::MS_REC;
        }
        mount(Some(&source), &target, None::<&str>, flags, None::<&str>)
            .map_err(err(format!("bind-mounting {}", e.path.display())))?;
        if e.read_only {
            remount_read_only(&target)
                .map_err(err(format!("making {} read-only", e.path.display())))?;
        }
    }
    let proc = new_root.join("proc");
    std::fs::create_dir(&proc)
        .map_err(|x| format!("confining the monitor: creating /proc: {x}"))?;
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(err("mounting /proc".into()))?;

    // As runc does: pivot_root(".", ".") stacks the old root on the new one, and detaching
    // "." (the old root, from old_root's point of view) leaves the new one.
    nix::unistd::chdir(new_root).map_err(err("entering the new root".into()))?;
    nix::unistd::pivot_root(".", ".").map_err(err("pivot_root".into()))?;
    nix::unistd::fchdir(&old_root).map_err(err("entering the old root".into()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(err("detaching the host's root".into()))?;
    if cwd.is_none_or(|d| nix::unistd::chdir(&d).is_err()) {
        nix::unistd::chdir("/").map_err(err("entering /".into()))?;
    }
    // The tmpfs itself read-only: the monitor writes only below the state directory.
    remount_read_only(Path::new("/")).map_err(err("making the new root read-only".into()))
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

fn limit_resources() -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| format!("confining the monitor: reading RLIMIT_NOFILE: {e}"))?;
    let limit = hard.min(MAX_FILES);
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit)
        .map_err(|e| format!("confining the monitor: setting RLIMIT_NOFILE to {limit}: {e}"))
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

fn drop_capabilities(keep: &CapsHashSet) -> Result<(), String> {
    let err = |what: &'static str| {
        move |e: caps::errors::CapsError| format!("confining the monitor: {what}: {e}")
    };
    caps::clear(None, CapSet::Ambient).map_err(err("clearing the ambient capabilities"))?;
    // Needs CAP_SETPCAP, which goes with the effective set below.
    caps::clear(None, CapSet::Bounding).map_err(err("clearing the bounding set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(err("clearing the inheritable set"))?;
    // Effective first: it must stay a subset of the permitted set.
    caps::set(None, CapSet::Effective, keep).map_err(err("setting the effective set"))?;
    caps::set(None, CapSet::Permitted, keep).map_err(err("setting the permitted set"))?;
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| format!("confining the monitor: setting no_new_privs: {e}"))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Set in the copy of the test binary that enters the jail: the scratch directory.
    const CHILD: &str = "HUSK_JAIL_TEST_CHILD";

    /// Set with [`CHILD`] for a jail with `--monitor-uid` (the base).
    const CHILD_UID: &str = "HUSK_JAIL_TEST_UID";

    /// Set with [`CHILD_UID`] when the share's rootfs is an overlay (the scratch's `merged`).
    const CHILD_OVERLAY: &str = "HUSK_JAIL_TEST_OVERLAY";

    /// The base the uid-mode test maps.
    const TEST_BASE: u32 = 200_000;

    /// What the child reports, one `key=value` line each.
    fn report(key: &str, value: impl std::fmt::Display) {
        println!("{key}={value}");
    }

    /// The child: a private mount namespace (as `share::prepare` makes), the jail, then what
    /// it can and cannot see and do.
    fn child(scratch: &Path, user: Option<IdMap>) {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        crate::mount_ns::enter().unwrap();
        let state = scratch.join("state");
        let share = state.join("share");
        let kernel = scratch.join("image/vmlinux");
        // As the monitor leaves them: some records written, the socket bound, others absent.
        std::fs::write(state.join(hooks::HOOKS_FILE), b"").unwrap();
        std::fs::write(state.join(state::FIXED_FILE), b"{}").unwrap();
        let _socket =
            std::os::unix::net::UnixListener::bind(state.join(sockets::MONITOR_SOCKET)).unwrap();
        let rootfs = share.join("rootfs");
        let overlay = std::env::var_os(CHILD_OVERLAY).is_some();
        if overlay {
            // The engine's overlay, bound as `share::prepare` binds a rootfs.
            std::fs::create_dir(&rootfs).unwrap();
            mount(
                Some(&scratch.join("layers/c/merged")),
                &rootfs,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .unwrap();
        }
        enter(&Jail {
            id: &unit_id(scratch),
            state_dir: &state,
            read_only: vec![&kernel],
            network: false,
            user: user.map(|m| (m, share.as_path())),
        })
        .unwrap();
        // Ends libtest's "test ... " line, which has no newline yet.
        println!();
        let mut top: Vec<String> = std::fs::read_dir("/")
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        top.sort();
        report("root", top.join(","));
        report("state_write", std::fs::write(state.join("w"), b"x").is_ok());
        // A file of an id outside the namespace's range, mode 0600: root may read it, the
        // namespace's root may not.
        report(
            "unmapped_read",
            std::fs::read(share.join("unmapped")).is_ok(),
        );
        report(
            "root_write",
            std::fs::write("/new", b"x")
                .map_err(|e| e.raw_os_error() == Some(libc::EROFS))
                .unwrap_err(),
        );
        report(
            "kernel_read",
            std::fs::read(&kernel).is_ok_and(|k| k == b"elf"),
        );
        report(
            "kernel_write",
            std::fs::OpenOptions::new()
                .write(true)
                .open(&kernel)
                .is_err(),
        );
        // The share: its root-owned file is the monitor's root's; what it creates and chowns
        // lands on disk with the ids it gave.
        report(
            "share_owner",
            std::fs::metadata(share.join("owned")).unwrap().uid(),
        );
        report(
            "share_create",
            std::fs::write(share.join("new"), b"x").is_ok(),
        );
        std::fs::write(share.join("given"), b"x").unwrap();
        report(
            "share_chown",
            std::os::unix::fs::chown(share.join("given"), Some(1000), Some(1000)).is_ok(),
        );
        // Each pinned record: no write, no unlink, no rename over it, no replacing.
        let decoy = state.join("decoy");
        std::fs::write(&decoy, b"{}").unwrap();
        let mut changed = Vec::new();
        for name in PINNED {
            let path = state.join(name);
            let write = std::fs::OpenOptions::new().append(true).open(&path);
            let remove = std::fs::remove_file(&path);
            let rename = std::fs::rename(&decoy, &path);
            if write.is_ok() || remove.is_ok() || rename.is_ok() || !path.exists() {
                changed.push(format!("{name}: {write:?} {remove:?} {rename:?}"));
            }
        }
        report("pinned_changed", changed.join(";"));
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        for field in ["CapEff", "CapBnd", "NoNewPrivs"] {
            let line = status.lines().find(|l| l.starts_with(field)).unwrap();
            report(field, line.split_whitespace().nth(1).unwrap());
        }
        if overlay {
            // Through the new overlay: the layers' files with their owners, a lower layer's
            // opaque directory honoured (a trusted xattr), a file of uid 1000 readable by the
            // namespace's root, and writes: a new file, a chown, a copy-up.
            let r = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_default();
            report("ovl_read", r("file"));
            report(
                "ovl_dir_owner",
                std::fs::metadata(rootfs.join("dir1000")).unwrap().uid(),
            );
            report("ovl_read_1000", r("dir1000/f"));
            report("ovl_opaque", !rootfs.join("opaque/hidden").exists());
            report(
                "ovl_create",
                std::fs::write(rootfs.join("made"), b"x").is_ok(),
            );
            std::fs::write(rootfs.join("made1000"), b"x").unwrap();
            report(
                "ovl_chown",
                std::os::unix::fs::chown(rootfs.join("made1000"), Some(1000), Some(1000)).is_ok(),
            );
            let appended = std::fs::OpenOptions::new()
                .append(true)
                .mode(0o644)
                .open(rootfs.join("file"))
                .and_then(|mut f| std::io::Write::write_all(&mut f, b"+guest"));
            report("ovl_copy_up", appended.is_ok());
        }
        let uid_map = std::fs::read_to_string("/proc/self/uid_map").unwrap();
        report(
            "uid_map",
            uid_map.split_whitespace().collect::<Vec<_>>().join(" "),
        );
    }

    /// In the copy of the test binary: runs [`child`] in a single-threaded fork.
    fn as_child(scratch: &std::ffi::OsStr) {
        let user = std::env::var(CHILD_UID)
            .ok()
            .map(|b| b.parse::<IdMap>().unwrap());
        // libtest runs the test on a thread of its own: fork, so that the jail gets a
        // process with one thread, as the monitor is when it enters it.
        // SAFETY: the child only runs the test body and _exits; glibc's fork keeps malloc
        // usable in the child, and libtest's main thread only waits for this one.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = std::panic::catch_unwind(|| child(Path::new(scratch), user)).is_ok();
                let _ = std::io::Write::flush(&mut std::io::stdout());
                // SAFETY: _exit ends the forked process without running the parent's
                // exit handlers twice.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }

    /// The container id the jailed child uses (names its cgroup and overlay work directory).
    fn unit_id(scratch: &Path) -> String {
        scratch.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// What a jail run in a fresh copy of this binary reported, and what it left on disk.
    struct Outcome {
        /// The child's `key=value` lines, then those of what the parent saw after it.
        stdout: String,
        wrote: std::io::Result<Vec<u8>>,
        /// (uid, gid) on disk of the share's `new` and `given`, and of the state directory.
        owners: [(u32, u32); 3],
    }

    impl Outcome {
        fn get(&self, key: &str) -> String {
            self.stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("no {key} in {}", self.stdout))
                .to_owned()
        }
    }

    /// Runs test `name` as the jailed child (with `--monitor-uid` `user`), on a scratch tree
    /// of a state directory (with a share) and a kernel; with `overlay`, the share's rootfs is
    /// an overlay mounted on the host (as an engine's).
    fn run_jailed(name: &str, user: Option<u32>, overlay: bool) -> Option<Outcome> {
        use std::os::unix::fs::MetadataExt;
        if let Some(scratch) = std::env::var_os(CHILD) {
            as_child(&scratch);
            return None;
        }
        if !husk_e2e::is_root() || !Path::new("/dev/kvm").exists() {
            return husk_e2e::skip("needs root and /dev/kvm");
        }
        let scratch = std::env::temp_dir().join(format!(
            "husk-jail-unit-{}-{}-{overlay}",
            std::process::id(),
            user.is_some()
        ));
        let state = scratch.join("state");
        std::fs::create_dir_all(state.join("share")).unwrap();
        std::fs::write(state.join("share/owned"), b"root's").unwrap();
        let unmapped = state.join("share/unmapped");
        std::fs::write(&unmapped, b"70000's").unwrap();
        std::os::unix::fs::chown(&unmapped, Some(70_000), Some(70_000)).unwrap();
        std::fs::set_permissions(
            &unmapped,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::fs::create_dir_all(scratch.join("image")).unwrap();
        std::fs::write(scratch.join("image/vmlinux"), b"elf").unwrap();
        // Only root may search it, as containerd's state root: the jail is built as root.
        std::fs::set_permissions(
            &scratch,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let engine = overlay.then(|| engine_overlay(&scratch));
        // One test alone on the main thread of a fresh copy of this binary: the jail needs a
        // single-threaded process.
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            &format!("monitor::jail::tests::{name}"),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, &scratch);
        if let Some(base) = user {
            cmd.env(CHILD_UID, base.to_string());
        }
        if overlay {
            cmd.env(CHILD_OVERLAY, "1");
        }
        let out = cmd.output().unwrap();
        let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(engine) = engine {
            stdout.push_str(&after_overlay(&scratch, engine));
        }
        let cgroups_removed = cgroup::remove(&state);
        let wrote = std::fs::read(state.join("w"));
        let owner = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| (m.uid(), m.gid()))
                .unwrap_or((u32::MAX, u32::MAX))
        };
        let owners = [
            owner(&state.join("share/new")),
            owner(&state.join("share/given")),
            owner(&state),
        ];
        std::fs::remove_dir_all(&scratch).unwrap();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        cgroups_removed.unwrap();
        let outcome = Outcome {
            stdout,
            wrote,
            owners,
        };
        let tmp_top = first_name(&scratch);
        let mut expected = vec!["dev".to_string(), "proc".into(), tmp_top];
        expected.sort();
        expected.dedup();
        assert_eq!(outcome.get("root"), expected.join(","));
        assert_eq!(outcome.get("state_write"), "true");
        assert_eq!(
            outcome.wrote.as_deref().unwrap(),
            b"x",
            "the write went to the real state directory"
        );
        assert_eq!(outcome.get("pinned_changed"), "", "a pinned record changed");
        assert_eq!(outcome.get("root_write"), "true", "/ must be read-only");
        assert_eq!(outcome.get("kernel_read"), "true");
        assert_eq!(
            outcome.get("kernel_write"),
            "true",
            "the kernel must be read-only"
        );
        // Seen as root's, created as root's, chowned to 1000: on disk as in the guest.
        assert_eq!(outcome.get("share_owner"), "0");
        assert_eq!(outcome.get("share_create"), "true");
        assert_eq!(outcome.get("share_chown"), "true");
        assert_eq!(outcome.owners[0], (0, 0), "share/new on disk");
        assert_eq!(outcome.owners[1], (1000, 1000), "share/given on disk");
        let kept = kept_capabilities(false, user.is_some())
            .into_iter()
            .fold(0u64, |m, c| m | c.bitmask());
        assert_eq!(outcome.get("CapEff"), format!("{kept:016x}"));
        assert_eq!(outcome.get("CapBnd"), "0000000000000000");
        assert_eq!(outcome.get("NoNewPrivs"), "1");
        Some(outcome)
    }

    #[test]
    fn a_jailed_process_sees_and_may_only_what_it_was_given() {
        let Some(out) = run_jailed(
            "a_jailed_process_sees_and_may_only_what_it_was_given",
            None,
            false,
        ) else {
            return;
        };
        assert_eq!(out.get("uid_map"), "0 0 4294967295");
        assert_eq!(out.get("unmapped_read"), "true", "root may read any file");
        assert_eq!(out.owners[2], (0, 0), "the state directory stays root's");
    }

    #[test]
    fn a_jailed_process_with_a_uid_is_root_only_in_its_namespace() {
        let Some(out) = run_jailed(
            "a_jailed_process_with_a_uid_is_root_only_in_its_namespace",
            Some(TEST_BASE),
            false,
        ) else {
            return;
        };
        assert_eq!(out.get("uid_map"), format!("0 {TEST_BASE} 65536"));
        assert_eq!(
            out.get("unmapped_read"),
            "false",
            "the monitor read a file of an id outside its range"
        );
        assert_eq!(out.owners[2], (TEST_BASE, TEST_BASE), "the state directory");
    }

    #[test]
    fn a_jailed_process_with_a_uid_serves_an_overlay_rootfs_on_idmapped_layers() {
        let Some(out) = run_jailed(
            "a_jailed_process_with_a_uid_serves_an_overlay_rootfs_on_idmapped_layers",
            Some(TEST_BASE),
            true,
        ) else {
            return;
        };
        for (key, want) in [
            ("ovl_read", "lower"),
            ("ovl_dir_owner", "1000"),
            ("ovl_read_1000", "1000's"),
            ("ovl_opaque", "true"),
            ("ovl_create", "true"),
            ("ovl_chown", "true"),
            ("ovl_copy_up", "true"),
            // On disk, in the engine's upper directory, with the guest's ids.
            ("upper_made", "0:0"),
            ("upper_made1000", "1000:1000"),
            ("upper_file", "0:0"),
            ("upper_file_text", "lower+guest"),
            ("engine_copy_up", "Ok(())"),
            ("workdir_made", "true"),
            ("workdir_removed", "Ok(()) true"),
        ] {
            assert_eq!(out.get(key), want, "{key}");
        }
    }

    /// Mounts an overlay on the scratch's layers, as podman lays them out: two lower layers
    /// (the upper one making `opaque` opaque) beside a directory holding the upper, work and
    /// mount point (`c/merged`) of the container.
    fn engine_overlay(scratch: &Path) -> husk_e2e::Overlay {
        use std::os::unix::fs::PermissionsExt;
        let l = scratch.join("layers");
        for dir in [
            "lower1/dir1000",
            "lower1/opaque",
            "lower2/opaque",
            "c/upper",
            "c/work",
        ] {
            std::fs::create_dir_all(l.join(dir)).unwrap();
        }
        std::fs::write(l.join("lower2/opaque/hidden"), b"").unwrap();
        std::fs::write(l.join("lower2/other"), b"other").unwrap();
        std::fs::write(l.join("lower1/file"), b"lower").unwrap();
        std::fs::write(l.join("lower1/dir1000/f"), b"1000's").unwrap();
        for p in ["lower1/dir1000", "lower1/dir1000/f"] {
            std::os::unix::fs::chown(l.join(p), Some(1000), Some(1000)).unwrap();
            std::fs::set_permissions(l.join(p), std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let opaque =
            std::ffi::CString::new(l.join("lower1/opaque").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: setxattr(2) reads the NUL-terminated path and name and the 1-byte value.
        let r = unsafe {
            libc::setxattr(
                opaque.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        let merged = l.join("c/merged");
        std::fs::create_dir(&merged).unwrap();
        husk_e2e::Overlay::mount(
            &[&l.join("lower1"), &l.join("lower2")],
            &l.join("c/upper"),
            &l.join("c/work"),
            &merged,
        )
    }

    /// What the jailed child left in the engine's overlay, as `key=value` lines; whether the
    /// engine's overlay still works (its work directory untouched); then unmounts it and
    /// removes husk's work directory as `husk delete` does.
    fn after_overlay(scratch: &Path, engine: husk_e2e::Overlay) -> String {
        use std::os::unix::fs::MetadataExt;
        let upper = scratch.join("layers/c/upper");
        let owner = |p: &str| {
            std::fs::metadata(upper.join(p))
                .map(|m| format!("{}:{}", m.uid(), m.gid()))
                .unwrap_or_else(|e| e.to_string())
        };
        let mut seen = String::new();
        let mut see = |k: &str, v: String| seen.push_str(&format!("{k}={v}\n"));
        see("upper_made", owner("made"));
        see("upper_made1000", owner("made1000"));
        see("upper_file", owner("file"));
        see(
            "upper_file_text",
            std::fs::read_to_string(upper.join("file")).unwrap_or_default(),
        );
        let engine_copy_up = std::fs::write(engine.at.join("other"), b"engine");
        see("engine_copy_up", format!("{engine_copy_up:?}"));
        let id = unit_id(scratch);
        let ours = scratch.join("layers/c/work").join(format!("husk-{id}"));
        see("workdir_made", ours.is_dir().to_string());
        drop(engine);
        let removed = overlay::remove_workdirs(&scratch.join("state"), &id);
        see("workdir_removed", format!("{removed:?} {}", !ours.exists()));
        seen
    }

    fn first_name(p: &Path) -> String {
        p.components()
            .nth(1)
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap()
    }

    #[test]
    fn the_network_capability_is_kept_only_with_a_network() {
        assert!(!kept_capabilities(false, false).contains(&Capability::CAP_NET_ADMIN));
        assert!(kept_capabilities(true, false).contains(&Capability::CAP_NET_ADMIN));
        for dropped in [
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_SYS_PTRACE,
            Capability::CAP_SYS_MODULE,
            Capability::CAP_SETPCAP,
            Capability::CAP_KILL,
            Capability::CAP_NET_RAW,
        ] {
            assert!(
                !kept_capabilities(true, false).contains(&dropped),
                "{dropped}"
            );
        }
    }
}
