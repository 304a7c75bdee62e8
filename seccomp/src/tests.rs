//! The filters are tested where they matter, in a process that installed them: each
//! `child_*` test re-runs this test binary with `CHILD` set to its own name (and an
//! argument), and the copy runs the test's body instead of spawning. A denied syscall has to kill that copy with
//! `SIGSYS`, and a thread of each kind has to live through its usual work and exit.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::os::unix::thread::JoinHandleExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

const CHILD: &str = "HUSK_SECCOMP_TEST_CHILD";
const FILTERS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/filters/x86_64-gnu.json"
));

// BPF return values (linux/seccomp.h) and instruction class.
const BPF_RET: u16 = 0x06;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

/// `_IO(type, nr)` from linux/ioctl.h: no direction, no size.
const fn io(ty: u32, nr: u32) -> u32 {
    (ty << 8) | nr
}
/// `_IOR(type, nr, size)`.
const fn ior(ty: u32, nr: u32, size: u32) -> u32 {
    (2 << 30) | (size << 16) | (ty << 8) | nr
}
/// `_IOW(type, nr, size)`.
const fn iow(ty: u32, nr: u32, size: u32) -> u32 {
    (1 << 30) | (size << 16) | (ty << 8) | nr
}
const KVMIO: u32 = 0xAE;
const KVM_RUN: u32 = io(KVMIO, 0x80);
/// `_IOW(KVMIO, 0x76, struct kvm_irqfd)` (32 bytes): a VM ioctl only the setup may make.
const KVM_IRQFD: u32 = iow(KVMIO, 0x76, 32);
/// `_IOWR(type, nr, size)`.
const fn iowr(ty: u32, nr: u32, size: u32) -> u32 {
    (3 << 30) | (size << 16) | (ty << 8) | nr
}
/// The size of a KVM structure, as the `_IO*` macros encode it.
fn size<T>() -> u32 {
    u32::try_from(std::mem::size_of::<T>()).unwrap()
}
/// `_IOW(KVMIO, 0x82, struct kvm_regs)`: a vCPU ioctl the filter denies (a snapshot only reads).
fn kvm_set_regs() -> u32 {
    iow(KVMIO, 0x82, size::<kvm_bindings::kvm_regs>())
}

fn returns(program: &[sock_filter]) -> Vec<u32> {
    program
        .iter()
        .filter(|i| i.code == BPF_RET)
        .map(|i| i.k)
        .collect()
}

fn json() -> HashMap<String, Value> {
    serde_json::from_str(FILTERS).expect("the filter file is JSON")
}

fn rules(kind: ThreadKind) -> Vec<Value> {
    json()[kind.name()]["filter"]
        .as_array()
        .expect("a rule list")
        .clone()
}

#[test]
fn every_filter_is_compiled_and_kills_or_logs_by_default() {
    let count = |program: &[sock_filter], action| {
        returns(program)
            .into_iter()
            .filter(|k| *k == action)
            .count()
    };
    for kind in ThreadKind::ALL {
        let enforce = filter(kind, Mode::Enforce);
        let log = filter(kind, Mode::Log);
        // Architecture check (3), syscall load (1), two or more per syscall, default (1).
        assert!(
            enforce.len() > 5 + 2 * 10,
            "{kind}: {} instructions",
            enforce.len()
        );
        assert_eq!(
            enforce.len(),
            log.len(),
            "{kind}: the modes differ in actions only"
        );
        assert_eq!(
            enforce.last().map(|i| i.k),
            Some(RET_KILL_PROCESS),
            "{kind}"
        );
        assert_eq!(log.last().map(|i| i.k), Some(RET_LOG), "{kind}");
        assert!(count(enforce, RET_ALLOW) > 0, "{kind}");
        // In log mode only a foreign architecture still kills.
        assert_eq!(count(log, RET_KILL_PROCESS), 1, "{kind}");
        assert_eq!(log[2].k, RET_KILL_PROCESS, "{kind}: the architecture check");
    }
    for (companion, errno) in [(programs::OPENAT_EACCES, 13), (programs::CLONE3_ENOSYS, 38)] {
        assert_eq!(
            count(companion, RET_ERRNO | errno),
            1,
            "answers errno {errno}"
        );
        assert_eq!(
            companion.last().map(|i| i.k),
            Some(RET_ALLOW),
            "the rest is allowed"
        );
    }
}

/// Every thread goes through glibc's malloc, std's thread exit and panic = abort, so every
/// filter needs the syscalls those make, whatever the thread does.
#[test]
fn every_filter_allows_the_runtime_baseline() {
    const BASELINE: &[&str] = &[
        "write",
        "futex",
        "sched_yield",
        "clock_gettime",
        "getrandom",
        "brk",
        "mmap",
        "munmap",
        "mremap",
        "mprotect",
        "madvise",
        "openat",
        "rt_sigreturn",
        "rt_sigprocmask",
        "sigaltstack",
        "restart_syscall",
        "gettid",
        "getpid",
        "tgkill",
        "exit",
        "exit_group",
    ];
    for kind in ThreadKind::ALL {
        let names: Vec<String> = rules(kind)
            .iter()
            .map(|r| r["syscall"].as_str().unwrap().to_owned())
            .collect();
        for syscall in BASELINE {
            assert!(names.iter().any(|n| n == syscall), "{kind} lacks {syscall}");
        }
    }
}

/// The JSON holds numbers with the constant's name in a comment; check each against its
/// definition so a typo cannot open (or close) the wrong door.
/// `_IOR(KVMIO, nr, T)`.
fn kvm_ior<T>(nr: u32) -> u64 {
    u64::from(ior(KVMIO, nr, size::<T>()))
}

