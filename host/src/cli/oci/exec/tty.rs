//! `husk exec --tty`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use husk_proto::{Stdio, VsockPort};

use super::args::ExecArgs;
use super::ports;
use super::relay::{Started, exited};
use super::signals::Forwarder;
use crate::monitor::api::{MonitorReply, MonitorRequest};
use crate::monitor::{client, console};

/// `exec --tty`: the process gets a pty in the guest, relayed to a host pty whose master goes
/// to `--console-socket` (engines), or to this command's own terminal (interactive use).
pub(super) fn run(
    args: &ExecArgs,
    socket: &Path,
    vsock: &Path,
    process_json: Vec<u8>,
    started: &mut Started,
) -> Result<ExitCode> {
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
            client::request_with_fd(socket, &req, Some(std::os::fd::AsFd::as_fd(&slave)))
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
        let reply = client::read_reply(&mut reader).map_err(anyhow::Error::msg)?;
        return exited(reply, &args.id);
    }
    // Interactive: our own terminal, in raw mode (the guest's pty does the line discipline).
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        bail!("exec --tty needs a terminal on stdin or --console-socket");
    }
    let (base, listeners) = ports::bind(vsock)?;
    let [term_l, _, _] = listeners;
    let req = MonitorRequest::Exec {
        process_json,
        stdio: Stdio::Terminal {
            port: VsockPort(base),
        },
        console: false,
    };
    let (first, mut reader) = match client::request(socket, &req) {
        Ok(r) => r,
        Err(e) => {
            ports::remove(vsock, base);
            bail!(e);
        }
    };
    let exec_id = match first {
        MonitorReply::ExecStarted { exec, .. } => exec,
        MonitorReply::Error(e) => {
            ports::remove(vsock, base);
            bail!("exec in container {}: {e}", args.id);
        }
        other => {
            ports::remove(vsock, base);
            bail!("unexpected reply {other:?}");
        }
    };
    Forwarder::block()?.start(socket.to_path_buf(), exec_id);
    started.ok()?;
    let conn = term_l.accept().map(|(c, _)| c);
    ports::remove(vsock, base);
    let conn = conn.context("accepting the guest's terminal connection")?;
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
