//! `husk exec --tty`.

use std::os::fd::AsFd;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use husk_proto::{Stdio, VsockPort};

use super::args::ExecArgs;
use super::endpoints::Endpoints;
use super::relay::Started;
use super::request::{self, exited};
use crate::monitor::api::MonitorRequest;
use crate::monitor::{client, console};
use crate::oci::ports;

/// `exec --tty`: the process gets a pty in the guest, relayed to a host pty whose master goes
/// to `--console-socket` (engines), or to this command's own terminal (interactive use).
pub(super) fn run(
    args: &ExecArgs,
    ends: &Endpoints,
    process_json: Vec<u8>,
    started: &mut Started,
) -> Result<ExitCode> {
    let mut process: serde_json::Value = serde_json::from_slice(&process_json)?;
    process["terminal"] = serde_json::Value::Bool(true);
    let process_json = serde_json::to_vec(&process)?;
    let socket = &ends.own.monitor();
    if let Some(console_socket) = &args.console_socket {
        // The monitor holds the terminal; we only wait. We open the pty and hand its master
        // to the engine: the jailed monitor cannot reach the engine's socket by path.
        let (master, slave, name) = console::open_pty()?;
        console::send_fd(console_socket, &name, &master)?;
        drop(master);
        let req = MonitorRequest::Exec {
            process_json,
            stdio: Stdio::NULL,
            console: true,
        };
        let sent = request::send(socket, &req, Some(slave.as_fd()), &args.id);
        drop(slave);
        let (exec, mut reader) = sent?;
        request::running(socket, exec, started)?;
        let reply = client::read_reply(&mut reader).map_err(anyhow::Error::msg)?;
        return exited(reply, &args.id);
    }
    // Interactive: our own terminal, in raw mode (the guest's pty does the line discipline).
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        bail!("exec --tty needs a terminal on stdin or --console-socket");
    }
    let (base, listeners) = ports::bind(&ends.vm).context("binding the exec's stdio ports")?;
    let [term_l, _, _] = listeners;
    let req = MonitorRequest::Exec {
        process_json,
        stdio: Stdio::Terminal {
            port: VsockPort(base),
        },
        console: false,
    };
    let (exec_id, mut reader) = request::send(socket, &req, None, &args.id).inspect_err(|_| {
        ports::remove(&ends.vm, base, 3);
    })?;
    request::running(socket, exec_id, started)?;
    let conn = ports::accept_by(&term_l, std::time::Instant::now() + client::reply_timeout());
    ports::remove(&ends.vm, base, 3);
    let conn = conn.context("the guest's terminal connection")?;
    let (rtx, rrx) = std::sync::mpsc::channel::<husk_proto::WindowSize>();
    let monitor_socket = socket.to_path_buf();
    std::thread::spawn(move || {
        for size in rrx {
            let _ = client::request(
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
    let reply = client::read_reply(&mut reader).map_err(anyhow::Error::msg);
    let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &orig);
    exited(reply?, &args.id)
}
