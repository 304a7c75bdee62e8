//! `exec --detach` as engines need it: a host process that stands for the exec'd process.
//!
//! runc's `exec --detach --pid-file F` leaves the new process running as a child of the
//! caller's subreaper and writes its host pid to F; conmon and the containerd shim then wait on
//! that pid for the exit status and hold its stdio. An exec'd process of a husk container runs
//! in the guest, so husk does what it does for the container itself (the monitor): a host
//! process, the *exec relay*, relays the process's stdio (or waits while the monitor relays its
//! terminal) and exits with its exit status (128+N for signal N). `--pid-file` gets the relay's
//! pid. The relay is `husk exec` without `--detach`, started in its own session with the
//! caller's stdio; it reports on an inherited pipe (`--started-fd`) once the process runs (or
//! why it could not start), and only then does `exec --detach` return. Signals the engine
//! sends to that pid go on to the exec'd process (`signals`), SIGKILL and SIGSTOP
//! excepted.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, anyhow, bail};

use super::super::{Context, read_report, spawn_detached, write_pid_file};
use super::args::ExecArgs;

/// Tells the waiting side that the exec'd process runs: the pid file gets this process's pid
/// (it lives exactly as long as the exec'd process and exits with its status), and a relay's
/// parent gets `ok` on the `--started-fd` pipe, or the error that came first.
#[derive(Debug)]
pub struct Started {
    pid_file: Option<PathBuf>,
    notify: Option<std::fs::File>,
}

impl Started {
    /// For `--pid-file` and `--started-fd` (the descriptor `exec --detach` left open for us).
    pub fn new(pid_file: Option<PathBuf>, started_fd: Option<i32>) -> Result<Started> {
        let notify = match started_fd {
            Some(fd) => {
                // SAFETY: fcntl(F_GETFD) only inspects the descriptor table; it tells whether
                // `fd` is open before we take ownership of it.
                if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    bail!("--started-fd {fd}: not an open file descriptor");
                }
                // SAFETY: the descriptor is open (checked above) and was handed to this
                // process for its exclusive use by `exec --detach`; nothing else owns it.
                Some(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
            }
            None => None,
        };
        Ok(Started { pid_file, notify })
    }

    /// The process runs.
    pub fn ok(&mut self) -> Result<()> {
        if let Some(p) = &self.pid_file {
            write_pid_file(p, std::process::id())?;
        }
        if let Some(mut n) = self.notify.take() {
            n.write_all(b"ok\n").context("--started-fd")?;
        }
        Ok(())
    }

    /// The exec failed: a waiting parent gets the error (once; nothing after `ok`).
    pub fn fail(&mut self, e: &anyhow::Error) {
        if let Some(mut n) = self.notify.take() {
            let _ = writeln!(n, "error: {e:#}");
        }
    }
}

