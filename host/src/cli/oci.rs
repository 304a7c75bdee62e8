//! The OCI runtime commands (runc's names, flags and exit codes).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use husk_proto::{Stdio, VsockPort};
use oci_spec::runtime::Spec;

use super::exec_relay::Started;
use super::signal_forward::Forwarder;
use crate::monitor::api::{MonitorReply, MonitorRequest};
use crate::monitor::{self, MonitorArgs};
use crate::oci::bundle::Bundle;
use crate::oci::hooks::{self, HookKind};
use crate::oci::state::{self, State, Status, Store};

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
}

impl Context {
    fn store(&self) -> Store {
        Store::new(&self.root)
    }
}

/// A container id.
#[derive(Debug, clap::Args)]
pub struct IdArg {
    /// Container id.
    id: String,
}

/// `create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Container id.
    id: String,
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

/// `kill`.
#[derive(Debug, clap::Args)]
pub struct KillArgs {
    /// Container id.
    id: String,
    /// Signal name or number.
    #[arg(default_value = "SIGTERM")]
    signal: String,
    /// Signal every process of the container.
    #[arg(long, short = 'a')]
    all: bool,
}

/// `delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Container id.
    id: String,
    /// Stop the container's VM first if it still runs.
    #[arg(long, short = 'f')]
    force: bool,
}

/// `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    create: CreateArgs,
    /// Return after starting instead of waiting for the container to exit.
    #[arg(long, short = 'd')]
    detach: bool,
}

/// `exec`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Container id.
    pub(super) id: String,
    /// An OCI process JSON file instead of ARGS.
    #[arg(long, short = 'p')]
    pub(super) process: Option<PathBuf>,
    /// Allocate a terminal (in the guest; its master goes to --console-socket, or this
    /// command relays it to its own terminal).
    #[arg(long, short = 't')]
    pub(super) tty: bool,
    /// Return once the process runs; a host process (the exec relay, whose pid goes to
    /// --pid-file) holds its stdio and exits with its status.
    #[arg(long, short = 'd')]
    pub(super) detach: bool,
    /// Extra environment variables (KEY=VALUE).
    #[arg(long, short = 'e')]
    pub(super) env: Vec<String>,
    /// Working directory.
    #[arg(long)]
    pub(super) cwd: Option<String>,
    /// UID[:GID].
    #[arg(long, short = 'u')]
    pub(super) user: Option<String>,
    /// Write the pid of the host process that stands for the exec'd process here (it exits
    /// with the process's status).
    #[arg(long)]
    pub(super) pid_file: Option<PathBuf>,
    /// Unix socket for the pty master (with --tty).
    #[arg(long)]
    pub(super) console_socket: Option<PathBuf>,
    /// The exec relay reports "ok" (or the error) on this inherited descriptor once the
    /// process runs (internal: set by --detach).
    #[arg(long, hide = true)]
    pub(super) started_fd: Option<i32>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub(super) args: Vec<String>,
}

/// `events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Container id.
    id: String,
    /// Print one stats event and exit.
    #[arg(long)]
    stats: bool,
    /// Seconds between stats events.
    #[arg(long, default_value_t = 5)]
    interval: u64,
}

/// `ps`.
#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// Container id.
    id: String,
    /// table or json.
    #[arg(long, short = 'f', default_value = "table")]
    format: String,
}

/// `list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// table or json.
    #[arg(long, short = 'f', default_value = "table")]
    format: String,
    /// Only ids.
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// `spec`.
#[derive(Debug, clap::Args)]
pub struct SpecArgs {
    /// Where to write config.json.
    #[arg(long, short = 'b', default_value = ".")]
    bundle: PathBuf,
}

/// Closes every descriptor the monitor inherited besides stdio (the container's), `keep` (the
/// notify pipe) and the phase file this process opened (`crate::phases`). The monitor lives
/// as long as the container, next to the guest-facing threads: whatever the engine leaked into
/// `husk create` (a socket, a directory of the host) must not live on in it. (`--preserve-fds`
/// is refused: descriptors cannot be passed into a VM.)
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

