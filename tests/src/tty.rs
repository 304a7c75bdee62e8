//! The engine's side of a container's terminal: the pty master that husk sends to the
//! `--console-socket`, and reading from it until something shows.

use std::io::{IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

/// Accepts husk's connection on the console socket and returns the pty master it sends (and
/// the name that comes with it).
pub fn recv_fd(listener: &UnixListener) -> (OwnedFd, String) {
    let (conn, _) = listener.accept().unwrap();
    let mut buf = [0u8; 256];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .unwrap();
    let mut fd = None;
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            fd = fds.first().copied();
        }
    }
    let n = msg.bytes;
    let name = String::from_utf8_lossy(&buf[..n]).into_owned();
    // SAFETY: the fd was just received via SCM_RIGHTS and is ours alone.
    (
        unsafe { OwnedFd::from_raw_fd(fd.expect("an fd in the message")) },
        name,
    )
}

/// The pty master as a non-blocking file, for [`read_until`].
pub fn nonblocking(master: OwnedFd) -> std::fs::File {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(master.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    std::fs::File::from(master)
}

/// Reads the (non-blocking) master until `needle` shows, within `limit`; returns what it read.
pub fn read_until(master: &mut std::fs::File, needle: &str, limit: Duration) -> String {
    let start = Instant::now();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        assert!(
            start.elapsed() < limit,
            "no {needle:?} on the terminal; saw {seen:?}"
        );
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("reading the pty master: {e}"),
        }
    }
    seen
}

/// Sets the terminal's window size on the master (what an engine does when its own changes).
pub fn resize(master: &std::fs::File, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the winsize we pass; the fd is a pty master.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

/// A devpts mount for a bundle's `mounts`: the terminal comes from the container's own devpts,
/// as with runc.
pub fn devpts_mount() -> serde_json::Value {
    serde_json::json!(
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}
    )
}
