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
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::monitor::client;
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
    pub monitor_uid: crate::monitor::uids::MonitorUser,
    /// `--monitor-uid-pool`.
    pub monitor_uid_pool: crate::monitor::uids::Pool,
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
/// with `keep` (the write end of the pipe on which it says how it went, and the monitor's
/// hooks pipe) left open across exec.
fn spawn_detached(cmd: &mut Command, keep: &[RawFd]) -> std::io::Result<Child> {
    let keep = keep.to_vec();
    // SAFETY: the closure only calls async-signal-safe functions (setsid, fcntl) between fork
    // and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            for fd in &keep {
                let flags = libc::fcntl(*fd, libc::F_GETFD);
                libc::fcntl(*fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Starts the monitor as [`spawn_detached`] does, as the first process of a pid namespace of
/// its own (unshared by a short-lived thread, for the children it starts alone): from there
/// no other process can be named, so none can be signalled or ptraced, and a monitor sees no
/// other monitor. The engine still knows it by its pid here (see `crate::pid`). Signals other
/// than SIGKILL and SIGSTOP that come from outside reach it only if it handles them, as for
/// any pid namespace's first process: `husk kill` and `husk delete` are the ways to stop it.
fn spawn_monitor(cmd: &mut Command, keep: &[RawFd]) -> std::io::Result<Child> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).map_err(|e| {
                std::io::Error::new(
                    std::io::Error::from(e).kind(),
                    format!("a pid namespace for the monitor: unshare(CLONE_NEWPID): {e}"),
                )
            })?;
            spawn_detached(cmd, keep)
        })
        .join()
        .unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "the thread starting the monitor panicked",
            ))
        })
    })
}

/// What a process started by [`spawn_detached`] wrote on its report pipe, read until every
/// write end is closed (`read_end`'s; the caller drops its own write end first), or
/// `error: ...` if that takes longer than [`report_limit`]: a monitor whose guest never answers
/// (or a relay waiting on one) must not hang the command. The caller then ends the process.
fn read_report(read_end: OwnedFd) -> String {
    read_report_within(read_end, report_limit())
}

/// How long `create` (and `exec --detach`) wait for their process's report: the guest's boot
/// (up to 300 s on a loaded nested-KVM host), then [`client::reply_timeout`] for husk-init to
/// answer.
fn report_limit() -> Duration {
    Duration::from_secs(300) + client::reply_timeout()
}

/// [`read_report`], giving up after `limit`.
fn read_report_within(read_end: OwnedFd, limit: Duration) -> String {
    read_report_serving(read_end, limit, |_| None)
}

