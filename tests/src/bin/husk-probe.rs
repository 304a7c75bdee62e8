//! `husk-probe`: what a monitor thread taken over by its guest could still reach, measured by
//! a process put in that thread's place. For the e2e tests (`tests/tests/monitor_jail.rs`);
//! run as root beside a running monitor:
//!
//! ```text
//! husk-probe --pid MONITOR_PID --tid THREAD_ID [--victim PID] [--abstract NAME]
//!            [--tcp PORT] [--path P]...
//! ```
//!
//! The probe takes the thread's place as closely as Linux allows:
//!
//! 1. it dumps the thread's seccomp filters (`PTRACE_SECCOMP_GET_FILTER`, the very programs
//!    the kernel runs for it) and reads its credentials and capabilities;
//! 2. a child joins each of the thread's namespaces (pid, network, IPC, UTS, cgroup, user,
//!    mount: so its root is the monitor's jail), takes the thread's uid, gid, groups,
//!    capability sets, no_new_privs and dumpability, and the parent checks on the host that
//!    its `/proc/PID/status` says the same as the thread's (`creds` line);
//! 3. the child installs the same filters, oldest first, with one change: where a filter
//!    would kill, it answers with errno 4000 instead, and a filter's own errno N comes back
//!    as 3000 + N, so that the probe lives to try everything and tells a filter's verdict from
//!    the kernel's;
//! 4. it tries to open, write, signal, connect to and call what an attacker would want, and
//!    prints one line per attempt: `category<TAB>target<TAB>result`, the result being `ok`,
//!    `seccomp: killed`, `seccomp: errno N` or the kernel's error (`ENOENT`, ...).
//!
//! What it cannot take over is the monitor's own descriptors and memory: the test lists the
//! descriptors (`/proc/PID/fd`) beside this report.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The errno a rewritten "kill" answers with.
const KILLED: i32 = 4000;
/// A filter's own errno N comes back as this plus N.
const FILTER_ERRNO: i32 = 3000;

const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const SECCOMP_RET_ACTION_FULL: u32 = 0xffff_0000;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_KILL_THREAD: u32 = 0;
const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const BPF_RET_K: u16 = 0x06;

fn die(what: &str) -> ! {
    eprintln!("husk-probe: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(2)
}

#[derive(Debug, Default)]
struct Args {
    pid: i32,
    tid: i32,
    victim: Option<i32>,
    abstract_name: Option<String>,
    tcp: Option<u16>,
    paths: Vec<String>,
}

fn args() -> Args {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| die(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--pid" => a.pid = value().parse().unwrap_or_else(|_| die("--pid")),
            "--tid" => a.tid = value().parse().unwrap_or_else(|_| die("--tid")),
            "--victim" => a.victim = Some(value().parse().unwrap_or_else(|_| die("--victim"))),
            "--abstract" => a.abstract_name = Some(value()),
            "--tcp" => a.tcp = Some(value().parse().unwrap_or_else(|_| die("--tcp"))),
            "--path" => a.paths.push(value()),
            other => die(&format!("unknown argument {other}")),
        }
    }
    if a.pid <= 0 || a.tid <= 0 {
        die("--pid and --tid are needed");
    }
    a
}

/// The exit status when the thread is gone before the probe could take its place (a relay
/// that finished, a command's reader): the caller skips it.
const GONE: i32 = 3;

/// The thread's filters, newest first (as the kernel numbers them), or none.
fn dump_filters(tid: i32) -> Vec<Vec<libc::sock_filter>> {
    // SAFETY: ptrace requests on a thread id with integer arguments; SEIZE and INTERRUPT
    // stop the thread until DETACH, and waitpid waits for that stop.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) != 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
                println!("thread\tgone\t{tid}");
                std::process::exit(GONE);
            }
            die("PTRACE_SEIZE");
        }
        if libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) != 0 {
            die("PTRACE_INTERRUPT");
        }
        let mut status = 0;
        if libc::waitpid(tid, &mut status, libc::__WALL) != tid {
            die("waitpid on the seized thread");
        }
    }
    let mut filters = Vec::new();
    for index in 0.. {
        // SAFETY: a null buffer asks only for the length.
        let len = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as libc::c_long,
                std::ptr::null_mut::<libc::c_void>(),
            )
        };
        if len < 0 {
            break;
        }
        let empty = libc::sock_filter {
            code: 0,
            jt: 0,
            jf: 0,
            k: 0,
        };
        let mut program = vec![empty; usize::try_from(len).unwrap_or(0)];
        // SAFETY: the buffer holds `len` instructions, which is what the kernel writes.
        let got = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as libc::c_long,
                program.as_mut_ptr(),
            )
        };
        if got != len {
            die("PTRACE_SECCOMP_GET_FILTER");
        }
        filters.push(program);
    }
    // SAFETY: detaching the thread seized above lets it run on.
    unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
    filters
}