#[test]
fn argument_values_match_the_constants_they_name() {
    let int = |v: libc::c_int| u64::try_from(v).unwrap();
    let known: &[(&str, u64)] = &[
        ("AF_UNIX", int(libc::AF_UNIX)),
        ("F_GETFD", int(libc::F_GETFD)),
        ("F_DUPFD_CLOEXEC", int(libc::F_DUPFD_CLOEXEC)),
        ("F_GETFL", int(libc::F_GETFL)),
        ("F_SETFL", int(libc::F_SETFL)),
        ("FIONBIO", libc::FIONBIO),
        ("TIOCGWINSZ", libc::TIOCGWINSZ),
        ("SOL_SOCKET", int(libc::SOL_SOCKET)),
        ("SO_RCVTIMEO", int(libc::SO_RCVTIMEO)),
        ("PR_SET_NAME", int(libc::PR_SET_NAME)),
        ("PR_SET_NO_NEW_PRIVS", int(libc::PR_SET_NO_NEW_PRIVS)),
        (
            "SECCOMP_SET_MODE_FILTER",
            u64::from(libc::SECCOMP_SET_MODE_FILTER),
        ),
        (
            "CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM|CLONE_SETTLS|CLONE_PARENT_SETTID|CLONE_CHILD_CLEARTID",
            int(libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM
                | libc::CLONE_SETTLS
                | libc::CLONE_PARENT_SETTID
                | libc::CLONE_CHILD_CLEARTID),
        ),
        ("KVM_RUN", u64::from(KVM_RUN)),
        // What a paused vCPU reads for a snapshot (VM templates).
        (
            "KVM_GET_MP_STATE",
            kvm_ior::<kvm_bindings::kvm_mp_state>(0x98),
        ),
        ("KVM_GET_REGS", kvm_ior::<kvm_bindings::kvm_regs>(0x81)),
        ("KVM_GET_SREGS", kvm_ior::<kvm_bindings::kvm_sregs>(0x83)),
        ("KVM_GET_XSAVE", kvm_ior::<kvm_bindings::kvm_xsave>(0xa4)),
        ("KVM_GET_XCRS", kvm_ior::<kvm_bindings::kvm_xcrs>(0xa6)),
        (
            "KVM_GET_DEBUGREGS",
            kvm_ior::<kvm_bindings::kvm_debugregs>(0xa1),
        ),
        (
            "KVM_GET_LAPIC",
            kvm_ior::<kvm_bindings::kvm_lapic_state>(0x8e),
        ),
        (
            "KVM_GET_VCPU_EVENTS",
            kvm_ior::<kvm_bindings::kvm_vcpu_events>(0x9f),
        ),
        // `_IOWR` with the fixed head of a flexible array (`nent`/`nmsrs` and padding).
        ("KVM_GET_CPUID2", u64::from(iowr(KVMIO, 0x91, 8))),
        ("KVM_GET_MSRS", u64::from(iowr(KVMIO, 0x88, 8))),
        ("MADV_DONTNEED", int(libc::MADV_DONTNEED)),
        ("PROT_EXEC", int(libc::PROT_EXEC)),
        ("SIGABRT", int(libc::SIGABRT)),
        ("SIGRTMIN", int(libc::SIGRTMIN())),
        ("TUNSETOFFLOAD", libc::TUNSETOFFLOAD),
    ];
    assert_eq!(KVM_RUN, 0xAE80);
    let mut checked = 0;
    for (name, filter) in json() {
        for rule in filter["filter"].as_array().unwrap() {
            for arg in rule["args"].as_array().into_iter().flatten() {
                let comment = arg["comment"].as_str().expect("every condition is named");
                if arg["val"] == "own_tgid" {
                    assert!(comment.contains("own tgid"), "{name}: {comment:?}");
                    assert_eq!(arg["index"], 0, "{name}: own_tgid is tgkill's tgid");
                    checked += 1;
                    continue;
                }
                let named: Vec<_> = known.iter().filter(|(c, _)| comment.contains(c)).collect();
                let [(constant, value)] = named[..] else {
                    panic!("{name}: {comment:?} must name exactly one known constant");
                };
                // A masked comparison tests bits of the constant: the mask is the value.
                let actual = arg["op"]["masked_eq"].as_u64().or(arg["val"].as_u64());
                assert_eq!(actual, Some(*value), "{name}: {constant}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} conditions checked");
}

// ---- Child processes --------------------------------------------------------------------

/// In the copy of the test binary that runs `test`'s child body: the argument it got.
fn child_role(test: &str) -> Option<String> {
    let role = std::env::var(CHILD).ok()?;
    let (name, arg) = role.split_once(':').unwrap_or((&role, ""));
    (name == test).then(|| arg.to_owned())
}

/// Runs `body` as the whole of this process and exits 0 if it returns.
fn become_child(body: impl FnOnce()) -> ! {
    // A SIGSYS kill would otherwise dump core.
    // SAFETY: prctl(PR_SET_DUMPABLE) takes integers and touches no memory of ours.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) }, 0);
    body();
    // SAFETY: _exit ends the process at once, nothing needs unwinding, and exit_group is
    // in every filter.
    unsafe { libc::_exit(0) }
}

/// Runs `test` alone in a fresh copy of this test binary, as the child with `arg`.
fn run_child(test: &str, arg: &str) -> Output {
    let exe = std::env::current_exe().expect("the test binary");
    Command::new(exe)
        .args([
            &format!("tests::{test}"),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, format!("{test}:{arg}"))
        // The backtrace printer reads files and getcwd, which no filter allows.
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run the test binary")
}

/// In the parent: runs `test` in a child and returns what it did. In the child: runs
/// `body` and exits.
fn in_child(test: &str, body: impl FnOnce()) -> Option<Output> {
    if child_role(test).is_some() {
        become_child(body);
    }
    Some(run_child(test, ""))
}

/// Writes `line` to stdout with one `write(2)`, which every filter allows.
fn say(line: &str) {
    let line = format!("{line}\n");
    // SAFETY: the pointer and length describe `line`, which outlives the call.
    let n = unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
    assert_eq!(usize::try_from(n).ok(), Some(line.len()));
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn assert_killed_by_seccomp(output: &Output, reached: &str, not_reached: &str) {
    let out = stdout(output);
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGSYS),
        "status {:?}\nstdout:\n{out}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        out.contains(reached),
        "allowed syscalls must work first:\n{out}"
    );
    assert!(
        !out.contains(not_reached),
        "the denied syscall returned:\n{out}"
    );
}

fn assert_lived(output: &Output, marker: &str) {
    let out = stdout(output);
    assert!(
        output.status.success(),
        "status {:?}\nstdout:\n{out}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(out.contains(marker), "{out}");
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn raw_ioctl(fd: &OwnedFd, request: u32) -> (libc::c_int, i32) {
    // SAFETY: neither request reads or writes memory through the third argument on a pipe
    // (the kernel rejects them with ENOTTY before looking at it), and it is null anyway.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::c_ulong::from(request), 0) };
    (
        rc,
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
    )
}

fn raw_socket(domain: libc::c_int) -> libc::c_int {
    // SAFETY: socket takes integers only; a returned descriptor is closed by the caller.
    unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) }
}

fn close(fd: libc::c_int) {
    // SAFETY: `fd` was returned to the caller by socket() and is closed once, here.
    unsafe { libc::close(fd) };
}

#[test]
fn child_vcpu_filter_kills_a_denied_syscall() {
    let Some(output) = in_child("child_vcpu_filter_kills_a_denied_syscall", || {
        let (_r, w) = pipe();
        apply(ThreadKind::Vcpu).unwrap();
        // SAFETY: writes one byte from a static buffer to a pipe we own.
        let written = unsafe { libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        assert_eq!(written, 1);
        say("write to a pipe: allowed");
        assert_eq!(raw_ioctl(&w, KVM_RUN), (-1, libc::ENOTTY));
        say("ioctl(KVM_RUN): allowed");
        raw_socket(libc::AF_UNIX);
        say("socket: survived");
    }) else {
        return;
    };
    assert_killed_by_seccomp(&output, "ioctl(KVM_RUN): allowed", "socket: survived");
}

#[test]
fn child_vcpu_filter_kills_other_kvm_ioctls() {
    let Some(output) = in_child("child_vcpu_filter_kills_other_kvm_ioctls", || {
        let (_r, w) = pipe();
        apply(ThreadKind::Vcpu).unwrap();
        say("filtered");
        raw_ioctl(&w, kvm_set_regs());
        say("KVM_SET_REGS: survived");
    }) else {
        return;
    };
    assert_killed_by_seccomp(&output, "filtered", "KVM_SET_REGS: survived");
}

#[test]
fn child_vmm_filter_allows_unix_sockets_and_kills_inet() {
    let Some(output) = in_child(
        "child_vmm_filter_allows_unix_sockets_and_kills_inet",
        || {
            apply(ThreadKind::Vmm).unwrap();
            let fd = raw_socket(libc::AF_UNIX);
            assert!(
                fd >= 0,
                "socket(AF_UNIX): {}",
                std::io::Error::last_os_error()
            );
            close(fd);
            say("socket(AF_UNIX): allowed");
            raw_socket(libc::AF_INET);
            say("socket(AF_INET): survived");
        },
    ) else {
        return;
    };
    assert_killed_by_seccomp(
        &output,
        "socket(AF_UNIX): allowed",
        "socket(AF_INET): survived",
    );
}

#[test]
fn child_vm_wait_filter_kills_a_denied_syscall() {
    let Some(output) = in_child("child_vm_wait_filter_kills_a_denied_syscall", || {
        apply(ThreadKind::VmWait).unwrap();
        say("filtered");
        raw_socket(libc::AF_UNIX);
        say("socket: survived");
    }) else {
        return;
    };
    assert_killed_by_seccomp(&output, "filtered", "socket: survived");
}

/// `getppid`: harmless, and in no thread's list.
fn raw_getppid() {
    // SAFETY: getppid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_getppid) };
}

/// `ioctl(FIONBIO)` is the one request the vmm and monitor threads may make (std's
/// `set_nonblocking`); it must get through to the kernel, which answers EFAULT here because
/// the argument pointer is null.
fn fionbio_allowed(fd: &OwnedFd) {
    let request = u32::try_from(libc::FIONBIO).unwrap();
    assert_eq!(raw_ioctl(fd, request), (-1, libc::EFAULT));
    say("ioctl(FIONBIO): allowed");
}

#[test]
fn child_vmm_filter_kills_a_denied_syscall() {
    let Some(output) = in_child("child_vmm_filter_kills_a_denied_syscall", || {
        apply(ThreadKind::Vmm).unwrap();
        say("filtered");
        raw_getppid();
        say("getppid: survived");
    }) else {
        return;
    };
    assert_killed_by_seccomp(&output, "filtered", "getppid: survived");
}

/// The event loop never makes a KVM ioctl: irqfds and ioeventfds are registered before the
/// filter goes on.
#[test]
fn child_vmm_filter_kills_a_kvm_ioctl() {
    let Some(output) = in_child("child_vmm_filter_kills_a_kvm_ioctl", || {
        let (_r, w) = pipe();
        apply(ThreadKind::Vmm).unwrap();
        fionbio_allowed(&w);
        raw_ioctl(&w, KVM_IRQFD);
        say("KVM_IRQFD: survived");
    }) else {
        return;
    };
    assert_killed_by_seccomp(&output, "ioctl(FIONBIO): allowed", "KVM_IRQFD: survived");
}

#[test]
fn child_vm_wait_filter_kills_a_kvm_ioctl() {
    let Some(output) = in_child("child_vm_wait_filter_kills_a_kvm_ioctl", || {
        let (_r, w) = pipe();
        apply(ThreadKind::VmWait).unwrap();
        say("filtered");
        raw_ioctl(&w, KVM_RUN);
        say("KVM_RUN: survived");
    }) else {
        return;
    };
    assert_killed_by_seccomp(&output, "filtered", "KVM_RUN: survived");
}

/// Any filter kills what is in none of them, and what the monitor's own threads never make:
/// a socket other than a Unix one, a process (fork's clone flags), an exec.
#[test]
fn child_every_filter_kills_what_no_thread_makes() {
    const TEST: &str = "child_every_filter_kills_what_no_thread_makes";
    if let Some(arg) = child_role(TEST) {
        become_child(|| {
            let (name, what) = arg.split_once('/').unwrap();
            let kind = ThreadKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .unwrap();
            apply(kind).unwrap();
            say("filtered");
            match what {
                "getppid" => raw_getppid(),
                "inet" => close(raw_socket(libc::AF_INET)),
                // SAFETY: fork's child (if it ever ran) only _exits.
                "fork" => unsafe {
                    if libc::fork() == 0 {
                        libc::_exit(0);
                    }
                },
                // SAFETY: a path that does not exist; nothing is executed.
                "execve" => unsafe {
                    libc::execve(c"/nonexistent".as_ptr(), std::ptr::null(), std::ptr::null());
                },
                other => panic!("{other}"),
            }
            say("survived");
        });
    }
    for kind in ThreadKind::ALL {
        for what in ["getppid", "inet", "fork", "execve"] {
            let output = run_child(TEST, &format!("{}/{what}", kind.name()));
            assert!(
                output.status.signal() == Some(libc::SIGSYS)
                    && stdout(&output).contains("filtered")
                    && !stdout(&output).contains("survived"),
                "{kind}: {what}: {output:?}"
            );
        }
    }
}

#[test]
fn child_vcpu_filter_kills_another_denied_syscall() {
    let Some(output) = in_child("child_vcpu_filter_kills_another_denied_syscall", || {
        apply(ThreadKind::Vcpu).unwrap();
        say("filtered");
        raw_getppid();
        say("getppid: survived");
    }) else {
        return;
    };
    assert_killed_by_seccomp(&output, "filtered", "getppid: survived");
}

#[test]
fn child_log_mode_logs_instead_of_killing() {
    let Some(output) = in_child("child_log_mode_logs_instead_of_killing", || {
        apply_with(ThreadKind::Vcpu, Mode::Log).unwrap();
        let fd = raw_socket(libc::AF_INET);
        assert!(
            fd >= 0,
            "socket(AF_INET): {}",
            std::io::Error::last_os_error()
        );
        close(fd);
        say("socket(AF_INET): logged and allowed");
    }) else {
        return;
    };
    assert_lived(&output, "socket(AF_INET): logged and allowed");
}

/// With `panic = abort` (the release profile) a panic ends in abort(); under every filter
/// that must still be a SIGABRT, not a seccomp kill that hides the panic.
#[test]
fn child_abort_under_any_filter_is_sigabrt() {
    const TEST: &str = "child_abort_under_any_filter_is_sigabrt";
    if let Some(name) = child_role(TEST) {
        become_child(|| {
            let kind = ThreadKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .unwrap();
            apply(kind).unwrap();
            say("filtered");
            std::process::abort();
        });
    }
    for kind in ThreadKind::ALL {
        let output = run_child(TEST, kind.name());
        assert_eq!(
            output.status.signal(),
            Some(libc::SIGABRT),
            "{kind}: {output:?}"
        );
        assert!(stdout(&output).contains("filtered"), "{kind}");
    }
}

/// A panic in a filtered thread prints its message and unwinds to the joiner.
#[test]
fn child_panic_under_a_filter_is_reported() {
    let Some(output) = in_child("child_panic_under_a_filter_is_reported", || {
        let joined = std::thread::spawn(|| {
            apply(ThreadKind::Vcpu).unwrap();
            panic!("a vCPU bug");
        })
        .join();
        assert!(joined.is_err());
        say("joined the panicked thread");
    }) else {
        return;
    };
    assert_lived(&output, "joined the panicked thread");
    assert!(String::from_utf8_lossy(&output.stderr).contains("a vCPU bug"));
}

// ---- A thread of each kind lives and dies under its filter ------------------------------

/// The work std and glibc do in any thread: allocate and free (small, large, enough to make
/// glibc trim the arena, which is when it probes overcommit with openat), hash, take time,
/// use a channel. Also checks that openat is answered with EACCES.
fn runtime_work() {
    let small: Vec<Box<[u8; 1000]>> = (0..5000).map(|_| Box::new([1; 1000])).collect();
    drop(std::hint::black_box(small));
    let mut big = vec![0_u8; 4 << 20];
    big.resize(16 << 20, 1); // realloc of an mmapped chunk: mremap
    drop(std::hint::black_box(big));
    let map: HashMap<u32, u32> = (0..100).map(|i| (i, i)).collect();
    assert_eq!(map.len(), 100);
    assert!(Instant::now().elapsed() < Duration::from_secs(60));
    let (tx, rx) = mpsc::channel();
    tx.send(1).unwrap();
    assert_eq!(rx.recv().unwrap(), 1);
}

/// openat is answered with EACCES on every thread but the vmm thread (virtio-fs).
fn check_openat(kind: ThreadKind) {
    let path = CString::new("/proc/self/status").unwrap();
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    if kind.opens_files() {
        assert!(
            fd >= 0,
            "the {kind} thread must be able to open files: {errno:?}"
        );
        // SAFETY: fd was just opened by us.
        unsafe { libc::close(fd) };
    } else {
        assert_eq!(
            (fd, errno),
            (-1, Some(libc::EACCES)),
            "openat must fail with EACCES"
        );
    }
}

/// A scratch directory a child process uses for its sockets, named after the test process
/// (the child's parent), which removes it when the child is done.
fn scratch_dir(test_pid: u32, label: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("husk-seccomp-{test_pid}-{label}"))
}

/// Spawns a thread that filters itself as `kind`, runs `work`, and exits; joins it.
fn live_and_exit(kind: ThreadKind, work: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        apply(kind).unwrap();
        runtime_work();
        check_openat(kind);
        work();
        say(&format!("{kind}: work done"));
    })
    .join()
    .unwrap();
    say(&format!("{kind}: thread exited"));
}

#[test]
fn child_vcpu_thread_lives_under_its_filter() {
    static KICKED: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_kick(_: libc::c_int) {
        KICKED.store(true, Ordering::SeqCst);
    }
    let Some(output) = in_child("child_vcpu_thread_lives_under_its_filter", || {
        // SAFETY: installs a handler that only stores to an atomic (async-signal-safe);
        // the sigaction struct is zeroed then filled in, as the C API expects.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_kick as *const () as libc::sighandler_t;
            assert_eq!(
                libc::sigaction(libc::SIGRTMIN(), &action, std::ptr::null_mut()),
                0
            );
        }
        // SAFETY: eventfd takes integers; the descriptor is owned below.
        let efd = unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) };
        let (ready_tx, ready_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let vcpu = std::thread::spawn(move || {
            apply(ThreadKind::Vcpu).unwrap();
            runtime_work();
            // The guest's notification: an eventfd write.
            let one = 1_u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from `one` to the eventfd, as eventfd(2) requires.
            let n = unsafe { libc::write(efd.as_raw_fd(), one.as_ptr().cast(), 8) };
            assert_eq!(n, 8);
            assert_eq!(raw_ioctl(&efd, KVM_RUN), (-1, libc::ENOTTY));
            // Paused: wait for the kick and resume, like a vCPU out of KVM_RUN.
            ready_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            say("vcpu: work done");
        });
        ready_rx.recv().unwrap();
        // SAFETY: the thread is joinable and not yet joined, so its pthread_t is valid;
        // SIGRTMIN has the handler installed above.
        let rc = unsafe { libc::pthread_kill(vcpu.as_pthread_t(), libc::SIGRTMIN()) };
        assert_eq!(rc, 0);
        while !KICKED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        go_tx.send(()).unwrap();
        vcpu.join().unwrap();
        say("vcpu: thread exited");
    }) else {
        return;
    };
    assert_lived(&output, "vcpu: thread exited");
    assert!(stdout(&output).contains("vcpu: work done"));
}

