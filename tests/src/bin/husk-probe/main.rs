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
//!
//! The files follow those steps: `filters` dumps, rewrites and installs the seccomp filters,
//! `place` takes the thread's namespaces and credentials, `attempts` makes and reports the
//! attempts; `args` reads the command line and `exit` says how the probe ends early. This
//! one forks the child and compares its credentials with the thread's.

mod args;
mod attempts;
mod exit;
mod filters;
mod place;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::args::args;
use crate::attempts::attempts;
use crate::exit::{GONE, die};
use crate::filters::{dump_filters, install, let_seccomp_through, relabel};
use crate::place::{field, open_ns, own_ns, setns, take_place};

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
