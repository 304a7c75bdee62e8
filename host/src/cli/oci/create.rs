//! `husk create`: the state entry, then the monitor (the hidden `husk monitor` command, whose
//! arguments are here too), which boots the VM and reports once the guest created the
//! container.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};

use super::delete::remove_entry;
use super::{
    Context, close_inherited_fds, read_report_serving, report_limit, spawn_monitor, write_pid_file,
};
use crate::monitor::{self, MonitorArgs, uids};
use crate::oci::bundle::Bundle;
use crate::oci::state::{self, State};
use crate::oci::{hooks, pod};

/// `create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Container id.
    pub(super) id: String,
    /// Bundle directory (holding config.json).
    #[arg(long, short = 'b', default_value = ".")]
    bundle: PathBuf,
    /// Unix socket that receives the pty master (terminal: true).
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Write the monitor's pid (the container's pid for the engine) here.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Accepted for compatibility (husk-init always pivots inside the VM).
    #[arg(long)]
    no_pivot: bool,
    /// Accepted for compatibility.
    #[arg(long)]
    no_new_keyring: bool,
    /// Extra fds to pass to the container: not supported across a VM boundary (must be 0).
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
}

/// The hidden `monitor` command.
#[derive(Debug, clap::Args)]
pub struct MonitorCmdArgs {
    #[arg(long)]
    id: String,
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    notify_fd: i32,
    /// The read end of the pipe on which `create` says it ran the hooks.
    #[arg(long)]
    hooks_fd: Option<i32>,
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// A pod's later container: the sandbox whose VM it is created in (see
    /// `crate::oci::pod`); the process is then the container's member, not a monitor.
    #[arg(long)]
    pod_sandbox: Option<String>,
}