/// The hidden `monitor` command.
#[derive(Debug, clap::Args)]
pub struct MonitorCmdArgs {
    #[arg(long)]
    id: String,
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    notify_fd: i32,
    #[arg(long)]
    console_socket: Option<PathBuf>,
}

/// Creates the container and returns the monitor process.
fn create_container(ctx: &Context, args: &CreateArgs) -> Result<std::process::Child> {
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
    let initial = State {
        oci_version: state::OCI_VERSION.into(),
        id: args.id.clone(),
        status: Status::Creating,
        pid: None,
        bundle: bundle.dir.clone(),
        annotations: bundle.spec.annotations().clone().unwrap_or_default(),
        created: state::now_rfc3339(),
        monitor_start_time: 0,
        exit_status: None,
    };
    if let Err(e) = entry.write(&initial) {
        return Err(fail(entry, e.into()));
    }
    // What `start` and `delete` run (the monitor runs the create hooks from the bundle).
    if let Err(e) = hooks::save(entry.dir(), bundle.spec.hooks().as_ref()) {
        return Err(fail(entry, e.into()));
    }
    // The monitor reports "ok" or an error on this pipe.
    let (read_end, write_end) = nix::unistd::pipe().context("creating a pipe")?;
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
    if let Some(map) = ctx.monitor_uid {
        cmd.arg("--monitor-uid").arg(map.base().to_string());
    }
    if let Some(log) = &ctx.log {
        cmd.arg("--log")
            .arg(std::path::absolute(log).context("--log")?);
    }
    if let Some(socket) = &args.console_socket {
        let socket = std::path::absolute(socket).context("--console-socket")?;
        cmd.arg("--console-socket").arg(socket);
    }
    // SAFETY: the closure only calls async-signal-safe functions (setsid, fcntl) between fork
    // and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Own session: no controlling terminal, not killed with the caller's process group.
            libc::setsid();
            // The notify pipe must survive exec.
            let flags = libc::fcntl(write_fd, libc::F_GETFD);
            libc::fcntl(write_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Err(fail(entry, anyhow!("starting the monitor: {e}"))),
    };
    drop(write_end);
    let mut report = String::new();
    let _ = std::fs::File::from(read_end).read_to_string(&mut report);
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

pub(super) fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let tmp = path.with_extension("tmp-husk");
    std::fs::write(&tmp, pid.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// `husk create`.
pub fn create(ctx: &Context, args: CreateArgs) -> Result<ExitCode> {
    create_container(ctx, &args)?;
    Ok(ExitCode::SUCCESS)
}

fn start_container(ctx: &Context, id: &str) -> Result<()> {
    let entry = ctx.store().open(id)?;
    let st = entry.current()?;
    if st.status != Status::Created {
        bail!(
            "cannot start container {id}: it is {}, not created",
            st.status
        );
    }
    match monitor::request(&entry.sockets()?.monitor(), &MonitorRequest::Start)
        .map_err(anyhow::Error::msg)?
        .0
    {
        MonitorReply::Ok => {
            // Without the container's lock: a hook may well run `husk state`.
            let (kept, st) = (hooks::load_or_warn(entry.dir()), entry.current());
            drop(entry);
            if let (Some(kept), Ok(st)) = (kept, st) {
                hooks::run_warning(HookKind::Poststart, Some(&kept), &st);
            }
            crate::phases::record_now("start-returned");
            Ok(())
        }
        MonitorReply::Error(e) => bail!("starting container {id}: {e}"),
        other => bail!("starting container {id}: unexpected reply {other:?}"),
    }
}

/// `husk start`.
pub fn start(ctx: &Context, args: IdArg) -> Result<ExitCode> {
    start_container(ctx, &args.id)?;
    Ok(ExitCode::SUCCESS)
}

/// `husk state`.
pub fn state(ctx: &Context, args: IdArg) -> Result<ExitCode> {
    let entry = ctx.store().open(&args.id)?;
    let st = entry.current()?;
    println!("{}", serde_json::to_string_pretty(&st)?);
    Ok(ExitCode::SUCCESS)
}

/// A signal name (`TERM`, `SIGTERM`) or number.
pub fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("invalid signal number {n}");
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| anyhow!("unknown signal {s:?}"))
}