/// `exec --detach`: starts the exec relay and returns once the process runs, with the relay's
/// pid in `--pid-file`.
pub(super) fn detach(ctx: &Context, args: &ExecArgs) -> Result<ExitCode> {
    let (read_end, write_end) = nix::unistd::pipe().context("creating a pipe")?;
    let write_fd = write_end.as_raw_fd();
    let exe = std::env::current_exe().context("finding the husk binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(relay_args(ctx, args, write_fd)?);
    let mut child = spawn_detached(&mut cmd, &[write_fd]).context("starting the exec relay")?;
    drop(write_end);
    let report = read_report(read_end);
    let report = report.trim();
    if report == "ok" {
        if let Some(p) = &args.pid_file {
            write_pid_file(p, child.id())?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    // It failed, or gave no report in time (then it is stuck: end it).
    let _ = child.kill();
    let status = child.wait().context("waiting for the exec relay")?;
    match report.strip_prefix("error: ") {
        Some(msg) => Err(anyhow!("{msg}")),
        None => Err(anyhow!(
            "exec in container {}: the exec relay ended ({status}) before the process started",
            args.id
        )),
    }
}

/// The relay's command line: this exec without `--detach` and `--pid-file`, reporting on
/// `started_fd`.
fn relay_args(ctx: &Context, args: &ExecArgs, started_fd: i32) -> Result<Vec<String>> {
    let path = |p: &Path, what: &str| -> Result<String> {
        let abs = std::path::absolute(p).with_context(|| what.to_string())?;
        abs.into_os_string()
            .into_string()
            .map_err(|p| anyhow!("{what}: {p:?} is not UTF-8"))
    };
    let mut v = vec!["--root".to_string(), path(&ctx.root, "--root")?];
    if let Some(log) = &ctx.log {
        v.extend(["--log".into(), path(log, "--log")?]);
    }
    v.extend(["--log-format".into(), ctx.log_format.name().into()]);
    if ctx.debug {
        v.push("--debug".into());
    }
    v.extend(["exec".into(), "--started-fd".into(), started_fd.to_string()]);
    if let Some(p) = &args.process {
        v.extend(["--process".into(), path(p, "--process")?]);
    }
    if args.tty {
        v.push("--tty".into());
    }
    if let Some(s) = &args.console_socket {
        v.extend(["--console-socket".into(), path(s, "--console-socket")?]);
    }
    for e in &args.env {
        v.extend(["--env".into(), e.clone()]);
    }
    if let Some(c) = &args.cwd {
        v.extend(["--cwd".into(), c.clone()]);
    }
    if let Some(u) = &args.user {
        v.extend(["--user".into(), u.clone()]);
    }
    v.push(args.id.clone());
    if !args.args.is_empty() {
        v.push("--".into());
        v.extend(args.args.iter().cloned());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        exec: ExecArgs,
    }

    fn parse(args: &[&str]) -> ExecArgs {
        Wrapper::try_parse_from(std::iter::once("exec").chain(args.iter().copied()))
            .unwrap()
            .exec
    }

    #[test]
    fn the_relay_is_the_same_exec_attached_with_absolute_paths() {
        let ctx = Context {
            log: Some("rel/log.json".into()),
            log_format: crate::cli::log::Format::Json,
            root: "/run/x".into(),
            debug: false,
            monitor_uid: crate::monitor::uids::MonitorUser::Root,
            monitor_uid_pool: crate::monitor::uids::Pool::default(),
            systemd_cgroup: false,
        };
        let a = parse(&[
            "--detach",
            "--pid-file",
            "p",
            "--process",
            "proc.json",
            "-e",
            "A=1",
            "--user",
            "5:6",
            "c1",
        ]);
        let v = relay_args(&ctx, &a, 7).unwrap();
        let cwd = std::env::current_dir().unwrap();
        let abs = |p: &str| cwd.join(p).display().to_string();
        assert!(
            !v.iter().any(|s| s == "--detach" || s == "--pid-file"),
            "{v:?}"
        );
        let expect: Vec<String> = [
            "--root",
            "/run/x",
            "--log",
            &abs("rel/log.json"),
            "--log-format",
            "json",
            "exec",
            "--started-fd",
            "7",
            "--process",
            &abs("proc.json"),
            "--env",
            "A=1",
            "--user",
            "5:6",
            "c1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(v, expect);
        // The relay's own command line parses back to the same exec, attached.
        let back = parse(
            &v[v.iter().position(|s| s == "exec").unwrap() + 1..]
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>(),
        );
        assert!(!back.detach && back.started_fd == Some(7) && back.user.as_deref() == Some("5:6"));
    }

    #[test]
    fn command_arguments_that_look_like_flags_stay_arguments() {
        let ctx = Context {
            log: None,
            log_format: crate::cli::log::Format::Text,
            root: "/r".into(),
            debug: true,
            monitor_uid: crate::monitor::uids::MonitorUser::Root,
            monitor_uid_pool: crate::monitor::uids::Pool::default(),
            systemd_cgroup: false,
        };
        let a = parse(&["-d", "c1", "sh", "-c", "echo --tty"]);
        let v = relay_args(&ctx, &a, 3).unwrap();
        let tail: Vec<&str> = v.iter().rev().take(5).rev().map(|s| s.as_str()).collect();
        assert_eq!(tail, ["c1", "--", "sh", "-c", "echo --tty"]);
        assert!(v.contains(&"--debug".to_string()));
        let back = parse(
            &v[v.iter().position(|s| s == "exec").unwrap() + 1..]
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>(),
        );
        assert_eq!(back.args, ["sh", "-c", "echo --tty"]);
        assert!(!back.tty);
    }

    #[test]
    fn a_started_fd_that_is_not_open_is_an_error_naming_it() {
        let e = Started::new(None, Some(987_654)).unwrap_err();
        assert!(e.to_string().contains("--started-fd 987654"), "{e}");
    }
}