#[test]
fn child_vmm_thread_lives_under_its_filter() {
    let Some(output) = in_child("child_vmm_thread_lives_under_its_filter", || {
        let dir = scratch_dir(std::os::unix::process::parent_id(), "vmm");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock_1024");
        let listener = UnixListener::bind(&path).unwrap();
        // SAFETY: epoll_create1 and eventfd take integers; the descriptors are owned below.
        let (epoll, efd) = unsafe {
            let epoll = OwnedFd::from_raw_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC));
            (
                epoll,
                OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)),
            )
        };
        let target = path.clone();
        live_and_exit(ThreadKind::Vmm, move || {
            // The event loop: register an eventfd, see it fire, drain it.
            let mut event = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: 7,
            };
            // SAFETY: `event` is a valid epoll_event for the duration of the call.
            let rc = unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    efd.as_raw_fd(),
                    &mut event,
                )
            };
            assert_eq!(rc, 0);
            let mut file = std::fs::File::from(efd);
            file.write_all(&1_u64.to_ne_bytes()).unwrap();
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
            // SAFETY: `events` has room for the 4 events we allow the kernel to write.
            let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), 4, 1000) };
            assert_eq!(n, 1);
            let mut counter = [0; 8];
            file.read_exact(&mut counter).unwrap();

            // A guest-initiated vsock connection to a host Unix socket, and its peer.
            let mut stream = UnixStream::connect(&target).unwrap();
            let (mut accepted, _) = listener.accept().unwrap();
            accepted.set_nonblocking(true).unwrap();
            stream.write_all(b"ping").unwrap();
            let mut buf = [0; 4];
            accepted.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ping");
            // SAFETY: send/recv read and write `buf`, which outlives the calls.
            unsafe {
                let fd = accepted.as_raw_fd();
                assert_eq!(
                    libc::send(fd, buf.as_ptr().cast(), 4, libc::MSG_NOSIGNAL),
                    4
                );
                assert_eq!(
                    libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), 4, 0),
                    4
                );
                let flags = libc::fcntl(fd, libc::F_GETFL);
                assert!(flags & libc::O_NONBLOCK != 0);
                assert_eq!(libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK), 0);
            }
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }) else {
        return;
    };
    let _ = std::fs::remove_dir_all(scratch_dir(std::process::id(), "vmm"));
    assert_lived(&output, "vmm: thread exited");
}