/// `husk kill`.
pub fn kill(ctx: &Context, args: KillArgs) -> Result<ExitCode> {
    let signal = parse_signal(&args.signal)?;
    let entry = ctx.store().open(&args.id)?;
    let st = entry.current()?;
    if !matches!(
        st.status,
        Status::Created | Status::Running | Status::Paused
    ) {
        // runc's words: the containerd shim recognises them as "already finished".
        bail!(
            "cannot kill container {}: container not running (it is {})",
            args.id,
            st.status
        );
    }
    let req = MonitorRequest::Kill {
        signal,
        all: args.all,
    };
    let first = match monitor::request(&entry.sockets()?.monitor(), &req) {
        Ok((first, _)) => first,
        // The process ended while the signal was on its way: the monitor went away with it.
        Err(_) if entry.current()?.status == Status::Stopped => {
            bail!("cannot kill container {}: container not running", args.id)
        }
        Err(e) => bail!(e),
    };
    match first {
        MonitorReply::Ok => Ok(ExitCode::SUCCESS),
        MonitorReply::Error(e) => bail!("signalling container {}: {e}", args.id),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// `husk delete`.
pub fn delete(ctx: &Context, args: DeleteArgs) -> Result<ExitCode> {
    let entry = ctx.store().open(&args.id)?;
    let st = entry.current()?;
    if st.status != Status::Stopped && !args.force {
        bail!(
            "cannot delete container {} that is {} (use --force)",
            args.id,
            st.status
        );
    }
    // A monitor that is still there (running, or just finishing) is stopped with its VM.
    if let Some(pid) = st.pid.filter(|_| state::monitor_alive(&st)) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while state::monitor_alive(&st) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if state::monitor_alive(&st) {
            bail!(
                "the monitor (pid {pid}) of container {} did not die",
                args.id
            );
        }
    }
    remove_entry(entry)?;
    Ok(ExitCode::SUCCESS)
}

/// Removes a container whose monitor is gone: first what a killed monitor could not undo in
/// the container's network namespace (its tap, qdiscs and filters), then the monitor's cgroup,
/// then the work directories of overlays remounted for `--monitor-uid`, then the state
/// directory, then runs its `poststop` hooks (the spec: after the container is
/// deleted, before `delete` returns; also after a failed `create`). A network or cgroup
/// cleanup that fails (an unreadable record, a namespace that cannot be entered) is reported
/// but does not keep the state directory: a retry could not do better.
fn remove_entry(entry: state::Entry) -> Result<()> {
    if let Err(e) = crate::monitor::network::teardown(entry.dir()) {
        let e = anyhow::Error::from(e);
        eprintln!("husk: cleaning up the container's network namespace: {e:#}");
    }
    // The monitor's cgroup (see monitor::cgroup); like the network, not worth keeping the
    // state for.
    if let Err(e) = crate::monitor::cgroup::remove(entry.dir()) {
        eprintln!("husk: {e}");
    }
    // The work directories of overlays remounted for `--monitor-uid` (monitor::overlay).
    if let Err(e) = crate::monitor::overlay::remove_workdirs(entry.dir(), &entry.id().to_string()) {
        eprintln!("husk: {e}");
    }
    let (kept, st) = (hooks::load_or_warn(entry.dir()), entry.read());
    entry.remove()?;
    if let (Some(kept), Ok(mut st)) = (kept, st) {
        st.status = Status::Stopped;
        hooks::run_warning(HookKind::Poststop, Some(&kept), &st);
    }
    Ok(())
}

/// `husk run`.
pub fn run(ctx: &Context, args: RunArgs) -> Result<ExitCode> {
    let mut child = create_container(ctx, &args.create)?;
    if let Err(e) = start_container(ctx, &args.create.id) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    if args.detach {
        return Ok(ExitCode::SUCCESS);
    }
    let status = child.wait().context("waiting for the monitor")?;
    let code = status.code().unwrap_or(255);
    // `run` without --detach cleans up after itself, as runc does.
    if let Ok(entry) = ctx.store().open(&args.create.id) {
        let _ = remove_entry(entry);
    }
    Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)))
}

