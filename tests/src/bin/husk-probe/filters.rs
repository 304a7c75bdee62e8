//! The thread's seccomp filters: dumped with `PTRACE_SECCOMP_GET_FILTER` (the programs the
//! kernel runs for it, not a copy of husk's JSON), rewritten so that a kill or a filter's
//! errno comes back as an errno the probe can tell apart ([`KILLED`], [`FILTER_ERRNO`]), and
//! installed in the probe's child.

use crate::exit::{GONE, die};

/// The errno a rewritten "kill" answers with.
pub(crate) const KILLED: i32 = 4000;
/// A filter's own errno N comes back as this plus N.
pub(crate) const FILTER_ERRNO: i32 = 3000;

const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const SECCOMP_RET_ACTION_FULL: u32 = 0xffff_0000;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_KILL_THREAD: u32 = 0;
const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const BPF_RET_K: u16 = 0x06;

/// The thread's filters, newest first (as the kernel numbers them), or none.
pub(crate) fn dump_filters(tid: i32) -> Vec<Vec<libc::sock_filter>> {
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
pub(crate) fn relabel(program: &mut [libc::sock_filter]) {
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
pub(crate) fn let_seccomp_through() -> [libc::sock_filter; 3] {
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

pub(crate) fn install(program: &mut [libc::sock_filter]) {
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