#[test]
fn child_vm_wait_thread_lives_under_its_filter() {
    extern "C" fn ignore(_: libc::c_int) {}
    let Some(output) = in_child("child_vm_wait_thread_lives_under_its_filter", || {
        install_kick_handler(ignore);
        let dir = scratch_dir(std::os::unix::process::parent_id(), "vm-wait");
        std::fs::create_dir_all(&dir).unwrap();
        // What a VM leaves to tear down: its vsock socket, a mapping, an eventfd.
        let socket = dir.join("vsock.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        // SAFETY: an anonymous private mapping of one page, unmapped by the thread below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as usize;
        // SAFETY: eventfd takes integers; the descriptor is owned below.
        let efd = unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) };
        let (tx, rx) = mpsc::channel::<()>();
        let vcpu = std::thread::spawn(move || while rx.recv().is_ok() {});
        live_and_exit(ThreadKind::VmWait, move || {
            let mut file = std::fs::File::from(efd);
            file.write_all(&1_u64.to_ne_bytes()).unwrap();
            // Stop a vCPU: kick it, tell it to stop, join it.
            // SAFETY: `vcpu` is joinable and not yet joined, so its pthread_t is valid, and
            // SIGRTMIN has a handler.
            let rc = unsafe { libc::pthread_kill(vcpu.as_pthread_t(), libc::SIGRTMIN()) };
            assert_eq!(rc, 0);
            std::thread::sleep(Duration::from_millis(2));
            drop(tx);
            vcpu.join().unwrap();
            drop(file);
            // SAFETY: the page mapped above, unmapped once.
            assert_eq!(unsafe { libc::munmap(map as *mut libc::c_void, 4096) }, 0);
            drop(listener);
            std::fs::remove_file(&socket).unwrap();
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }) else {
        return;
    };
    let _ = std::fs::remove_dir_all(scratch_dir(std::process::id(), "vm-wait"));
    assert_lived(&output, "vm_wait: thread exited");
}

/// Installs `handler` for the vCPU kick signal.
fn install_kick_handler(handler: extern "C" fn(libc::c_int)) {
    // SAFETY: installs a handler that does nothing async-signal-unsafe; the sigaction struct
    // is zeroed then filled in, as the C API expects.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as libc::sighandler_t;
        assert_eq!(
            libc::sigaction(libc::SIGRTMIN(), &action, std::ptr::null_mut()),
            0
        );
    }
}

