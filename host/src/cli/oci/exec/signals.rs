//! Signals sent to an attached `husk exec` go on to the exec'd process in the guest, as
//! `runc exec` forwards them to its process.
//!
//! This matters most for the exec relay (`exec --detach --pid-file`, see `relay`): the
//! engine holds the relay's host pid as the exec'd process's pid and signals it (conmon and
//! podman send SIGTERM, SIGINT, SIGHUP, ...). The relay blocks the forwarded signals before it
//! says the process runs, and one thread takes them with sigwait and asks the monitor to
//! deliver each to the process (`KillExec`). SIGKILL and SIGSTOP cannot be caught: they end or
//! stop the relay only.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use crate::monitor::api::MonitorRequest;
use crate::monitor::client;

/// Signals about this process itself, which are not forwarded: a child of ours changed
/// (SIGCHLD), our terminal's size (SIGWINCH: resizes take their own path), a write to a closed
/// pipe (SIGPIPE, which Rust ignores), and the faults the kernel raises in the thread that
/// caused them (blocking those would hang or kill it).
const NOT_FORWARDED: [Signal; 9] = [
    Signal::SIGCHLD,
    Signal::SIGWINCH,
    Signal::SIGPIPE,
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGILL,
    Signal::SIGFPE,
    Signal::SIGTRAP,
    Signal::SIGSYS,
];

/// The forwarded signals: every catchable one but [`NOT_FORWARDED`].
pub fn forwarded() -> SigSet {
    let mut set = SigSet::empty();
    for sig in Signal::iterator() {
        if !matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) && !NOT_FORWARDED.contains(&sig) {
            set.add(sig);
        }
    }
    set
}

/// Forwarded signals, blocked and waiting to be forwarded.
#[derive(Debug)]
pub struct Forwarder {
    set: SigSet,
}

impl Forwarder {
    /// Blocks the forwarded signals in the calling thread, and so in every thread it starts
    /// afterwards. Call it while the process has only this thread (a signal goes to any
    /// thread that does not block it, and would kill the process), and before anyone learns
    /// that the exec'd process runs: from then on no signal is lost, one that comes before
    /// [`Forwarder::start`] waits for it.
    pub fn block() -> Result<Forwarder> {
        let set = forwarded();
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
            .context("blocking the signals to forward")?;
        Ok(Forwarder { set })
    }

    /// Forwards every blocked signal, on a thread of its own, to exec `exec` through the
    /// monitor at `socket`, until this process exits.
    pub fn start(self, socket: PathBuf, exec: u32) {
        std::thread::spawn(move || {
            loop {
                let Ok(sig) = self.set.wait() else { continue };
                let req = MonitorRequest::KillExec {
                    exec,
                    signal: sig as i32,
                };
                // An error means the process has just exited (its status is on its way)
                // or the monitor is gone (and this exec with it): nothing left to signal.
                let _ = client::request(&socket, &req);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_signals_are_forwarded_and_our_own_are_not() {
        let set = forwarded();
        for sig in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
            Signal::SIGQUIT,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGCONT,
            Signal::SIGTSTP,
        ] {
            assert!(set.contains(sig), "{sig} must be forwarded");
        }
        for sig in [
            Signal::SIGKILL,
            Signal::SIGSTOP,
            Signal::SIGCHLD,
            Signal::SIGWINCH,
        ] {
            assert!(!set.contains(sig), "{sig} must not be forwarded");
        }
    }
}