/// The process JSON for `exec`: `--process`, or the container's process with ARGS and the
/// overrides.
fn exec_process(st: &State, args: &ExecArgs) -> Result<Vec<u8>> {
    if let Some(p) = &args.process {
        return std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    }
    if args.args.is_empty() {
        bail!("exec needs a command (ARGS) or --process");
    }
    let config = st.bundle.join("config.json");
    let data = std::fs::read(&config).with_context(|| format!("reading {}", config.display()))?;
    let spec: Spec =
        serde_json::from_slice(&data).with_context(|| format!("parsing {}", config.display()))?;
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| anyhow!("{}: no process", config.display()))?;
    process.set_args(Some(args.args.clone()));
    process.set_terminal(Some(false));
    let mut env = process.env().clone().unwrap_or_default();
    env.extend(args.env.iter().cloned());
    process.set_env(Some(env));
    if let Some(cwd) = &args.cwd {
        process.set_cwd(cwd.into());
    }
    if let Some(user) = &args.user {
        let (uid, gid) = match user.split_once(':') {
            Some((u, g)) => (u.parse::<u32>()?, Some(g.parse::<u32>()?)),
            None => (user.parse::<u32>()?, None),
        };
        let mut u = process.user().clone();
        u.set_uid(uid);
        if let Some(gid) = gid {
            u.set_gid(gid);
        }
        process.set_user(u);
    }
    Ok(serde_json::to_vec(&process)?)
}

/// Binds `vsock.sock_<port>` listeners for three consecutive free ports.
fn bind_stdio_ports(vsock: &Path) -> Result<(u32, [UnixListener; 3])> {
    // The monitor connects to them: they get the state directory's owner, which is the
    // monitor's uid under --monitor-uid (root's otherwise, a no-op).
    let dir = vsock.parent().unwrap_or(Path::new("."));
    let owner = std::fs::metadata(dir)
        .with_context(|| format!("reading the owner of {}", dir.display()))?;
    let (uid, gid) = (
        std::os::unix::fs::MetadataExt::uid(&owner),
        std::os::unix::fs::MetadataExt::gid(&owner),
    );
    let seed = std::process::id() % 10_000;
    for attempt in 0..1000u32 {
        let base = 10_000 + ((seed + attempt * 7) % 20_000) * 3;
        let mut bound = Vec::new();
        for p in base..base + 3 {
            let path = PathBuf::from(format!("{}_{p}", vsock.display()));
            // A port taken by another exec: its socket is not ours to remove.
            let Ok(l) = UnixListener::bind(&path) else {
                break;
            };
            bound.push((path, l));
        }
        if bound.len() < 3 {
            for (path, _) in bound {
                let _ = std::fs::remove_file(path);
            }
            continue;
        }
        for (path, _) in &bound {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to uid {uid}", path.display()))?;
        }
        let mut listeners = bound.into_iter().map(|(_, l)| l);
        let mut next = || listeners.next().expect("three bound");
        return Ok((base, [next(), next(), next()]));
    }
    bail!("no free vsock ports for exec")
}

/// `husk exec`.
pub fn exec(ctx: &Context, args: ExecArgs) -> Result<ExitCode> {
    if let Some(fd) = args.started_fd {
        // The exec relay lives as long as the exec'd process, as the monitor lives with the
        // container: nothing the engine leaked into `exec --detach` may live on in it.
        close_inherited_fds(fd);
    }
    let mut started = Started::new(args.pid_file.clone(), args.started_fd)?;
    let result = exec_attached(ctx, &args, &mut started);
    if let Err(e) = &result {
        started.fail(e);
    }
    result
}