/// Starts a thread named `name` that filters itself as `kind` on top of what it inherited,
/// does the runtime's work and `work`, and exits; joins it.
fn spawn_filtered(name: &str, kind: ThreadKind, work: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            apply(kind).unwrap();
            runtime_work();
            check_openat(kind);
            work();
        })
        .unwrap()
        .join()
        .unwrap();
}

/// The monitor's main thread: husk-init's connection (poll, accept, send, receive), the state
/// file, an exec's terminal port, listing its directory, kicking a vCPU, and starting the
/// threads it starts, each narrowing the filter it inherits with its own.
#[test]
fn child_monitor_thread_lives_under_its_filter() {
    extern "C" fn ignore(_: libc::c_int) {}
    let Some(output) = in_child("child_monitor_thread_lives_under_its_filter", || {
        install_kick_handler(ignore);
        let dir = scratch_dir(std::os::unix::process::parent_id(), "monitor");
        std::fs::create_dir_all(&dir).unwrap();
        let control = UnixListener::bind(dir.join("vsock.sock_1024")).unwrap();
        let mut guest = UnixStream::connect(dir.join("vsock.sock_1024")).unwrap();
        guest.write_all(b"hello").unwrap();
        guest.write_all(b"frame").unwrap();
        let (tx, rx) = mpsc::channel::<()>();
        let vcpu = std::thread::spawn(move || while rx.recv().is_ok() {});
        let state_dir = dir.clone();
        live_and_exit(ThreadKind::Monitor, move || {
            control.set_nonblocking(true).unwrap();
            let mut fds = [libc::pollfd {
                fd: control.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: `fds` holds one pollfd, as the count says.
            assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) }, 1);
            let (mut conn, _) = control.accept().unwrap();
            conn.set_nonblocking(false).unwrap();
            let mut hello = [0; 5];
            conn.read_exact(&mut hello).unwrap();
            conn.write_all(b"hello").unwrap();
            let reader = conn.try_clone().unwrap();
            conn.write_all(b"frame").unwrap();
            // state.json: a new temporary file, renamed over.
            let tmp = state_dir.join(".state.json.1");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .unwrap();
            f.write_all(b"{}").unwrap();
            drop(f);
            std::fs::rename(&tmp, state_dir.join("state.json")).unwrap();
            // An exec's terminal port.
            let port = state_dir.join("vsock.sock_60001");
            let listener = UnixListener::bind(&port).unwrap();
            std::fs::remove_file(&port).unwrap();
            // Pause: kick a vCPU.
            // SAFETY: `vcpu` is joinable and not yet joined, and SIGRTMIN has a handler.
            let rc = unsafe { libc::pthread_kill(vcpu.as_pthread_t(), libc::SIGRTMIN()) };
            assert_eq!(rc, 0);
            // The threads it starts, each under this filter and its own.
            spawn_filtered("guest-reader", ThreadKind::Guest, move || {
                let mut reader = reader;
                let mut frame = vec![0u8; 8 << 20];
                conn_frame(&mut reader, &mut frame);
            });
            spawn_filtered("relay", ThreadKind::Relay, move || {
                // A terminal relay starts a copying thread per direction.
                spawn_filtered("relay", ThreadKind::Relay, move || drop(listener));
            });
            spawn_filtered("commands", ThreadKind::Commands, || {
                spawn_filtered("command", ThreadKind::Commands, || {});
            });
            std::thread::sleep(Duration::from_millis(1));
            drop(tx);
            vcpu.join().unwrap();
            // At exit: its sockets, listed and removed.
            let names: Vec<String> = std::fs::read_dir(&state_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert!(names.contains(&"state.json".to_string()), "{names:?}");
            std::fs::remove_file(state_dir.join("vsock.sock_1024")).unwrap();
        });
        let mut back = [0; 10];
        guest.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"helloframe");
        std::fs::remove_dir_all(&dir).unwrap();
    }) else {
        return;
    };
    let _ = std::fs::remove_dir_all(scratch_dir(std::process::id(), "monitor"));
    assert_lived(&output, "monitor: thread exited");
}