/// Kills become errno KILLED, a filter's errno N becomes FILTER_ERRNO + N.
fn relabel(program: &mut [libc::sock_filter]) {
    for insn in program.iter_mut().filter(|i| i.code == BPF_RET_K) {
        let action = insn.k & SECCOMP_RET_ACTION_FULL;
        if matches!(
            action,
            SECCOMP_RET_KILL_PROCESS | SECCOMP_RET_KILL_THREAD | SECCOMP_RET_TRAP
        ) {
            insn.k = SECCOMP_RET_ERRNO | KILLED.cast_unsigned();
        } else if action == SECCOMP_RET_ERRNO {
            let errno = insn.k & 0xffff;
            insn.k = SECCOMP_RET_ERRNO | (FILTER_ERRNO.cast_unsigned() + errno.min(999));
        }
    }
}

/// `if (nr == seccomp) return ALLOW;` (x86_64, which is all the probe runs as).
fn let_seccomp_through() -> [libc::sock_filter; 3] {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    [
        libc::sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: JEQ_K,
            jt: 0,
            jf: 1,
            k: u32::try_from(libc::SYS_seccomp).unwrap_or(u32::MAX),
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ]
}

fn install(program: &mut [libc::sock_filter]) {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).unwrap_or_else(|_| die("a filter too long")),
        filter: program.as_mut_ptr(),
    };
    // SAFETY: seccomp(2) reads the program through `prog`, which points at live memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &raw const prog,
        )
    };
    if rc != 0 {
        die("installing a filter");
    }
}

/// One field of a `/proc/.../status` file.
fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn hex(status: &str, name: &str) -> u64 {
    u64::from_str_radix(&field(status, name), 16).unwrap_or(0)
}

/// The first host id of a `uid_map`/`gid_map` whose namespace id is `inside`, as the
/// (namespace id, host id, count) lines map it; `id` is a host id, the result the namespace's.
fn to_namespace(map: &str, id: u32) -> u32 {
    for line in map.lines() {
        let v: Vec<u32> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [inside, outside, count] = v[..]
            && id >= outside
            && id - outside < count
        {
            return inside + (id - outside);
        }
    }
    die(&format!(
        "host id {id} is not mapped in the monitor's namespace"
    ))
}

fn open_ns(pid: i32, tid: i32, name: &str) -> (OwnedFd, u64) {
    let path = format!("/proc/{pid}/task/{tid}/ns/{name}");
    let file = std::fs::File::open(&path).unwrap_or_else(|_| die(&path));
    let ino = std::os::unix::fs::MetadataExt::ino(&file.metadata().unwrap_or_else(|_| die(&path)));
    (file.into(), ino)
}

fn own_ns(name: &str) -> u64 {
    let path = format!("/proc/self/ns/{name}");
    std::fs::metadata(&path)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or_else(|_| die(&path))
}