/// [`read_report_within`], handing each line of the report to `serve` as it comes: a request
/// of the process (see `monitor::create_hooks`) that `serve` answers, `Some(Ok(()))`, is not
/// part of the report; one it fails, `Some(Err(why))`, makes the report `error: why`, once the
/// process has ended (it was told, by `serve`, and undoes what it made), or at most
/// [`FAILED_DRAIN`] later. The time `serve` takes (the hooks it runs) does not count against
/// `limit`.
fn read_report_serving(
    read_end: OwnedFd,
    limit: Duration,
    mut serve: impl FnMut(&str) -> Option<Result<(), String>>,
) -> String {
    use std::os::fd::AsFd;
    let mut deadline = Instant::now() + limit;
    let mut file = std::fs::File::from(read_end);
    let mut report = Vec::new();
    let mut pending = Vec::new();
    let mut failed: Option<String> = None;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let millis = u16::try_from(left.as_millis().min(u128::from(u16::MAX))).unwrap_or(0);
        let mut fds = [nix::poll::PollFd::new(
            file.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(millis)) {
            Ok(0) if left.is_zero() => {
                if failed.is_some() {
                    break;
                }
                return format!(
                    "error: no report within {} s (is the guest hung?); HUSK_REPLY_TIMEOUT \
                     adds to the 300 s a boot may take",
                    limit.as_secs()
                );
            }
            Ok(0) | Err(nix::Error::EINTR) => continue,
            Ok(_) => {}
            Err(_) => break,
        }
        match file.read(&mut buf) {
            Ok(0) => break,
            // What a process says after its request failed is not the report.
            Ok(_) if failed.is_some() => {}
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let serving = Instant::now();
                    let served = serve(String::from_utf8_lossy(&line).trim_end());
                    deadline += serving.elapsed();
                    match served {
                        None => report.extend_from_slice(&line),
                        Some(Ok(())) => {}
                        Some(Err(why)) => {
                            failed = Some(why);
                            deadline = deadline.min(Instant::now() + FAILED_DRAIN);
                            break;
                        }
                    }
                }
                // A report is a few lines; a process writing more is not one of ours.
                if report.len() + pending.len() > 64 << 10 {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if let Some(why) = failed {
        return format!("error: {why}");
    }
    report.extend_from_slice(&pending);
    String::from_utf8_lossy(&report).into_owned()
}

/// How long [`read_report_serving`] waits for a process whose request failed to end.
const FAILED_DRAIN: Duration = Duration::from_secs(30);

/// Closes every descriptor the monitor inherited besides stdio (the container's), `keep` (the
/// notify pipe, the hooks pipe) and the phase file this process opened (`crate::phases`). The
/// monitor lives as long as the container, next to the guest-facing threads: whatever the
/// engine leaked into `husk create` (a socket, a directory of the host) must not live on in
/// it. (`--preserve-fds` is refused: descriptors cannot be passed into a VM.) The exec relay
/// does the same, for what the engine leaked into `exec --detach`.
fn close_inherited_fds(keep: &[RawFd]) {
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
    let mut kept: Vec<RawFd> = keep.iter().copied().chain(crate::phases::fd()).collect();
    kept.sort_unstable();
    let mut first = 3;
    for k in kept {
        close(first, k - 1);
        first = first.max(k + 1);
    }
    close(first, RawFd::MAX);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that never reports (a monitor whose guest hung) does not hang the command.
    #[test]
    fn a_report_that_never_comes_is_given_up_on() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read_report_within(read_end, Duration::from_secs(1)));
        });
        let report = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("waiting for a report that never comes went on past its limit");
        drop(write_end);
        assert!(
            report.starts_with("error: no report within 1 s"),
            "{report}"
        );
    }

    #[test]
    fn a_report_is_read_to_its_end() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let mut w = std::fs::File::from(write_end);
        std::io::Write::write_all(&mut w, b"template-rejected k\nok\n").unwrap();
        drop(w);
        assert_eq!(
            read_report_within(read_end, Duration::from_secs(5)),
            "template-rejected k\nok\n"
        );
    }

    /// A request in the report (the create hooks') is served, not reported, and the time it
    /// takes is not the process's: here serving takes longer than the whole limit.
    #[test]
    fn a_request_is_served_and_its_time_not_counted() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let mut w = std::fs::File::from(write_end);
        let writer = std::thread::spawn(move || {
            std::io::Write::write_all(&mut w, b"run-it\n").unwrap();
            // After the request was served (longer than the limit).
            std::thread::sleep(Duration::from_millis(1500));
            std::io::Write::write_all(&mut w, b"ok\n").unwrap();
        });
        let mut served = Vec::new();
        let report = read_report_serving(read_end, Duration::from_secs(1), |line| {
            served.push(line.to_owned());
            (line == "run-it").then(|| {
                std::thread::sleep(Duration::from_millis(1200));
                Ok(())
            })
        });
        writer.join().unwrap();
        assert_eq!(report, "ok\n");
        assert_eq!(served, ["run-it", "ok"]);
    }

    /// A request that fails makes the report its error, once the process has ended: what the
    /// process says after it is not the report, and no later request is served.
    #[test]
    fn a_failed_request_is_the_report_once_the_process_ended() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let mut w = std::fs::File::from(write_end);
        let writer = std::thread::spawn(move || {
            std::io::Write::write_all(&mut w, b"run-it\n").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            std::io::Write::write_all(&mut w, b"run-it\nerror: it was not run\n").unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        let started = Instant::now();
        let mut served = 0;
        let report = read_report_serving(read_end, Duration::from_secs(5), |line| {
            (line == "run-it").then(|| {
                served += 1;
                Err("the hook broke".to_owned())
            })
        });
        assert!(started.elapsed() >= Duration::from_millis(600), "{report}");
        writer.join().unwrap();
        assert_eq!(report, "error: the hook broke");
        assert_eq!(served, 1);
    }
}