/// Reads a 5-byte frame into the start of `frame` (a frame's worth of memory).
fn conn_frame(conn: &mut UnixStream, frame: &mut [u8]) {
    conn.read_exact(&mut frame[..5]).unwrap();
    assert_eq!(&frame[..5], b"frame");
}

/// husk-init's connection: the reader reads, allocates up to a frame's size, hands the
/// message on, logs when the connection fails, exits; the writer writes the queued requests.
#[test]
fn child_guest_thread_lives_under_its_filter() {
    let Some(output) = in_child("child_guest_thread_lives_under_its_filter", || {
        let (mut guest, conn) = UnixStream::pair().unwrap();
        let frame = vec![7u8; 8 << 20];
        let peer = std::thread::spawn(move || {
            guest.write_all(&frame).unwrap();
            let mut request = [0u8; 7];
            guest.read_exact(&mut request).unwrap();
            request
        });
        let (tx, rx) = mpsc::channel();
        live_and_exit(ThreadKind::Guest, move || {
            let mut conn = conn;
            let mut frame = vec![0u8; 8 << 20];
            conn.read_exact(&mut frame).unwrap();
            tx.send(frame.len()).unwrap();
            conn.write_all(b"request").unwrap();
            eprintln!("control connection to husk-init: a log line");
            drop(conn);
        });
        assert_eq!(&peer.join().unwrap(), b"request");
        assert_eq!(rx.recv().unwrap(), 8 << 20);
    }) else {
        return;
    };
    assert_lived(&output, "guest: thread exited");
}

