//! The attempts, from inside the thread's filters and credentials: opening host files,
//! signalling and tracing, connecting to sockets, making sockets and the calls that would
//! widen what the thread can do. One line each on stdout, with the verdict told apart as the
//! filters were rewritten (see `filters`).

use std::ffi::CString;
use std::os::fd::RawFd;

use crate::args::Args;
use crate::filters::{FILTER_ERRNO, KILLED};

/// What happened to one attempt.
fn verdict(rc: i64) -> String {
    if rc >= 0 {
        return "ok".into();
    }
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    match errno {
        KILLED => "seccomp: killed".into(),
        e if (FILTER_ERRNO..KILLED).contains(&e) => {
            format!("seccomp: errno {}", name(e - FILTER_ERRNO))
        }
        e => name(e),
    }
}

fn name(errno: i32) -> String {
    let known = [
        (libc::EPERM, "EPERM"),
        (libc::ENOENT, "ENOENT"),
        (libc::ESRCH, "ESRCH"),
        (libc::EBADF, "EBADF"),
        (libc::EACCES, "EACCES"),
        (libc::EFAULT, "EFAULT"),
        (libc::EBUSY, "EBUSY"),
        (libc::EEXIST, "EEXIST"),
        (libc::EINVAL, "EINVAL"),
        (libc::ENOSYS, "ENOSYS"),
        (libc::EROFS, "EROFS"),
        (libc::ENOTDIR, "ENOTDIR"),
        (libc::EISDIR, "EISDIR"),
        (libc::ECONNREFUSED, "ECONNREFUSED"),
        (libc::EAFNOSUPPORT, "EAFNOSUPPORT"),
        (libc::ENETUNREACH, "ENETUNREACH"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::ENOTTY, "ENOTTY"),
        (libc::EXDEV, "EXDEV"),
        (libc::ELOOP, "ELOOP"),
        (libc::EADDRNOTAVAIL, "EADDRNOTAVAIL"),
        (libc::ENXIO, "ENXIO"),
    ];
    known
        .iter()
        .find(|(e, _)| *e == errno)
        .map_or_else(|| format!("errno {errno}"), |(_, n)| (*n).to_string())
}

fn report(category: &str, target: &str, result: String) {
    let line = format!("{category}\t{target}\t{result}\n");
    // SAFETY: one write(2) of `line`, which outlives the call.
    unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
}

fn close(fd: i64) {
    if fd >= 0 {
        // SAFETY: closes a descriptor this process just made.
        unsafe { libc::close(RawFd::try_from(fd).unwrap_or(-1)) };
    }
}

fn open(path: &str, flags: libc::c_int) -> String {
    let c = CString::new(path).unwrap_or_default();
    // SAFETY: `c` is NUL-terminated and outlives the call.
    let fd = i64::from(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) });
    let v = verdict(fd);
    close(fd);
    v
}

/// socket(domain) and, for Unix sockets, connect to `addr`.
fn connect_unix(addr: &[u8], is_abstract: bool) -> String {
    // SAFETY: socket takes integers.
    let fd = i64::from(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) });
    if fd < 0 {
        return format!("socket: {}", verdict(fd));
    }
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied within its bounds.
    let rc = unsafe {
        let mut sa: libc::sockaddr_un = std::mem::zeroed();
        sa.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
        let start = usize::from(is_abstract);
        let n = addr.len().min(sa.sun_path.len() - 1 - start);
        for (i, b) in addr[..n].iter().enumerate() {
            sa.sun_path[start + i] = b.cast_signed();
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + start + n;
        libc::connect(
            RawFd::try_from(fd).unwrap_or(-1),
            (&raw const sa).cast(),
            libc::socklen_t::try_from(len).unwrap_or(0),
        )
    };
    let v = verdict(i64::from(rc));
    close(fd);
    v
}

fn connect_tcp(port: u16) -> String {
    // SAFETY: socket takes integers.
    let fd = i64::from(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) });
    if fd < 0 {
        return format!("socket: {}", verdict(fd));
    }
    let sa = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect reads the sockaddr_in, whose size is passed.
    let rc = unsafe {
        libc::connect(
            RawFd::try_from(fd).unwrap_or(-1),
            (&raw const sa).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap_or(0),
        )
    };
    let v = verdict(i64::from(rc));
    close(fd);
    v
}

fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> String {
    // SAFETY: socket takes integers.
    let fd = i64::from(unsafe { libc::socket(domain, kind, protocol) });
    let v = verdict(fd);
    close(fd);
    v
}