/// `exec` after its flags were read: detached through the exec relay, or attached (which is
/// what the relay itself runs).
fn exec_attached(ctx: &Context, args: &ExecArgs, started: &mut Started) -> Result<ExitCode> {
    if args.console_socket.is_some() && !args.tty {
        bail!("--console-socket needs --tty");
    }
    if args.tty && args.detach && args.console_socket.is_none() {
        bail!("exec --tty --detach needs --console-socket (someone must hold the terminal)");
    }
    if args.detach && args.started_fd.is_some() {
        bail!("--started-fd is the exec relay's own flag; it cannot be --detach'ed");
    }
    // The sockets outlive the entry: the lock is not held while the process runs.
    let (sockets, st) = {
        let entry = ctx.store().open(&args.id)?;
        (entry.sockets()?, entry.current()?)
    };
    let (socket, vsock) = (sockets.monitor(), sockets.vsock());
    if st.status != Status::Running {
        bail!("cannot exec in container {}: it is {}", args.id, st.status);
    }
    let process_json = exec_process(&st, args)?;
    if args.detach {
        return super::exec_relay::detach(ctx, args);
    }
    if args.tty {
        return exec_tty(args, &socket, &vsock, process_json, started);
    }
    let (base, listeners) = bind_stdio_ports(&vsock)?;
    let cleanup = |base: u32| {
        for p in base..base + 3 {
            let _ = std::fs::remove_file(format!("{}_{p}", vsock.display()));
        }
    };
    let req = MonitorRequest::Exec {
        process_json,
        stdio: Stdio::Pipes {
            stdin: Some(VsockPort(base)),
            stdout: Some(VsockPort(base + 1)),
            stderr: Some(VsockPort(base + 2)),
        },
        console: false,
    };
    let (first, mut reader) = match monitor::request(&socket, &req) {
        Ok(r) => r,
        Err(e) => {
            cleanup(base);
            bail!(e);
        }
    };
    match first {
        MonitorReply::ExecStarted { exec, .. } => {
            Forwarder::block()?.start(socket.clone(), exec);
            started.ok()?;
        }
        MonitorReply::Error(e) => {
            cleanup(base);
            bail!("exec in container {}: {e}", args.id);
        }
        other => {
            cleanup(base);
            bail!("unexpected reply {other:?}");
        }
    }
    let [stdin_l, stdout_l, stderr_l] = listeners;
    let accept = |l: UnixListener| -> Result<std::os::unix::net::UnixStream> {
        l.set_nonblocking(false)?;
        Ok(l.accept()?.0)
    };
    let (stdin_c, stdout_c, stderr_c) = (accept(stdin_l)?, accept(stdout_l)?, accept(stderr_l)?);
    cleanup(base);
    std::thread::spawn(move || {
        let mut conn = stdin_c;
        let _ = std::io::copy(&mut std::io::stdin(), &mut conn);
        let _ = conn.shutdown(std::net::Shutdown::Write);
    });
    let out = std::thread::spawn(move || {
        let mut c = stdout_c;
        crate::monitor::copy_streaming(&mut c, &mut std::io::stdout());
    });
    let err = std::thread::spawn(move || {
        let mut c = stderr_c;
        crate::monitor::copy_streaming(&mut c, &mut std::io::stderr());
    });
    let reply = monitor::read_reply(&mut reader).map_err(anyhow::Error::msg)?;
    let _ = out.join();
    let _ = err.join();
    match reply {
        MonitorReply::Exited(code) => Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))),
        MonitorReply::Error(e) => bail!("exec in container {}: {e}", args.id),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// `exec --tty`: the process gets a pty in the guest, relayed to a host pty whose master goes
