//! Namespaces of a container's processes that husk-init enters or makes a child enter: opened
//! by `/proc/<pid>/ns/<name>` while /proc still shows guest pids, entered with `setns`.
//!
//! Two ways in. A namespace a child must be *in from the start* (the pid namespace, which only
//! applies to children; the uts and ipc namespaces a pod's container shares with its sandbox,
//! which a new user namespace would keep it from joining afterwards) is entered by husk-init
//! itself around the fork ([`Entered`], undone on drop). The others (mount, user, cgroup) the
//! forked child joins before it does anything else.

use std::os::fd::OwnedFd;

use husk_proto::ErrorReply;
use nix::sched::CloneFlags;
use nix::unistd::Pid;

use super::reply::sys_reply;
use crate::log;

/// The `/proc/<pid>/ns/` name of a namespace type.
pub(super) fn name(flag: CloneFlags) -> &'static str {
    match flag {
        CloneFlags::CLONE_NEWNS => "mnt",
        CloneFlags::CLONE_NEWUTS => "uts",
        CloneFlags::CLONE_NEWIPC => "ipc",
        CloneFlags::CLONE_NEWUSER => "user",
        CloneFlags::CLONE_NEWCGROUP => "cgroup",
        CloneFlags::CLONE_NEWPID => "pid",
        _ => "?",
    }
}

/// Opens process `pid`'s namespace of type `flag` (`Pid::this()`: husk-init's own).
pub(super) fn open(pid: Pid, flag: CloneFlags) -> Result<OwnedFd, ErrorReply> {
    let path = if pid == Pid::this() {
        format!("/proc/self/ns/{}", name(flag))
    } else {
        format!("/proc/{pid}/ns/{}", name(flag))
    };
    std::fs::File::open(&path)
        .map(OwnedFd::from)
        .map_err(|e| sys_reply(&format!("opening the {} namespace {path}", name(flag)), e))
}

/// husk-init inside other namespaces for the length of a fork: entered by [`Entered::enter`],
/// left (back to husk-init's own) when dropped. The forked child never drops it: it stays.
#[derive(Debug)]
pub(super) struct Entered {
    ours: Vec<(OwnedFd, CloneFlags)>,
}

impl Entered {
    /// Enters each of `theirs`, having opened husk-init's own of the same types first.
    pub(super) fn enter(theirs: &[(OwnedFd, CloneFlags)]) -> Result<Entered, ErrorReply> {
        let mut entered = Entered { ours: Vec::new() };
        for (_, flag) in theirs {
            entered.ours.push((open(Pid::this(), *flag)?, *flag));
        }
        for (fd, flag) in theirs {
            // On failure, `entered` goes back out of what was entered so far.
            nix::sched::setns(fd, *flag)
                .map_err(|e| sys_reply(&format!("entering the {} namespace", name(*flag)), e))?;
        }
        Ok(entered)
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        for (fd, flag) in &self.ours {
            if let Err(e) = nix::sched::setns(fd, *flag) {
                log::error!(
                    "cannot return to husk-init's {} namespace: {e}",
                    name(*flag)
                );
            }
        }
    }
}