/// Creates the container and returns the monitor process.
pub(super) fn create_container(ctx: &Context, args: &CreateArgs) -> Result<Child> {
    if args.preserve_fds != 0 {
        bail!("--preserve-fds: file descriptors cannot be passed into a VM");
    }
    let _ = (args.no_pivot, args.no_new_keyring);
    let store = ctx.store();
    let entry = store.create(&args.id)?;
    let fail = |entry: state::Entry, e: anyhow::Error| -> anyhow::Error {
        let _ = remove_entry(entry);
        e
    };
    let bundle = match Bundle::load(&args.bundle) {
        Ok(b) => b,
        Err(e) => return Err(fail(entry, e.into())),
    };
    let terminal = bundle.terminal();
    if terminal && args.console_socket.is_none() {
        let e = anyhow!("config.json: process.terminal is true but no --console-socket was given");
        return Err(fail(entry, e));
    }
    let initial = State::creating(&args.id, &bundle, None);
    if let Err(e) = entry.write(&initial) {
        return Err(fail(entry, e.into()));
    }
    // What `start` and `delete` run (the create hooks are run from the bundle, below).
    if let Err(e) = hooks::save(entry.dir(), bundle.spec.hooks().as_ref()) {
        return Err(fail(entry, e.into()));
    }
    // A pod's later container joins its sandbox's VM.
    let role = match pod::role(&bundle, &ctx.root) {
        Ok(r) => r,
        Err(e) => return Err(fail(entry, e.into())),
    };
    // The monitor reports "ok" or an error on this pipe (and asks for the create hooks on it).
    // Close-on-exec here: not for the hooks this process runs (spawn_detached keeps the write
    // end open in the monitor).
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    let write_fd = write_end.as_raw_fd();
    let exe = std::env::current_exe().context("finding the husk binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root")
        .arg(&ctx.root)
        .args(["monitor", "--id", &args.id, "--bundle"])
        .arg(&bundle.dir)
        .args(["--notify-fd", &write_fd.to_string()]);
    if ctx.debug {
        cmd.arg("--debug");
    }
    if ctx.systemd_cgroup {
        cmd.arg("--systemd-cgroup");
    }
    if let pod::Role::Member { sandbox, .. } = &role {
        // A member's VM is its sandbox's, whose monitor has its uids: it gets none of its own.
        cmd.arg("--pod-sandbox").arg(sandbox);
        cmd.arg("--monitor-uid").arg("root");
    } else {
        // Its uids: a range of its own by default (see monitor::uids), taken back by delete.
        let user = uids::for_container(
            ctx.monitor_uid,
            ctx.monitor_uid_pool,
            Path::new(uids::REGISTRY),
            entry.dir(),
        );
        match user {
            Ok(Some(map)) => cmd.arg("--monitor-uid").arg(map.base().to_string()),
            Ok(None) => cmd.arg("--monitor-uid").arg("root"),
            Err(e) => return Err(fail(entry, e.into())),
        };
    }
    if let Some(log) = &ctx.log {
        cmd.arg("--log")
            .arg(std::path::absolute(log).context("--log")?);
    }
    if let Some(socket) = &args.console_socket {
        let socket = std::path::absolute(socket).context("--console-socket")?;
        cmd.arg("--console-socket").arg(socket);
    }
    // The monitor has the prestart and createRuntime hooks run here (monitor::create_hooks),
    // and hears back on this pipe. Close-on-exec: a hook's child that held the write end would
    // keep a monitor whose hook failed from hearing so.
    let (hooks_r, hooks_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    cmd.args(["--hooks-fd", &hooks_r.as_raw_fd().to_string()]);
    let mut child = match spawn_monitor(&mut cmd, &[write_fd, hooks_r.as_raw_fd()]) {
        Ok(c) => c,
        Err(e) => return Err(fail(entry, anyhow!("starting the monitor: {e}"))),
    };
    drop((write_end, hooks_r));
    let mut hooks_w = Some(hooks_w);
    let monitor_pid = child.id();
    let report = read_report_serving(read_end, report_limit(), |line| {
        serve_create_hooks(line, &bundle, &args.id, monitor_pid, &mut hooks_w)
    });
    let mut lines: Vec<&str> = report.lines().collect();
    // A template the monitor could not restore from: removed here, where the cache is seen.
    lines.retain(|line| match line.strip_prefix(monitor::TEMPLATE_REJECTED) {
        Some(key) => {
            remove_template(key.trim());
            false
        }
        None => true,
    });
    let mut report = lines.join("\n");
    if report.trim() == "ok" && hooks_w.is_some() && monitor::create_hooks::wanted(&bundle) {
        // What a monitor says is not believed: the bundle's hooks ran, or it is not created.
        report = "error: the monitor reported the container created without having its \
                  prestart and createRuntime hooks run"
            .into();
    }
    if report.trim() != "ok" {
        let msg = report
            .trim()
            .strip_prefix("error: ")
            .unwrap_or(report.trim())
            .to_string();
        let _ = child.kill();
        let _ = child.wait();
        let msg = if msg.is_empty() {
            "the monitor died while creating the container".to_string()
        } else {
            msg
        };
        return Err(fail(entry, anyhow!(msg)));
    }
    if let Some(pid_file) = &args.pid_file {
        write_pid_file(pid_file, child.id())?;
    }
    drop(entry);
    crate::phases::record_now("create-returned");
    Ok(child)
}

/// Removes a template the monitor could not restore from (a key it printed, so checked
/// before it is used as a file name), saying so once.
fn remove_template(key: &str) {
    if !crate::template::Key::is_key(key) {
        return;
    }
    let dir = crate::template::cache_dir();
    let removed = crate::template::Cache::open(&dir).and_then(|cache| cache.remove(key));
    match removed {
        Ok(key) => eprintln!("husk: removed template {key}, which could not be restored"),
        Err(e) => eprintln!(
            "husk: template {key} could not be restored, nor removed: {}",
            crate::error_chain(&e)
        ),
    }
}

/// `husk create`.
pub fn create(ctx: &Context, args: CreateArgs) -> Result<ExitCode> {
    create_container(ctx, &args)?;
    Ok(ExitCode::SUCCESS)
}

/// The hidden `monitor` command.
pub fn monitor(ctx: &Context, args: MonitorCmdArgs, process_start: Instant) -> ExitCode {
    // Make sure the notify fd is ours (and close-on-exec from here on).
    // SAFETY: the fd number was given to us by `create`, which left it open for us.
    let fd = unsafe { OwnedFd::from_raw_fd(args.notify_fd) };
    // Not for anything the monitor would exec: a process that outlived it would hold
    // `create`'s pipe open, and `create` waits for its end. (The hooks pipe is
    // monitor::create_hooks's, which closes it.)
    let _ = nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let raw = fd.as_raw_fd();
    std::mem::forget(fd);
    close_inherited_fds(&[raw, args.hooks_fd.unwrap_or(raw)]);
    if let Some(sandbox) = args.pod_sandbox {
        return monitor::member::run(monitor::member::MemberArgs {
            root: ctx.root.clone(),
            id: args.id,
            bundle: args.bundle,
            sandbox,
            notify_fd: raw,
            hooks_fd: args.hooks_fd,
            console_socket: args.console_socket,
            log: ctx.log.clone(),
            systemd_cgroup: ctx.systemd_cgroup,
        });
    }
    let user = match ctx.monitor_uid {
        uids::MonitorUser::Root => None,
        uids::MonitorUser::Fixed(map) => Some(map),
        uids::MonitorUser::Auto => {
            // `create` resolves it; the monitor is never started with `auto`.
            eprintln!("husk monitor: --monitor-uid auto is for create, not the monitor");
            return ExitCode::FAILURE;
        }
    };
    monitor::run(
        MonitorArgs {
            root: ctx.root.clone(),
            id: args.id,
            bundle: args.bundle,
            notify_fd: raw,
            hooks_fd: args.hooks_fd,
            console: ctx.debug,
            console_socket: args.console_socket,
            log: ctx.log.clone(),
            user,
            systemd_cgroup: ctx.systemd_cgroup,
        },
        process_start,
    )
}

/// Runs the `prestart` and `createRuntime` hooks when the monitor asks (`line` is its request,
/// see `monitor::create_hooks`), here, in husk create's namespaces as runc runs them, with the
/// state of the container being created whose `pid` is the monitor's; then tells it on
/// `answers`, once. `None`: `line` is no request, but part of the report.
fn serve_create_hooks(
    line: &str,
    bundle: &Bundle,
    id: &str,
    monitor: u32,
    answers: &mut Option<OwnedFd>,
) -> Option<Result<(), String>> {
    if line != monitor::create_hooks::REQUEST {
        return None;
    }
    let Some(answers) = answers.take() else {
        return Some(Err("the monitor asked twice for the create hooks".into()));
    };
    let state = State::creating(id, bundle, i32::try_from(monitor).ok());
    let hooks = bundle.spec.hooks().as_ref();
    let ran = hooks::run(hooks::HookKind::Prestart, hooks, &state)
        .and_then(|()| hooks::run(hooks::HookKind::CreateRuntime, hooks, &state));
    if let Err(e) = ran {
        return Some(Err(crate::error_chain(&e)));
    }
    let done = format!("{}\n", monitor::create_hooks::DONE);
    Some(
        nix::unistd::write(&answers, done.as_bytes())
            .map(drop)
            .map_err(|e| format!("telling the monitor the hooks ran: {e}")),
    )
}