/// to `--console-socket` (engines), or to this command's own terminal (interactive use).
fn exec_tty(
    args: &ExecArgs,
    socket: &Path,
    vsock: &Path,
    process_json: Vec<u8>,
    started: &mut Started,
) -> Result<ExitCode> {
    use crate::monitor::console;
    let mut process: serde_json::Value = serde_json::from_slice(&process_json)?;
    process["terminal"] = serde_json::Value::Bool(true);
    let process_json = serde_json::to_vec(&process)?;
    if let Some(console_socket) = &args.console_socket {
        // The monitor holds the terminal; we only wait. We open the pty and hand its master
        // to the engine: the jailed monitor cannot reach the engine's socket by path.
        let (master, slave, name) = console::open_pty().map_err(anyhow::Error::msg)?;
        console::send_fd(console_socket, &name, &master).map_err(anyhow::Error::msg)?;
        drop(master);
        let req = MonitorRequest::Exec {
            process_json,
            stdio: Stdio::NULL,
            console: true,
        };
        let (first, mut reader) =
            monitor::request_with_fd(socket, &req, Some(std::os::fd::AsFd::as_fd(&slave)))
                .map_err(anyhow::Error::msg)?;
        drop(slave);
        match first {
            MonitorReply::ExecStarted { exec, .. } => {
                Forwarder::block()?.start(socket.to_path_buf(), exec);
                started.ok()?;
            }
            MonitorReply::Error(e) => bail!("exec in container {}: {e}", args.id),
            other => bail!("unexpected reply {other:?}"),
        }
        return match monitor::read_reply(&mut reader).map_err(anyhow::Error::msg)? {
            MonitorReply::Exited(code) => {
                Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)))
            }
            MonitorReply::Error(e) => bail!("exec in container {}: {e}", args.id),
            other => bail!("unexpected reply {other:?}"),
        };
    }
    // Interactive: our own terminal, in raw mode (the guest's pty does the line discipline).
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        bail!("exec --tty needs a terminal on stdin or --console-socket");
    }
    let (base, listeners) = bind_stdio_ports(vsock)?;
    let cleanup = || {
        for p in base..base + 3 {
            let _ = std::fs::remove_file(format!("{}_{p}", vsock.display()));
        }
    };
    let [term_l, _, _] = listeners;
    let req = MonitorRequest::Exec {
        process_json,
        stdio: Stdio::Terminal {
            port: VsockPort(base),
        },
        console: false,
    };
    let (first, mut reader) = match monitor::request(socket, &req) {
        Ok(r) => r,
        Err(e) => {
            cleanup();
            bail!(e);
        }
    };
    let exec_id = match first {
        MonitorReply::ExecStarted { exec, .. } => exec,
        MonitorReply::Error(e) => {
            cleanup();
            bail!("exec in container {}: {e}", args.id);
        }
        other => {
            cleanup();
            bail!("unexpected reply {other:?}");
        }
    };
    Forwarder::block()?.start(socket.to_path_buf(), exec_id);
    started.ok()?;
    let conn = term_l.accept().map(|(c, _)| c);
    cleanup();
    let conn = conn.context("accepting the guest's terminal connection")?;
    let (rtx, rrx) = std::sync::mpsc::channel::<husk_proto::WindowSize>();
    let monitor_socket = socket.to_path_buf();
    std::thread::spawn(move || {
        for size in rrx {
            let _ = monitor::request(
                &monitor_socket,
                &MonitorRequest::ResizeExec {
                    exec: exec_id,
                    size,
                },
            );
        }
    });
    let stdin = std::io::stdin();
    let orig = nix::sys::termios::tcgetattr(&stdin).context("reading the terminal mode")?;
    let mut raw = orig.clone();
    nix::sys::termios::cfmakeraw(&mut raw);
    nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw)
        .context("setting the terminal to raw mode")?;
    std::thread::spawn(move || {
        console::relay_terminal(
            conn,
            std::io::stdin(),
            std::io::stdout(),
            &std::io::stdin(),
            rtx,
        );
    });
    let reply = monitor::read_reply(&mut reader).map_err(anyhow::Error::msg);
    let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &orig);
    match reply? {
        MonitorReply::Exited(code) => Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))),
        MonitorReply::Error(e) => bail!("exec in container {}: {e}", args.id),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// `husk pause` / `husk resume`.