/// The control socket: accepts a command, starts a thread for it that reads its request (with
/// a read timeout, and a descriptor that came with it), answers a bad one, hands it on.
#[test]
fn child_commands_thread_lives_under_its_filter() {
    let Some(output) = in_child("child_commands_thread_lives_under_its_filter", || {
        let dir = scratch_dir(std::os::unix::process::parent_id(), "commands");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("monitor.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"{bad\n").unwrap();
        let (tx, rx) = mpsc::channel();
        live_and_exit(ThreadKind::Commands, move || {
            let (conn, _) = listener.accept().unwrap();
            spawn_filtered("command", ThreadKind::Commands, move || {
                let mut conn = conn;
                conn.set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut buf = [0u8; 64];
                let (n, _) = receive_with_fd(&conn, &mut buf);
                assert_eq!(n, 5);
                conn.set_read_timeout(None).unwrap();
                conn.write_all(b"bad request\n").unwrap();
                tx.send(()).unwrap();
            });
        });
        rx.recv().unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "bad request\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }) else {
        return;
    };
    let _ = std::fs::remove_dir_all(scratch_dir(std::process::id(), "commands"));
    assert_lived(&output, "commands: thread exited");
}

/// A relay: accepts the guest's stream, copies both ways (a terminal relay with a thread per
/// direction, polling the window size), half-closes at the end of stdin.
#[test]
fn child_relay_thread_lives_under_its_filter() {
    let Some(output) = in_child("child_relay_thread_lives_under_its_filter", || {
        let dir = scratch_dir(std::os::unix::process::parent_id(), "relay");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock.sock_1025");
        let listener = UnixListener::bind(&path).unwrap();
        let mut guest = UnixStream::connect(&path).unwrap();
        // The guest: takes the input, sends output.
        let guest = std::thread::spawn(move || {
            let mut got = [0u8; 5];
            guest.read_exact(&mut got).unwrap();
            guest.write_all(b"output").unwrap();
            got
        });
        let (stdin_r, stdin_w) = pipe();
        let (stdout_r, stdout_w) = pipe();
        let mut feed = std::fs::File::from(stdin_w);
        feed.write_all(b"input").unwrap();
        drop(feed);
        live_and_exit(ThreadKind::Relay, move || {
            let (conn, _) = listener.accept().unwrap();
            drop(listener);
            let mut to_guest = conn.try_clone().unwrap();
            let mut stdin = std::fs::File::from(stdin_r);
            let mut out = std::fs::File::from(stdout_w);
            let tty = out.as_raw_fd();
            spawn_filtered("relay", ThreadKind::Relay, move || {
                let mut buf = [0u8; 64];
                let n = stdin.read(&mut buf).unwrap();
                to_guest.write_all(&buf[..n]).unwrap();
                to_guest.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut ws: libc::winsize = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCGWINSZ writes a winsize into `ws`; on a pipe it is ENOTTY.
            let rc = unsafe { libc::ioctl(tty, libc::TIOCGWINSZ, &raw mut ws) };
            assert_eq!(rc, -1);
            std::thread::sleep(Duration::from_millis(1));
            let mut conn = conn;
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf).unwrap();
            out.write_all(&buf[..n]).unwrap();
        });
        assert_eq!(&guest.join().unwrap(), b"input");
        let mut out = String::new();
        std::fs::File::from(stdout_r)
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "output");
        std::fs::remove_dir_all(&dir).unwrap();
    }) else {
        return;
    };
    let _ = std::fs::remove_dir_all(scratch_dir(std::process::id(), "relay"));
    assert_lived(&output, "relay: thread exited");
}

/// A thread may signal only its own process: `tgkill` to another one (here a `sleep` of the
/// test's, with the signals the filters allow) kills the thread's process instead, under
/// every filter. Without that, a taken-over thread of a root monitor could signal any root
/// process of its pid namespace.
#[test]
fn child_tgkill_to_another_process_is_killed_under_any_filter() {
    const TEST: &str = "child_tgkill_to_another_process_is_killed_under_any_filter";
    if let Some(arg) = child_role(TEST) {
        become_child(|| {
            let (name, victim) = arg.split_once('/').unwrap();
            let victim: libc::pid_t = victim.parse().unwrap();
            let kind = ThreadKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .unwrap();
            apply(kind).unwrap();
            say("filtered");
            for sig in [libc::SIGABRT, libc::SIGRTMIN()] {
                // SAFETY: tgkill takes integers; the target is the test's own sleeper.
                unsafe { libc::syscall(libc::SYS_tgkill, victim, victim, sig) };
            }
            say("tgkill: survived");
        });
    }
    for kind in ThreadKind::ALL {
        let mut victim = Command::new("sleep").arg("60").spawn().unwrap();
        let output = run_child(TEST, &format!("{}/{}", kind.name(), victim.id()));
        let alive = victim.try_wait().unwrap().is_none();
        let _ = victim.kill();
        let _ = victim.wait();
        assert_killed_by_seccomp(&output, "filtered", "tgkill: survived");
        assert!(alive, "{kind}: the other process got the signal");
    }
}

/// The own pid is in every `tgkill` rule, and [`program`] fills it in everywhere.
#[test]
fn every_tgkill_rule_names_the_own_process_and_it_is_filled_in() {
    for kind in ThreadKind::ALL {
        let tgkill: Vec<Value> = rules(kind)
            .into_iter()
            .filter(|r| r["syscall"] == "tgkill")
            .collect();
        assert!(!tgkill.is_empty(), "{kind}");
        for rule in &tgkill {
            let args = rule["args"].as_array().unwrap();
            assert!(
                args.iter()
                    .any(|a| a["index"] == 0 && a["val"] == "own_tgid" && a["op"] == "eq"),
                "{kind}: a tgkill rule without the own tgid: {rule}"
            );
        }
        let raw = filter(kind, Mode::Enforce);
        let placeholders = raw.iter().filter(|i| i.k == programs::OWN_TGID).count();
        assert_eq!(placeholders, tgkill.len(), "{kind}");
        let filled = program(kind, Mode::Enforce, 4242);
        assert_eq!(filled.len(), raw.len());
        assert!(!filled.iter().any(|i| i.k == programs::OWN_TGID), "{kind}");
        assert_eq!(filled.iter().filter(|i| i.k == 4242).count(), tgkill.len());
    }
}

/// Receives a request line into `buf` with the descriptor that may come with it
/// (SCM_RIGHTS), as the control socket's readers do: what `recvmsg` returned, and the
/// descriptor.
fn receive_with_fd(conn: &UnixStream, buf: &mut [u8]) -> (isize, Option<OwnedFd>) {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg = [0u64; 8];
    // SAFETY: a zeroed msghdr is valid; it points at `iov` and `cmsg`, which outlive the call.
    // A descriptor in the control message is new to this process and owned by nobody else.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg);
        let n = libc::recvmsg(conn.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC);
        let header = libc::CMSG_FIRSTHDR(&raw const msg);
        let fd = (n >= 0 && !header.is_null()).then(|| {
            OwnedFd::from_raw_fd(
                libc::CMSG_DATA(header)
                    .cast::<libc::c_int>()
                    .read_unaligned(),
            )
        });
        (n, fd)
    }
}

/// Sends `line` on `conn` with descriptor `fd` (SCM_RIGHTS), as a request with a descriptor is
/// sent; what `sendmsg` returned.
fn send_with_fd(conn: &UnixStream, line: &[u8], fd: libc::c_int) -> isize {
    /// The size of one descriptor in a control message.
    const FD_LEN: u32 = 4;
    let mut iov = libc::iovec {
        iov_base: line.as_ptr().cast_mut().cast(),
        iov_len: line.len(),
    };
    let mut cmsg = [0u64; 4];
    // SAFETY: a zeroed msghdr is valid; it points at `iov` and `cmsg`, which outlive the call,
    // and the control message written into `cmsg` fits in it (one descriptor).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(FD_LEN) as usize;
        let header = libc::CMSG_FIRSTHDR(&raw const msg);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(FD_LEN) as usize;
        libc::CMSG_DATA(header)
            .cast::<libc::c_int>()
            .write_unaligned(fd);
        libc::sendmsg(conn.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL)
    }
}

/// A pod member: accepts a command and starts a thread for it that reads the request (with
/// its descriptor), passes it on to the sandbox's monitor (a new connection, the descriptor
/// with it), records the status in its state file (a new file, renamed) and relays the reply;
/// at the end it removes its sockets.
#[test]
fn child_member_thread_lives_under_its_filter() {
    let Some(output) = in_child("child_member_thread_lives_under_its_filter", || {
        let dir = scratch_dir(std::os::unix::process::parent_id(), "member");
        std::fs::create_dir_all(&dir).unwrap();
        let own = dir.join("monitor.sock");
        let sandbox = dir.join("sandbox.sock");
        let listener = UnixListener::bind(&own).unwrap();
        let sandbox_listener = UnixListener::bind(&sandbox).unwrap();
        // The sandbox's monitor: takes the request, answers.
        let sandbox_monitor = std::thread::spawn(move || {
            let (mut conn, _) = sandbox_listener.accept().unwrap();
            let mut got = [0u8; 8];
            conn.read_exact(&mut got).unwrap();
            conn.write_all(b"ok\n").unwrap();
            got
        });
        let mut client = UnixStream::connect(&own).unwrap();
        let (pipe_r, _pipe_w) = pipe();
        assert_eq!(send_with_fd(&client, b"request\n", pipe_r.as_raw_fd()), 8);
        let state_dir = dir.clone();
        live_and_exit(ThreadKind::Member, move || {
            let (conn, _) = listener.accept().unwrap();
            spawn_filtered("command", ThreadKind::Member, move || {
                let mut conn = conn;
                conn.set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut buf = [0u8; 64];
                let (n, fd) = receive_with_fd(&conn, &mut buf);
                let fd = fd.expect("no descriptor came with the request");
                // Passed on with the request.
                let upstream = UnixStream::connect(&sandbox).unwrap();
                upstream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                assert_eq!(send_with_fd(&upstream, &buf[..8], fd.as_raw_fd()), 8);
                let mut reply = [0u8; 3];
                (&upstream).read_exact(&mut reply).unwrap();
                assert_eq!(&reply, b"ok\n");
                assert_eq!(n, 8);
                conn.set_read_timeout(None).unwrap();
                // The status the command left, in a new state file put in place.
                let tmp = state_dir.join(".state.json.1");
                let _ = std::fs::remove_file(&tmp);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .unwrap();
                f.write_all(b"{}").unwrap();
                drop(f);
                std::fs::rename(&tmp, state_dir.join("state.json")).unwrap();
                conn.write_all(b"ok\n").unwrap();
            });
            std::fs::remove_file(&own).unwrap();
        });
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "ok\n");
        assert_eq!(&sandbox_monitor.join().unwrap(), b"request\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }) else {
        return;
    };
    let _ = std::fs::remove_dir_all(scratch_dir(std::process::id(), "member"));
    assert_lived(&output, "member: thread exited");
}
