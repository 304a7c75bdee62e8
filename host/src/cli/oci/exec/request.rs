//! The exec request and what `husk exec` makes of the monitor's replies: the first says the
//! process runs (or why not), and from then on this command stands for it; the last gives its
//! exit status.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Result, bail};

use super::super::exit_code;
use super::relay::Started;
use super::signals::Forwarder;
use crate::monitor::api::{MonitorReply, MonitorRequest};
use crate::monitor::client;

/// Sends exec request `req` for container `id` to the monitor at `socket` (with the pty's
/// `slave` for an exec whose terminal the monitor holds). Returns the exec's id and the
/// connection on which its exit status comes, once the process runs.
pub(super) fn send(
    socket: &Path,
    req: &MonitorRequest,
    slave: Option<BorrowedFd<'_>>,
    id: &str,
) -> Result<(u32, client::Replies)> {
    let (first, reader) =
        client::request_with_fd(socket, req, slave).map_err(anyhow::Error::msg)?;
    match first {
        MonitorReply::ExecStarted { exec, .. } => Ok((exec, reader)),
        MonitorReply::Error(e) => bail!("exec in container {id}: {e}"),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// The exec'd process `exec` runs: from now on signals sent to this command go on to it
/// through the monitor at `socket`, and whoever waits for it to run is told so.
pub(super) fn running(socket: &Path, exec: u32, started: &mut Started) -> Result<()> {
    Forwarder::block()?.start(socket.to_path_buf(), exec);
    started.ok()
}

/// The exit code of `husk exec` (the relay's, attached or not) from the monitor's last reply
/// about the exec'd process of container `id`: its exit status.
pub(super) fn exited(reply: MonitorReply, id: &str) -> Result<ExitCode> {
    match reply {
        MonitorReply::Exited(code) => Ok(exit_code(code)),
        MonitorReply::Error(e) => bail!("exec in container {id}: {e}"),
        other => bail!("unexpected reply {other:?}"),
    }
}
