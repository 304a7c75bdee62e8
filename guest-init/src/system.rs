//! The duties of PID 1 towards the VM itself: the guest's own mounts, boot markers and
//! power-off.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use husk_proto::marker::{MARKER_PORT, Marker};
use nix::mount::MsFlags;

use crate::log;
use crate::sys;

/// Whether boot markers may be written (only as PID 1 in a VM: on a host, port I/O would
/// reach real hardware).
static MARKERS: AtomicBool = AtomicBool::new(false);

/// Errors of the guest's own setup.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    /// A mount of the guest's own filesystems failed.
    #[error("mounting {fstype} on {target}")]
    Mount {
        /// The filesystem type.
        fstype: &'static str,
        /// The mount point.
        target: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// Re-rooting onto a bind mount of the initramfs failed.
    #[error("re-rooting the initramfs ({step})")]
    Reroot {
        /// The step that failed.
        step: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// Creating a mount point failed.
    #[error("creating {path}")]
    Mkdir {
        /// The directory.
        path: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Grants this process access to the marker port.
pub fn enable_markers() {
    match sys::ioperm(MARKER_PORT) {
        Ok(()) => MARKERS.store(true, Ordering::Relaxed),
        Err(e) => log::warning!("no access to the boot marker port {MARKER_PORT:#x}: {e}"),
    }
}

/// Writes a boot marker (a no-op unless [`enable_markers`] succeeded).
pub fn mark(marker: Marker) {
    if MARKERS.load(Ordering::Relaxed) {
        sys::outb(MARKER_PORT, marker as u8);
    }
}

/// The filesystems PID 1 mounts, in order.
const MOUNTS: &[(&str, &str, &str, MsFlags, &str)] = &[
    // (source, target, fstype, flags, data)
    ("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, ""),
    (
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        "mode=0755",
    ),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        "gid=5,mode=0620,ptmxmode=0666",
    ),
    ("shm", "/dev/shm", "tmpfs", NOSUID_NODEV, "mode=1777"),
    ("run", "/run", "tmpfs", NOSUID_NODEV, "mode=0755"),
    (
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        NOSUID_NODEV_NOEXEC,
        "nsdelegate",
    ),
];

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// Mounts the guest's own filesystems and makes sure fds 0-2 exist.
pub fn setup() -> Result<(), SystemError> {
    reroot()?;
    for &(source, target, fstype, flags, data) in MOUNTS {
        if !Path::new(target).exists() {
            fs::create_dir_all(target).map_err(|source| SystemError::Mkdir {
                path: target,
                source,
            })?;
        }
        nix::mount::mount(
            Some(source),
            target,
            Some(fstype),
            flags,
            (!data.is_empty()).then_some(data),
        )
        .map_err(|source| SystemError::Mount {
            fstype,
            target,
            source,
        })?;
    }
    // /dev/kmsg exists now (the first attempt ran before devtmpfs was mounted).
    log::init_kmsg();
    sys::ensure_std_fds();
    if let Err(e) = sys::loopback_up() {
        log::warning!("cannot bring up lo: {e}");
    }
    Ok(())
}

/// Moves a bind mount of the initramfs over `/` and chroots into it, as switch_root does but
/// without copying anything.
///
/// The initramfs is the kernel's initial `rootfs` mount, which has no parent mount, and
/// `pivot_root(2)` refuses to pivot away from such a root: every container's pivot_root would
/// fail. A bind mount of it placed on top of `/` does have a parent, so containers (in their
/// own mount namespaces) can pivot away from it normally.
fn reroot() -> Result<(), SystemError> {
    use nix::unistd::{chdir, chroot};
    let step = |step: &'static str| move |source| SystemError::Reroot { step, source };
    const TMP: &str = "/.husk-root";
    nix::unistd::mkdir(TMP, nix::sys::stat::Mode::from_bits_truncate(0o700))
        .map_err(step("mkdir /.husk-root"))?;
    nix::mount::mount(Some("/"), TMP, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(step("bind-mounting / on /.husk-root"))?;
    chdir(TMP).map_err(step("chdir /.husk-root"))?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(step("moving the bind mount onto /"))?;
    chroot(".").map_err(step("chroot"))?;
    chdir("/").map_err(step("chdir /"))?;
    // The now-empty mount point lives on in the new root (it is the same file system).
    if let Err(e) = fs::remove_dir(TMP) {
        log::warning!("cannot remove {TMP}: {e}");
    }
    Ok(())
}

/// `RNDADDENTROPY = _IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG = _IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Makes this VM's kernel RNG its own: `entropy` (from the host) is mixed in and credited,
/// then the RNG reseeds at once, so that what `/dev/urandom` and `getrandom` give from now on
/// depends on it. A VM restored from a template starts with the template's RNG state; this is
/// what makes two such VMs draw different numbers.
pub fn reseed_rng(entropy: &[u8]) -> std::io::Result<()> {
    let urandom = fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let len = i32::try_from(entropy.len()).unwrap_or(i32::MAX);
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&len.saturating_mul(8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes follow its header:
    // `info` holds exactly that, and lives across the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&urandom),
            RNDADDENTROPY,
            info.as_ptr(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&urandom), RNDRESEEDCRNG) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the wall clock to `ns` nanoseconds since the Unix epoch.
pub fn set_wall_clock(ns: i64) -> std::io::Result<()> {
    let ts = libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000),
    };
    // SAFETY: clock_settime reads the live timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes orphans of this process's descendants come back to it (when not PID 1).
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        log::warning!("cannot become a child subreaper: {e}");
    }
}

/// Ends the VM: kills what is left, flushes file systems, tells the VMM, then reboots (with
/// `reboot=k` the kernel writes the i8042 reset command, which ends the VM in any VMM that
/// models an i8042, husk's included).
pub fn power_off() -> ! {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::SIGKILL);
    nix::unistd::sync();
    mark(Marker::PowerOff);
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    log::error!("reboot failed: {err:?}");
    loop {
        std::thread::park();
    }
}