/// Every attempt, one line each.
pub(crate) fn attempts(a: &Args) {
    let rw = libc::O_RDWR;
    let ro = libc::O_RDONLY;
    let wo = libc::O_WRONLY;
    // Host files, and what the kernel offers through /proc and /sys.
    for (path, flags) in [
        ("/proc/sys/kernel/core_pattern", wo),
        ("/proc/sys/kernel/modprobe", wo),
        ("/proc/sysrq-trigger", wo),
        ("/proc/1/environ", ro),
        ("/proc/1/mem", ro),
        ("/proc/self/mem", rw),
        ("/proc/kcore", ro),
        ("/sys/kernel/uevent_helper", wo),
        ("/etc/shadow", ro),
        ("/etc/passwd", wo),
        ("/root/.ssh/authorized_keys", wo),
        ("/dev/kvm", rw),
        ("/dev/mem", ro),
        ("/dev/null", rw),
    ] {
        let what = if flags == ro { "read" } else { "write" };
        report(&format!("open-{what}"), path, open(path, flags));
    }
    // What the test names: the monitor's state directory, image, volume, ...
    for path in &a.paths {
        report("open-write", path, open(path, wo));
        report("open-read", path, open(path, ro));
    }
    // Signals: another process of the host (a root `sleep` of the test's), and every process
    // it may signal (signal 0: only the permission check).
    if let Some(victim) = a.victim {
        // SAFETY: tgkill and kill take integers; the target is the test's own sleeper.
        let rc = unsafe { libc::syscall(libc::SYS_tgkill, victim, victim, libc::SIGRTMIN()) };
        report("signal", &format!("tgkill {victim} SIGRTMIN"), verdict(rc));
        // SAFETY: as above.
        let rc = unsafe { libc::kill(victim, libc::SIGTERM) };
        report(
            "signal",
            &format!("kill {victim} SIGTERM"),
            verdict(i64::from(rc)),
        );
        // SAFETY: as above: attach and, if it worked, the probe's exit detaches.
        let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, victim, 0, 0) };
        report("ptrace", &format!("attach {victim}"), verdict(rc));
    }
    // SAFETY: signal 0 only checks permission.
    let rc = unsafe { libc::kill(-1, 0) };
    report("signal", "kill -1 0", verdict(i64::from(rc)));
    // SAFETY: signal 0 to pid 1 of the probe's pid namespace.
    let rc = unsafe { libc::kill(1, 0) };
    report("signal", "kill 1 0", verdict(i64::from(rc)));
    // Connections.
    if let Some(name) = &a.abstract_name {
        report(
            "connect",
            &format!("unix @{name}"),
            connect_unix(name.as_bytes(), true),
        );
    }
    for path in [
        "/run/containerd/containerd.sock",
        "/var/run/docker.sock",
        "/run/dbus/system_bus_socket",
        "/run/systemd/private",
    ] {
        report(
            "connect",
            &format!("unix {path}"),
            connect_unix(path.as_bytes(), false),
        );
    }
    if let Some(port) = a.tcp {
        report(
            "connect",
            &format!("tcp 127.0.0.1:{port}"),
            connect_tcp(port),
        );
    }
    for (name, domain, kind, protocol) in [
        ("AF_INET", libc::AF_INET, libc::SOCK_DGRAM, 0),
        ("AF_NETLINK route", libc::AF_NETLINK, libc::SOCK_RAW, 0),
        ("AF_PACKET", libc::AF_PACKET, libc::SOCK_RAW, 0),
        ("AF_VSOCK", libc::AF_VSOCK, libc::SOCK_STREAM, 0),
    ] {
        report("socket", name, socket(domain, kind, protocol));
    }
    // Calls that would widen what it can do; harmless arguments, so only the verdict counts.
    syscalls_each();
}

/// Each dangerous call again, with its own verdict (errno is per call).
fn syscalls_each() {
    let nothing = c"/nonexistent-husk-probe";
    type Call = Box<dyn Fn() -> i64>;
    let calls: Vec<(&str, Call)> = vec![
        (
            "execve",
            // SAFETY: a path that does not exist; nothing is executed.
            Box::new(move || unsafe {
                i64::from(libc::execve(
                    nothing.as_ptr(),
                    std::ptr::null(),
                    std::ptr::null(),
                ))
            }),
        ),
        (
            "mount",
            // SAFETY: a target that does not exist; nothing is mounted.
            Box::new(move || unsafe {
                i64::from(libc::mount(
                    c"none".as_ptr(),
                    nothing.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                ))
            }),
        ),
        (
            "setns",
            // SAFETY: an invalid descriptor.
            Box::new(|| unsafe { i64::from(libc::setns(-1, 0)) }),
        ),
        (
            "bpf",
            // SAFETY: an invalid command.
            Box::new(|| unsafe { libc::syscall(libc::SYS_bpf, 0xffff, 0, 0) }),
        ),
        (
            "io_uring_setup",
            // SAFETY: zero entries and a null pointer: EINVAL or EFAULT at most.
            Box::new(|| unsafe { libc::syscall(libc::SYS_io_uring_setup, 0, 0) }),
        ),
        (
            "perf_event_open",
            // SAFETY: a null attribute pointer: EFAULT at most.
            Box::new(|| unsafe { libc::syscall(libc::SYS_perf_event_open, 0, 0, -1, -1, 0) }),
        ),
        (
            "keyctl",
            // SAFETY: an invalid operation.
            Box::new(|| unsafe { libc::syscall(libc::SYS_keyctl, 0xffff, 0, 0, 0, 0) }),
        ),
        (
            "userfaultfd",
            // SAFETY: a descriptor for the probe alone, or an error.
            Box::new(|| unsafe { libc::syscall(libc::SYS_userfaultfd, 0) }),
        ),
        (
            "finit_module",
            // SAFETY: an invalid descriptor.
            Box::new(|| unsafe { libc::syscall(libc::SYS_finit_module, -1, 0, 0) }),
        ),
        (
            "process_vm_readv",
            // SAFETY: no iovecs: nothing is read.
            Box::new(|| unsafe { libc::syscall(libc::SYS_process_vm_readv, 1, 0, 0, 0, 0, 0) }),
        ),
        (
            "chroot",
            // SAFETY: a path that does not exist.
            Box::new(move || unsafe { i64::from(libc::chroot(nothing.as_ptr())) }),
        ),
        (
            "unshare user",
            // SAFETY: a new user namespace for the probe alone.
            Box::new(|| unsafe { i64::from(libc::unshare(libc::CLONE_NEWUSER)) }),
        ),
    ];
    for (name, call) in calls {
        let rc = call();
        report("syscall", name, verdict(rc));
    }
}
