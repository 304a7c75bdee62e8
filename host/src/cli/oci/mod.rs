//! The OCI runtime commands (runc's names, flags and exit codes), one verb a file: `create`,
//! `start`, `run`, `exec` (with the exec relay), `kill`, `delete`, `state`/`list`/`ps`,
//! `events`, `pause`/`resume`, `spec`/`features`. This file holds what they share: the
//! [`Context`] of global flags, the id argument, and the way `create` and `exec --detach`
//! start a husk process that outlives them.

pub mod create;
pub mod delete;
pub mod events;
pub mod exec;
pub mod kill;
pub mod pause;
pub mod run;
pub mod spec;
pub mod start;
pub mod state;
pub mod update;

use std::io::Read;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};

use anyhow::{Context as _, Result};

use crate::oci::state::Store;

/// What every command needs.
#[derive(Debug)]
pub struct Context {
    /// `--log`.
    pub log: Option<PathBuf>,
    /// `--log-format`.
    pub log_format: super::log::Format,
    /// `--root`.
    pub root: PathBuf,
    /// `--debug`: the VM's serial console goes to the monitor's stderr.
    pub debug: bool,
    /// `--monitor-uid`.
    pub monitor_uid: Option<crate::monitor::userns::IdMap>,
    /// `--systemd-cgroup`.
    pub systemd_cgroup: bool,
}

impl Context {
    fn store(&self) -> Store {
        Store::new(&self.root)
    }
}

/// The arguments of a command husk does not support: whatever they are, the answer is the
/// same.
#[derive(Debug, clap::Args)]
pub struct Unsupported {
    /// Ignored.
    #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
    args: Vec<String>,
}

/// A container id.
#[derive(Debug, clap::Args)]
pub struct IdArg {
    /// Container id.
    id: String,
}

/// The exit code of a command that stands for a process which ended with `status` (128+N
/// for signal N); only its low byte counts, as for any process.
fn exit_code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status & 0xff).unwrap_or(1))
}

fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let tmp = path.with_extension("tmp-husk");
    std::fs::write(&tmp, pid.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Starts `cmd`, a husk process that outlives this command (the monitor, the exec relay), in a
/// session of its own (no controlling terminal, not killed with the caller's process group),
/// with `report` (the write end of the pipe on which it says how it went) left open across
/// exec.
fn spawn_detached(cmd: &mut Command, report: RawFd) -> std::io::Result<Child> {
    // SAFETY: the closure only calls async-signal-safe functions (setsid, fcntl) between fork
    // and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            let flags = libc::fcntl(report, libc::F_GETFD);
            libc::fcntl(report, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    cmd.spawn()
}

/// What a process started by [`spawn_detached`] wrote on its report pipe, read until every
/// write end is closed (`read_end`'s; the caller drops its own write end first).
fn read_report(read_end: OwnedFd) -> String {
    let mut report = String::new();
    let _ = std::fs::File::from(read_end).read_to_string(&mut report);
    report
}

/// Closes every descriptor the monitor inherited besides stdio (the container's), `keep` (the
/// notify pipe) and the phase file this process opened (`crate::phases`). The monitor lives
/// as long as the container, next to the guest-facing threads: whatever the engine leaked into
/// `husk create` (a socket, a directory of the host) must not live on in it. (`--preserve-fds`
/// is refused: descriptors cannot be passed into a VM.) The exec relay does the same, for
/// what the engine leaked into `exec --detach`.
fn close_inherited_fds(keep: RawFd) {
    let close = |first: RawFd, last: RawFd| {
        if first <= last {
            // SAFETY: close_range(2) only closes descriptors; none in the range is owned by
            // anything in this process yet (this runs first thing in the monitor, before any
            // file, socket or thread exists), so nothing is closed behind an owner's back.
            unsafe {
                libc::syscall(
                    libc::SYS_close_range,
                    first.cast_unsigned(),
                    last.cast_unsigned(),
                    0u32,
                )
            };
        }
    };
    // The phase file would otherwise be closed under the recorder, and its number reused by
    // a file its phases would then be written into.
    let mut kept: Vec<RawFd> = std::iter::once(keep).chain(crate::phases::fd()).collect();
    kept.sort_unstable();
    let mut first = 3;
    for k in kept {
        close(first, k - 1);
        first = first.max(k + 1);
    }
    close(first, RawFd::MAX);
}