pub fn pause(ctx: &Context, args: IdArg, pause: bool) -> Result<ExitCode> {
    let entry = ctx.store().open(&args.id)?;
    let st = entry.current()?;
    let (want, verb) = if pause {
        (Status::Running, "pause")
    } else {
        (Status::Paused, "resume")
    };
    if st.status != want {
        bail!("cannot {verb} container {}: it is {}", args.id, st.status);
    }
    let req = if pause {
        MonitorRequest::Pause
    } else {
        MonitorRequest::Resume
    };
    match monitor::request(&entry.sockets()?.monitor(), &req)
        .map_err(anyhow::Error::msg)?
        .0
    {
        MonitorReply::Ok => Ok(ExitCode::SUCCESS),
        MonitorReply::Error(e) => bail!("{verb} {}: {e}", args.id),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// `husk events`: stats events as JSON lines (runc's format), once with --stats.
pub fn events(ctx: &Context, args: EventsArgs) -> Result<ExitCode> {
    loop {
        let sockets = {
            let entry = ctx.store().open(&args.id)?;
            let st = entry.current()?;
            if !matches!(st.status, Status::Created | Status::Running) {
                if args.stats {
                    bail!("container {} is {}", args.id, st.status);
                }
                return Ok(ExitCode::SUCCESS);
            }
            entry.sockets()?
        };
        let data = match monitor::request(&sockets.monitor(), &MonitorRequest::Stats)
            .map_err(anyhow::Error::msg)?
            .0
        {
            MonitorReply::Stats(d) => d,
            MonitorReply::Error(e) => bail!("stats of {}: {e}", args.id),
            other => bail!("unexpected reply {other:?}"),
        };
        let ev = serde_json::json!({"type": "stats", "id": args.id, "data": data});
        println!("{ev}");
        if args.stats {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs(args.interval.max(1)));
    }
}

/// `husk ps`.
pub fn ps(ctx: &Context, args: PsArgs) -> Result<ExitCode> {
    let entry = ctx.store().open(&args.id)?;
    let st = entry.current()?;
    if !matches!(
        st.status,
        Status::Created | Status::Running | Status::Paused
    ) {
        bail!("container {} is {}", args.id, st.status);
    }
    let pids = match monitor::request(&entry.sockets()?.monitor(), &MonitorRequest::Ps)
        .map_err(anyhow::Error::msg)?
        .0
    {
        MonitorReply::Pids(p) => p,
        MonitorReply::Error(e) => bail!("ps {}: {e}", args.id),
        other => bail!("unexpected reply {other:?}"),
    };
    match args.format.as_str() {
        "json" => println!("{}", serde_json::to_string(&pids)?),
        "table" => {
            println!("PID");
            for p in pids {
                println!("{p}");
            }
        }
        other => bail!("unknown format {other:?} (table or json)"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `husk list`.
pub fn list(ctx: &Context, args: ListArgs) -> Result<ExitCode> {
    let store = ctx.store();
    let mut states = Vec::new();
    for id in store.list()? {
        if let Ok(entry) = store.open(&id)
            && let Ok(st) = entry.current()
        {
            states.push(st);
        }
    }
    if args.quiet {
        for s in &states {
            println!("{}", s.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    match args.format.as_str() {
        "json" => println!("{}", serde_json::to_string(&states)?),
        "table" => {
            println!(
                "{:<20} {:<8} {:<10} {:<40} CREATED",
                "ID", "PID", "STATUS", "BUNDLE"
            );
            for s in &states {
                let pid = s.pid.filter(|_| s.status != Status::Stopped).unwrap_or(0);
                println!(
                    "{:<20} {:<8} {:<10} {:<40} {}",
                    s.id,
                    pid,
                    s.status,
                    s.bundle.display(),
                    s.created
                );
            }
        }
        other => bail!("unknown format {other:?} (table or json)"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `husk features`.
pub fn features() -> Result<ExitCode> {
    let v = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": state::OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": ["ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
            "bind", "rbind", "private", "rprivate", "shared", "rshared", "slave", "rslave",
            "relatime", "norelatime", "strictatime", "nostrictatime", "mode", "size"],
        "linux": {
            "namespaces": ["pid", "mount", "uts", "ipc", "user", "cgroup", "network"],
            "capabilities": caps::all().iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": true, "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO",
                "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
                "SCMP_ACT_LOG"], "operators": ["SCMP_CMP_EQ", "SCMP_CMP_NE", "SCMP_CMP_LT",
                "SCMP_CMP_LE", "SCMP_CMP_GT", "SCMP_CMP_GE", "SCMP_CMP_MASKED_EQ"],
                "archs": ["SCMP_ARCH_X86_64"]},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.husk.vm.memory_mib": "guest RAM in MiB (default: memory limit + 64, or 256)",
            "io.husk.vm.vcpus": "vCPUs (default: the size of cpu.cpus, else CPU quota rounded up, or 1)"
        }
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}

/// `husk spec`.
pub fn spec(args: SpecArgs) -> Result<ExitCode> {
    let path = args.bundle.join("config.json");
    if path.exists() {
        bail!("{} already exists; remove it first", path.display());
    }
    let spec = Spec::default();
    let json = serde_json::to_string_pretty(&spec)?;
    let mut f =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(json.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// The hidden `monitor` command.
pub fn monitor(ctx: &Context, args: MonitorCmdArgs, process_start: Instant) -> ExitCode {
    // Make sure the notify fd is ours (and close-on-exec from here on).
    // SAFETY: the fd number was given to us by `create`, which left it open for us.
    let fd = unsafe { OwnedFd::from_raw_fd(args.notify_fd) };
    // Not for the hooks the monitor runs: one that leaves a child behind would hold `create`'s
    // pipe open, and `create` waits for its end.
    let _ = nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let raw = fd.as_raw_fd();
    std::mem::forget(fd);
    close_inherited_fds(raw);
    monitor::run(
        MonitorArgs {
            root: ctx.root.clone(),
            id: args.id,
            bundle: args.bundle,
            notify_fd: raw,
            console: ctx.debug,
            console_socket: args.console_socket,
            log: ctx.log.clone(),
            user: ctx.monitor_uid,
        },
        process_start,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("TERM").unwrap(), 15);
        assert_eq!(parse_signal("SIGKILL").unwrap(), 9);
        assert_eq!(parse_signal("kill").unwrap(), 9);
        assert_eq!(parse_signal("2").unwrap(), 2);
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("SIGNOPE").is_err());
    }

    /// A container whose monitor is gone (pid 0 never names one) is stopped: `kill` says so
    /// in runc's words, which the containerd shim maps to "process already finished".
    #[test]
    fn killing_a_stopped_container_says_not_running() {
        let root = std::env::temp_dir().join(format!("husk-kill-stopped-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let ctx = Context {
            log: None,
            log_format: super::super::log::Format::Text,
            root: root.clone(),
            debug: false,
            monitor_uid: None,
        };
        let entry = ctx.store().create("c1").unwrap();
        entry
            .write(&State {
                oci_version: state::OCI_VERSION.into(),
                id: "c1".into(),
                status: Status::Running,
                pid: Some(0),
                bundle: root.clone(),
                annotations: Default::default(),
                created: state::now_rfc3339(),
                monitor_start_time: 0,
                exit_status: Some(0),
            })
            .unwrap();
        drop(entry);
        let args = KillArgs {
            id: "c1".into(),
            signal: "TERM".into(),
            all: false,
        };
        let e = kill(&ctx, args).unwrap_err().to_string();
        assert!(
            e.contains("c1") && e.contains("container not running"),
            "{e}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
