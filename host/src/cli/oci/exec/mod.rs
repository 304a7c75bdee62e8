//! `husk exec`: another process in a running container, i.e. in its VM. Attached, this
//! command relays the process's stdio (`ports`; a terminal with `--tty`, `tty`) and exits with
//! its status (`request`: what the monitor's replies mean); with `--detach` it starts the
//! *exec relay* (`relay`), an attached `husk exec` of its own that stands for the process, and
//! returns once the process runs. Signals sent to an attached exec go on to the process
//! (`signals`). Where the exec is asked for and its streams come back is `endpoints`.

mod args;
mod endpoints;
mod relay;
mod request;
mod signals;
mod tty;

use std::os::unix::net::UnixListener;
use std::process::ExitCode;

use anyhow::{Context as _, Result, anyhow, bail};
use husk_proto::{Stdio, VsockPort};
use oci_spec::runtime::Spec;

pub use self::args::ExecArgs;
use self::endpoints::Endpoints;
use self::relay::Started;
use self::request::exited;
use super::{Context, close_inherited_fds};
use crate::monitor::api::MonitorRequest;
use crate::monitor::client;
use crate::oci::ports;
use crate::oci::state::{State, Status};

/// `husk exec`.
pub fn exec(ctx: &Context, args: ExecArgs) -> Result<ExitCode> {
    if let Some(fd) = args.started_fd {
        // The exec relay lives as long as the exec'd process, as the monitor lives with the
        // container: nothing the engine leaked into `exec --detach` may live on in it.
        close_inherited_fds(&[fd]);
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
    let (ends, st) = {
        let entry = ctx.store().open(&args.id)?;
        (Endpoints::of(&entry)?, entry.current()?)
    };
    if st.status != Status::Running {
        bail!("cannot exec in container {}: it is {}", args.id, st.status);
    }
    let process_json = exec_process(&st, args)?;
    if args.detach {
        return relay::detach(ctx, args);
    }
    if args.tty {
        return tty::run(args, &ends, process_json, started);
    }
    exec_pipes(args, &ends, process_json, started)
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

/// An attached exec without a terminal: its stdin, stdout and stderr relayed over three
/// ports.
fn exec_pipes(
    args: &ExecArgs,
    ends: &Endpoints,
    process_json: Vec<u8>,
    started: &mut Started,
) -> Result<ExitCode> {
    let socket = &ends.own.monitor();
    let (base, listeners) = ports::bind(&ends.vm).context("binding the exec's stdio ports")?;
    let req = MonitorRequest::Exec {
        process_json,
        stdio: Stdio::Pipes {
            stdin: Some(VsockPort(base)),
            stdout: Some(VsockPort(base + 1)),
            stderr: Some(VsockPort(base + 2)),
        },
        console: false,
    };
    let (exec, mut reader) = request::send(socket, &req, None, &args.id).inspect_err(|_| {
        ports::remove(&ends.vm, base, 3);
    })?;
    request::running(socket, exec, started)?;
    let [stdin_l, stdout_l, stderr_l] = listeners;
    let deadline = std::time::Instant::now() + client::reply_timeout();
    let accept = |l: UnixListener| ports::accept_by(&l, deadline);
    let (stdin_c, stdout_c, stderr_c) = (accept(stdin_l)?, accept(stdout_l)?, accept(stderr_l)?);
    ports::remove(&ends.vm, base, 3);
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
    let reply = client::read_reply(&mut reader).map_err(anyhow::Error::msg)?;
    let _ = out.join();
    let _ = err.join();
    exited(reply, &args.id)
}
