//! The Unix sockets in a container's state directory, by paths that fit in `sockaddr_un`.
//!
//! `sun_path` holds 107 bytes and a NUL. Engines name containers with 64-character ids under
//! long roots (containerd's shim: `/run/containerd/runc/<namespace>/<id>/`, Docker's:
//! `/var/run/docker/runtime-<name>/moby/<id>/`), so `<dir>/vsock.sock_<port>` often does not
//! fit. A [`SocketDir`] holds the directory open and, when a socket path there could be too
//! long, names it through `/proc/self/fd/<fd>/` instead: the same directory by a ~20-byte
//! path, valid in this process for as long as the `SocketDir` lives (bind, connect and unlink
//! all resolve it; the vsock device's connects on the VMM thread need no extra syscall).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The longest name husk gives a socket in the directory: the vsock device's listener for
/// the highest port (`vsock.sock_<u32>`), with the separating slash.
const LONGEST_NAME: usize = "/vsock.sock_4294967295".len();

/// What `sun_path` holds, less its NUL.
const SUN_PATH_MAX: usize = 107;

/// The monitor's control socket's name in the directory.
pub const MONITOR_SOCKET: &str = "monitor.sock";

/// A container directory's sockets.
#[derive(Debug)]
pub struct SocketDir {
    base: PathBuf,
    _dir: OwnedFd,
}

impl SocketDir {
    /// Opens `dir` (an `O_PATH` descriptor, close-on-exec).
    pub fn open(dir: &Path) -> std::io::Result<SocketDir> {
        let fd = nix::fcntl::open(
            dir,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(std::io::Error::from)?;
        let base = if dir.as_os_str().len() + LONGEST_NAME > SUN_PATH_MAX {
            PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        } else {
            dir.to_path_buf()
        };
        Ok(SocketDir { base, _dir: fd })
    }

    /// The monitor's control socket.
    pub fn monitor(&self) -> PathBuf {
        self.base.join(MONITOR_SOCKET)
    }

    /// The vsock device's host-side socket (guest-initiated connections to port P go to
    /// `<it>_P`).
    pub fn vsock(&self) -> PathBuf {
        self.base.join("vsock.sock")
    }

    /// The listener for guest connections to `port`.
    pub fn vsock_port(&self, port: u32) -> PathBuf {
        self.base.join(format!("vsock.sock_{port}"))
    }

    /// [`SocketDir::vsock_port`] through the directory's descriptor
    /// (`/proc/self/fd/<fd>/vsock.sock_<port>`), whatever the length of its path: resolving
    /// it needs no search permission on the directories above it (see
    /// `cli::oci::exec::ports`, which binds there as the directory's owner).
    pub fn vsock_port_by_fd(&self, port: u32) -> PathBuf {
        PathBuf::from(format!(
            "/proc/self/fd/{}/vsock.sock_{port}",
            self._dir.as_raw_fd()
        ))
    }

    /// The directory's owner (uid, gid), from its descriptor.
    pub fn owner(&self) -> std::io::Result<(u32, u32)> {
        let st = nix::sys::stat::fstat(&self._dir).map_err(std::io::Error::from)?;
        Ok((st.st_uid, st.st_gid))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::{UnixListener, UnixStream};

    use super::*;

    #[test]
    fn short_directories_keep_their_own_paths() {
        let dir = std::env::temp_dir().join(format!("husk-sd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = SocketDir::open(&dir).unwrap();
        assert_eq!(s.vsock_port(1024), dir.join("vsock.sock_1024"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sockets_in_a_directory_too_deep_for_sun_path_work() {
        // A containerd-like path: a 64-character id under a namespace.
        let id = "a".repeat(64);
        let dir = std::env::temp_dir()
            .join(format!("husk-sd-long-{}", std::process::id()))
            .join("run/containerd/runc/husk-test-namespace")
            .join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(dir.join("vsock.sock_1024").as_os_str().len() > SUN_PATH_MAX);
        // The plain path is refused by the kernel...
        assert!(UnixListener::bind(dir.join("vsock.sock_1024")).is_err());
        // ...the SocketDir's works: bind, connect and unlink, and the socket is in `dir`.
        let s = SocketDir::open(&dir).unwrap();
        let path = s.vsock_port(1024);
        assert!(path.as_os_str().len() <= SUN_PATH_MAX, "{}", path.display());
        let listener = UnixListener::bind(&path).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        assert!(dir.join("vsock.sock_1024").exists());
        std::fs::remove_file(&path).unwrap();
        assert!(!dir.join("vsock.sock_1024").exists());
        let monitor = UnixListener::bind(s.monitor()).unwrap();
        drop(monitor);
        assert!(dir.join("monitor.sock").exists());
        std::fs::remove_dir_all(dir.ancestors().nth(4).unwrap()).unwrap();
    }
}
