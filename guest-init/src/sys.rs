//! The few raw system calls that nix does not wrap. husk-init's raw calls all live here, each
//! with its SAFETY argument.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

/// Grants the calling thread access to one I/O port.
pub fn ioperm(port: u16) -> io::Result<()> {
    // SAFETY: ioperm only changes this thread's I/O permission bitmap; no memory is touched.
    let rc = unsafe { libc::ioperm(libc::c_ulong::from(port), 1, 1) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes one byte to an I/O port. The caller must have called [`ioperm`] for `port`
/// (otherwise the CPU raises #GP and the kernel sends SIGSEGV).
pub fn outb(port: u16, value: u8) {
    // SAFETY: `out` writes a byte to an I/O port this process was granted with ioperm (the
    // only caller, system::mark, checks that ioperm succeeded); it touches no memory, stack
    // or flags.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

/// Makes sure fds 0, 1 and 2 are open (PID 1 may start without them), so that later opens
/// never land on them.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1
            && let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
        {
            let null = OwnedFd::from(null);
            if null.as_raw_fd() != fd {
                let _ = dup_onto(&null, fd);
            } else {
                // It landed on the free slot itself: keep it open for good.
                std::mem::forget(null);
            }
        }
    }
}

/// Duplicates `fd` onto descriptor number `target` (dup2), which stays open for the rest of
/// the process's life (it is meant for 0, 1 and 2).
pub fn dup_onto(fd: &impl AsFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2 atomically replaces whatever `target` referred to; callers use it only
    // for the standard descriptors 0-2, which no Rust object owns in this process.
    let dup = unsafe { nix::unistd::dup2_raw(fd.as_fd(), target) }?;
    // The new descriptor is deliberately left open: it is the process's stdin/out/err.
    let _ = dup.into_raw_fd();
    Ok(())
}

/// `IFF_UP` as the `c_short` that `ifreq.ifr_flags` holds.
#[expect(clippy::cast_possible_truncation, reason = "IFF_UP is 1")]
pub const IFF_UP: libc::c_short = libc::IFF_UP as libc::c_short;

/// Sets IFF_UP on the loopback interface.
pub fn loopback_up() -> io::Result<()> {
    set_link_flags("lo", IFF_UP, true)
}

/// Sets or clears interface flags with SIOCSIFFLAGS.
pub fn set_link_flags(name: &str, flags: libc::c_short, on: bool) -> io::Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into `req`, which lives
    // for the whole call and has the layout the kernel expects.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled ifru_flags, the active member after SIOCGIFFLAGS.
    let cur = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = if on { cur | flags } else { cur & !flags };
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Forks with extra `CLONE_NEW*` flags: like fork(2), but the child starts in new namespaces
/// (with `CLONE_NEWPID` it is PID 1 of a new pid namespace). Returns the child's pid in the
/// parent and 0 in the child.
///
/// The caller must be single-threaded (husk-init is): the child is a copy of this thread
/// only, and glibc's fork handlers do not run. glibc reads the thread id from the kernel in
/// the self-signalling paths (raise/abort), so the stale cached tid in the child is harmless.
pub fn fork_into_namespaces(ns_flags: libc::c_int) -> io::Result<libc::pid_t> {
    let flags = libc::c_ulong::try_from(ns_flags | libc::SIGCHLD)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: clone without CLONE_VM and with a NULL stack has fork semantics: the child gets
    // a copy-on-write copy of the address space and continues on its copy of this stack. No
    // pointer arguments are passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    libc::pid_t::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Installs one classic-BPF seccomp filter on the calling thread, without setting
/// no_new_privs (the caller sets it when the spec asks; without it the caller needs
/// CAP_SYS_ADMIN, as runc does).
pub fn install_seccomp_filter(prog: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(prog.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "seccomp filter too long"))?;
    let fprog = libc::sock_fprog {
        len,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: the kernel copies `len` instructions from `filter`, which points into `prog`,
    // alive for the whole call; `fprog` lives on the stack for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_ulong,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Marks every descriptor from `first` up close-on-exec (CVE-2024-21626: no host-side
/// descriptor may survive into the container's process).
pub fn cloexec_from(first: RawFd) -> io::Result<()> {
    let first =
        libc::c_uint::try_from(first).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags in the descriptor table.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens a new pseudo-terminal pair through the caller's `/dev/ptmx` (so in the devpts instance
/// that the caller's mount namespace shows there): (master, slave), both close-on-exec.
pub fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    // SAFETY: TIOCGPTPEER opens the slave of the master we own; it returns a new descriptor
    // that nothing else owns.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    let master = OwnedFd::from(master);
    // SAFETY: `slave` was just returned by the kernel and is owned by nobody else.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    Ok((master, slave))
}

/// Sets the window size of a terminal.
pub fn set_winsize(fd: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a pointer to a live stack value.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `fd` (a terminal) the controlling terminal of the calling session leader.
pub fn set_controlling_tty(fd: RawFd) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument and touches no memory of ours.
    if unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// execve(2); returns only on failure.
pub fn execve(path: &CString, argv: &[CString], envp: &[CString]) -> io::Error {
    let mut av: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    av.push(std::ptr::null());
    let mut ev: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    ev.push(std::ptr::null());
    // SAFETY: `path`, every argv/envp string and both NULL-terminated pointer arrays outlive
    // the call; execve does not return on success.
    unsafe { libc::execve(path.as_ptr(), av.as_ptr(), ev.as_ptr()) };
    io::Error::last_os_error()
}

/// Resets every signal disposition to the default and unblocks all signals (ignored
/// dispositions would otherwise survive execve: Rust ignores SIGPIPE).
pub fn reset_signals() {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, sigprocmask};
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL registers no handler code at all.
        let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}
