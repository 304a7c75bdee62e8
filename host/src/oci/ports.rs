//! The ports on which the guest connects a process's stdio back to a process on the host
//! other than the monitor: an exec'd process's to `husk exec`, a pod's later container's to
//! the process that stands for it (`monitor::member`). They are `vsock.sock_<port>`
//! listeners beside the VM's vsock socket (the VM's vsock device connects the guest's streams
//! to them), bound for the request and removed once the guest connected or the request
//! failed.
//!
//! The monitor connects to them, so they belong to the state directory's owner: the monitor's
//! uid under `--monitor-uid` (root otherwise). That directory is the monitor's to write, and
//! the monitor is treated as taken over by its guest: a socket bound as root and then chowned
//! by path could have been swapped for a symlink in between, making root `husk exec` give any
//! file of the host to the monitor. So nothing is chowned: the sockets are bound on a thread
//! whose filesystem uid and gid are the directory's owner's (`setfsuid(2)`, per thread), so
//! the kernel creates them with that owner, through the directory's descriptor (no search
//! permission needed above it). The directory's owner is read from that descriptor too.

use std::os::unix::net::UnixListener;

use crate::oci::sockets::SocketDir;

/// Binds `vsock.sock_<port>` listeners for three consecutive free ports, owned by the
/// directory's owner (see the module docs).
pub fn bind(sockets: &SocketDir) -> std::io::Result<(u32, [UnixListener; 3])> {
    let (uid, gid) = sockets.owner()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            as_owner(uid, gid)?;
            bind_free(sockets)
        })
        .join()
        .map_err(|_| std::io::Error::other("binding vsock ports: the thread panicked"))?
    })
}

/// Makes the calling thread's filesystem uid and gid `uid` and `gid` (the thread's own: they
/// are per thread, and end with it).
fn as_owner(uid: u32, gid: u32) -> std::io::Result<()> {
    // SAFETY: setfsgid/setfsuid take an id and change only the calling thread's credentials;
    // the invalid id u32::MAX changes nothing and returns the current one, to check.
    let (fsgid, fsuid) = unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
        (libc::setfsgid(u32::MAX), libc::setfsuid(u32::MAX))
    };
    if (u32::try_from(fsuid).ok(), u32::try_from(fsgid).ok()) != (Some(uid), Some(gid)) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("cannot bind vsock ports as uid {uid} and gid {gid} (the directory's owner)"),
        ));
    }
    Ok(())
}

/// The three listeners, from the first free port of a pseudo-random sequence.
fn bind_free(sockets: &SocketDir) -> std::io::Result<(u32, [UnixListener; 3])> {
    let seed = std::process::id() % 10_000;
    for attempt in 0..1000u32 {
        let base = 10_000 + ((seed + attempt * 7) % 20_000) * 3;
        let mut bound = Vec::new();
        for p in base..base + 3 {
            // A port taken by another exec: its socket is not ours to remove.
            let Ok(l) = UnixListener::bind(sockets.vsock_port_by_fd(p)) else {
                break;
            };
            bound.push(l);
        }
        if bound.len() < 3 {
            remove(sockets, base, bound.len());
            continue;
        }
        for l in &bound {
            // Accepted by deadline (`accept_by`).
            l.set_nonblocking(true)?;
        }
        let mut listeners = bound.into_iter();
        let mut next = || listeners.next().expect("three bound");
        return Ok((base, [next(), next(), next()]));
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free vsock ports",
    ))
}

/// Accepts the guest's connection on `listener` (one of [`bind`]'s), waiting until
/// `deadline` at most: the guest connects a process's streams as soon as the process runs,
/// and one that does not must not hang the command waiting for it.
pub fn accept_by(
    listener: &UnixListener,
    deadline: std::time::Instant,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::os::fd::AsFd;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false)?;
                return Ok(conn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the guest did not connect the process's streams in time (is the guest hung?)",
            ));
        }
        let millis = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
        let mut fds = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(millis));
    }
}

/// Removes the first `n` of the listeners [`bind`] bound from `base` on.
pub fn remove(sockets: &SocketDir, base: u32, n: usize) {
    for p in (base..base + 3).take(n) {
        let _ = std::fs::remove_file(sockets.vsock_port(p));
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use super::*;

    /// Runs `f` on a thread on which chown(2), fchown(2), lchown(2) and fchownat(2) fail
    /// with EPERM (a seccomp filter of that thread and of those it starts).
    fn without_chown<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                const LD_NR: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS, offset 0: the number
                const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
                const RET: u16 = 0x06; // BPF_RET | BPF_K
                const ALLOW: u32 = 0x7fff_0000;
                const EPERM: u32 = 0x0005_0000 | 1;
                let nr = |n: libc::c_long| u32::try_from(n).unwrap();
                let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
                let mut program = [
                    insn(LD_NR, 0, 0, 0),
                    insn(JEQ, 4, 0, nr(libc::SYS_chown)),
                    insn(JEQ, 3, 0, nr(libc::SYS_fchown)),
                    insn(JEQ, 2, 0, nr(libc::SYS_lchown)),
                    insn(JEQ, 1, 0, nr(libc::SYS_fchownat)),
                    insn(RET, 0, 0, ALLOW),
                    insn(RET, 0, 0, EPERM),
                ];
                let prog = libc::sock_fprog {
                    len: u16::try_from(program.len()).unwrap(),
                    filter: program.as_mut_ptr(),
                };
                // SAFETY: prctl reads the program through `prog`, which points at live
                // memory; the filter only makes four syscalls fail on this thread.
                let rc = unsafe {
                    libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &raw const prog,
                    )
                };
                assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// The monitor (under `--monitor-uid`) owns the state directory and may swap a socket
    /// for a symlink between its bind and a chown by path: the sockets are made with the
    /// directory's owner instead, and nothing is chowned.
    #[test]
    fn exec_ports_get_the_directory_owner_without_a_chown() {
        if !husk_e2e::is_root() {
            husk_e2e::skip::<()>("needs root (a directory of another owner)");
            return;
        }
        let top = std::env::temp_dir().join(format!("husk-ports-{}", std::process::id()));
        let dir = top.join("state/c1");
        std::fs::create_dir_all(&dir).unwrap();
        // Only root may search the way there, as containerd's state root.
        std::fs::set_permissions(&top, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        std::os::unix::fs::chown(&dir, Some(54_321), Some(54_322)).unwrap();
        let sockets = SocketDir::open(&dir).unwrap();
        let bound = without_chown(|| bind(&sockets).map(|(base, _listeners)| base));
        let owners: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                let m = e.unwrap().metadata().unwrap();
                (m.uid(), m.gid(), m.file_type().is_socket())
            })
            .collect();
        std::fs::remove_dir_all(&top).unwrap();
        let base = bound.unwrap();
        assert!(base >= 10_000, "{base}");
        assert_eq!(owners, vec![(54_321, 54_322, true); 3]);
    }

    /// A guest that never connects an exec's stream: `husk exec` gives up at its deadline.
    #[test]
    fn a_stream_the_guest_never_connects_is_given_up_on() {
        let dir = std::env::temp_dir().join(format!("husk-ports-accept-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sockets = SocketDir::open(&dir).unwrap();
        let (_base, [l, _, _]) = bind(&sockets).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            let _ = tx.send(accept_by(&l, deadline).map(drop).map_err(|e| e.to_string()));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(10));
        std::fs::remove_dir_all(&dir).unwrap();
        let err = got
            .expect("waiting for the guest's connection went on past the deadline")
            .unwrap_err();
        assert!(err.contains("did not connect"), "{err}");
    }
}
