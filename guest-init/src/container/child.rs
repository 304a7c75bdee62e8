//! What runs in a forked child, from the fork to `execve`: its descriptors, its stdio, the
//! main process's setup inside its namespaces (mounts, pivot, terminal, hostname, sysctls)
//! and the report of a failure to husk-init. Nothing here returns to husk-init's code: a
//! child ends in `execve` or `_exit`.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use nix::sched::CloneFlags;

use super::sync::{self, ChildError};
use super::{console, spec};
use crate::relay::ChildStdio;
use crate::sys;

/// Closes every descriptor from 3 up except `keep` (the child must not hold the parent's
/// ends of pipes — stdin EOF would never arrive — nor any other guest descriptor).
pub(super) fn close_fds_except(keep: &[RawFd]) {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// In a forked child: makes it a session leader with the stdio descriptors as 0, 1, 2 (a
/// terminal comes later, from the container's devpts: [`console::Sender::open_terminal`]).
pub(super) fn install_stdio(stdio: ChildStdio) -> Result<(), ChildError> {
    nix::unistd::setsid().map_err(|e| ChildError::sys("setsid", e))?;
    if let ChildStdio::Fds {
        stdin,
        stdout,
        stderr,
    } = &stdio
    {
        for (fd, target) in [(stdin, 0), (stdout, 1), (stderr, 2)] {
            if fd.as_raw_fd() != target {
                sys::dup_onto(fd, target).map_err(|e| ChildError::sys("dup2", e))?;
            }
        }
    }
    Ok(())
}

/// Runs `body` as the rest of a forked child's life: reports its error and exits.
pub(super) fn child_main(
    report: &mut File,
    body: impl FnOnce(&mut File) -> Result<std::convert::Infallible, ChildError>,
) -> ! {
    let e = match body(report) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    sync::report_failure(report, &e);
    // SAFETY: _exit ends the process at once without running the parent's atexit handlers
    // or flushing stdio buffers it inherited (which would duplicate the parent's output).
    unsafe { libc::_exit(1) }
}

/// The container's main process from fork to just before exec.
pub(super) fn init_child(
    plan: &mut spec::Plan,
    go: &mut File,
    report: &mut File,
    in_userns: bool,
    console: Option<console::Sender>,
) -> Result<std::convert::Infallible, ChildError> {
    if sync::wait_for(go) != Some(sync::GO_SETUP) {
        return Err(ChildError::sys("waiting for husk-init", "it gave up"));
    }
    if in_userns {
        // Root in the new user namespace (if mapped), so files are created as root.
        let root = nix::unistd::Uid::from_raw(0);
        let _ = nix::unistd::setresgid(
            nix::unistd::Gid::from_raw(0),
            nix::unistd::Gid::from_raw(0),
            nix::unistd::Gid::from_raw(0),
        );
        let _ = nix::unistd::setresuid(root, root, root);
    }
    if plan.cgroup_ns {
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
            .map_err(|e| ChildError::sys("creating the cgroup namespace", e))?;
    }
    plan.rootfs.mount_all(in_userns)?;
    plan.rootfs.pivot()?;
    // As runc: the terminal comes from the container's own devpts, before the root is
    // finalised (remounted read-only, paths masked).
    if let Some(tx) = console {
        tx.open_terminal(plan.process.console_size)?;
    }
    if let Some(h) = &plan.hostname {
        nix::unistd::sethostname(h)
            .map_err(|e| ChildError::sys(format!("setting hostname {h:?}"), e))?;
    }
    if let Some(d) = &plan.domainname {
        let c = std::ffi::CString::new(d.as_str()).map_err(|e| ChildError::sys("domainname", e))?;
        // SAFETY: setdomainname reads `len` bytes from a live CString.
        if unsafe { libc::setdomainname(c.as_ptr(), d.len()) } != 0 {
            return Err(ChildError::sys(
                format!("setting domainname {d:?}"),
                std::io::Error::last_os_error(),
            ));
        }
    }
    for (k, v) in &plan.sysctls {
        let path = format!("/proc/sys/{}", k.replace('.', "/"));
        std::fs::write(&path, v)
            .map_err(|e| ChildError::sys(format!("setting sysctl {k}={v}"), e))?;
    }
    plan.rootfs.finish()?;
    plan.process.default_home();
    let exe = plan.process.find_executable()?;
    plan.process.apply_limits()?;
    sync::send(report, sync::READY).map_err(|e| ChildError::sys("reporting ready", e))?;
    if sync::wait_for(go) != Some(sync::GO_START) {
        // husk-init gave up on us (delete before start).
        // SAFETY: see child_main.
        unsafe { libc::_exit(0) }
    }
    Err(plan.process.exec(&exe, plan.seccomp.as_ref()))
}