fn setns(fd: &OwnedFd, what: &str) {
    // SAFETY: setns takes a namespace descriptor and a type (0: any).
    if unsafe { libc::setns(fd.as_raw_fd(), 0) } != 0 {
        die(&format!("setns {what}"));
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        die("pipe2");
    }
    // SAFETY: both descriptors were just made and belong to nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn main() {
    let a = args();
    let Ok(status) = std::fs::read_to_string(format!("/proc/{}/task/{}/status", a.pid, a.tid))
    else {
        println!("thread\tgone\t{}", a.tid);
        std::process::exit(GONE);
    };
    let uid_map = std::fs::read_to_string(format!("/proc/{}/uid_map", a.pid))
        .unwrap_or_else(|_| die("uid_map"));
    let gid_map = std::fs::read_to_string(format!("/proc/{}/gid_map", a.pid))
        .unwrap_or_else(|_| die("gid_map"));
    let mut filters = dump_filters(a.tid);
    println!("filters\tcount\t{}", filters.len());
    // The pid namespace is entered by the child (setns applies to children).
    let (pid_ns, pid_ino) = open_ns(a.pid, a.tid, "pid");
    if pid_ino != own_ns("pid") {
        setns(&pid_ns, "pid");
    }
    let others: Vec<(&str, OwnedFd, u64)> = ["net", "ipc", "uts", "cgroup", "user", "mnt"]
        .into_iter()
        .map(|n| {
            let (fd, ino) = open_ns(a.pid, a.tid, n);
            (n, fd, ino)
        })
        .collect();
    let (ready_r, ready_w) = pipe();
    let (go_r, go_w) = pipe();
    let _ = std::io::stdout().flush();
    // SAFETY: this program is single-threaded; the child only runs the code below.
    let child = unsafe { libc::fork() };
    if child < 0 {
        die("fork");
    }
    if child == 0 {
        drop((ready_r, go_w));
        take_place(&a, &status, &uid_map, &gid_map, &others);
        // Ready: the parent compares our status with the thread's.
        let _ = nix_write(&ready_w, b"r");
        drop(ready_w);
        let mut b = [0u8];
        // SAFETY: reads one byte into `b`.
        unsafe { libc::read(go_r.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        // Oldest first. A filter that is not the last lets the next `seccomp` call through
        // (three instructions in front of it): the thread's filters were installed while
        // it could still make that call, the probe's go on one after the other.
        let newest = filters.len().saturating_sub(1);
        for (i, program) in filters.iter_mut().rev().enumerate() {
            relabel(program);
            if i < newest {
                program.splice(0..0, let_seccomp_through());
            }
            install(program);
        }
        attempts(&a);
        // SAFETY: ends the child without the parent's exit handlers.
        unsafe { libc::_exit(0) }
    }
    drop((ready_w, go_r));
    let mut b = [0u8];
    // SAFETY: reads one byte into `b`.
    let n = unsafe { libc::read(ready_r.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
    if n == 1 {
        let mine = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap_or_default();
        let mut differ = Vec::new();
        for name in [
            "Uid",
            "Gid",
            "Groups",
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
        ] {
            if field(&mine, name) != field(&status, name) {
                differ.push(format!(
                    "{name} {} (thread: {})",
                    field(&mine, name),
                    field(&status, name)
                ));
            }
        }
        let mine_ns: Vec<String> = ["pid", "net", "ipc", "uts", "cgroup", "user", "mnt"]
            .into_iter()
            .filter(|n| {
                let theirs = std::fs::read_link(format!("/proc/{}/task/{}/ns/{n}", a.pid, a.tid));
                let ours = std::fs::read_link(format!("/proc/{child}/ns/{n}"));
                theirs.ok() != ours.ok()
            })
            .map(String::from)
            .collect();
        if !mine_ns.is_empty() {
            differ.push(format!("namespaces {}", mine_ns.join(",")));
        }
        let verdict = if differ.is_empty() {
            "same".to_string()
        } else {
            differ.join("; ")
        };
        println!("creds\tas the thread\t{verdict}");
        let _ = std::io::stdout().flush();
    }
    let _ = nix_write(&go_w, b"g");
    drop(go_w);
    let mut st = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(child, &mut st, 0) };
    if !libc::WIFEXITED(st) || libc::WEXITSTATUS(st) != 0 {
        println!("probe\tended\tstatus {st:#x}");
        std::process::exit(1);
    }
}

fn nix_write(fd: &OwnedFd, data: &[u8]) -> isize {
    // SAFETY: writes `data`, which outlives the call.
    unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) }
}

/// In the child: the thread's namespaces and credentials.
fn take_place(a: &Args, status: &str, uid_map: &str, gid_map: &str, ns: &[(&str, OwnedFd, u64)]) {
    // The namespaces owned by the host's user namespace first, while this is root there.
    for (name, fd, ino) in ns {
        if matches!(*name, "user" | "mnt") || *ino == own_ns(name) {
            continue;
        }
        setns(fd, name);
    }
    for (name, fd, ino) in ns {
        if *name == "user" && *ino != own_ns("user") {
            setns(fd, "user");
        }
    }
    for (name, fd, _) in ns {
        if *name == "mnt" {
            setns(fd, "mnt");
        }
    }
    // SAFETY: chdir with a static NUL-terminated path.
    unsafe { libc::chdir(c"/".as_ptr()) };
    let ids = |name: &str, map: &str| -> Vec<u32> {
        field(status, name)
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .map(|id| to_namespace(map, id))
            .collect()
    };
    let uids = ids("Uid", uid_map);
    let gids = ids("Gid", gid_map);
    let groups: Vec<libc::gid_t> = field(status, "Groups")
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .map(|g| to_namespace(gid_map, g))
        .collect();
    // Bounding set first (dropping needs CAP_SETPCAP, which the effective set may lose).
    let bnd = hex(status, "CapBnd");
    for cap in 0..64u64 {
        if bnd & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments; an unknown capability is EINVAL, ignored.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        }
    }
    // SAFETY: prctl, setgroups, setres[ug]id with integers and a live slice.
    unsafe {
        libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0);
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
            die("setgroups");
        }
        if libc::setresgid(gids[0], gids[1], gids[2]) != 0 {
            die("setresgid");
        }
        if libc::setresuid(uids[0], uids[1], uids[2]) != 0 {
            die("setresuid");
        }
    }
    let (eff, prm, inh) = (
        hex(status, "CapEff"),
        hex(status, "CapPrm"),
        hex(status, "CapInh"),
    );
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let low = |v: u64| u32::try_from(v & 0xffff_ffff).unwrap_or(0);
    let data = [
        Data {
            effective: low(eff),
            permitted: low(prm),
            inheritable: low(inh),
        },
        Data {
            effective: low(eff >> 32),
            permitted: low(prm >> 32),
            inheritable: low(inh >> 32),
        },
    ];
    // SAFETY: capset reads the header and two data records, which live on this stack.
    if unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) } != 0 {
        die("capset");
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        if field(status, "NoNewPrivs") == "1" {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        }
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let _ = a;
}

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
fn attempts(a: &Args) {
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
