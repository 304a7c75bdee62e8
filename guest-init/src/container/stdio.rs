//! A process's stdio on the parent's side: the guest ends of its streams to the host, and,
//! for a terminal, the channel on which the process sends back the pty master it opened in
//! its own mount namespace (see `console`).

use std::fs::File;

use husk_proto::ErrorReply;

use super::reply::sys_reply;
use super::{console, sync};
use crate::relay::{ChildStdio, ProcessIo};
use crate::transport::Transport;

/// Both ends of the channel that carries a terminal's master from the process to us.
pub(super) type ConsoleChannel = (console::Receiver, console::Sender);

/// Connects a process's stdio. A terminal also gets the channel on which the process sends
/// its pty master (it opens the pty itself, in the container; see `console`). The streams
/// go to the host over `transport`.
pub(super) fn setup_stdio(
    stdio: &husk_proto::Stdio,
    transport: &Transport,
) -> Result<(ChildStdio, ProcessIo, Option<ConsoleChannel>), ErrorReply> {
    let (child, io) =
        ProcessIo::setup(stdio, transport).map_err(|e| sys_reply("setting up stdio", e))?;
    let console = match child {
        ChildStdio::Terminal => {
            Some(console::channel().map_err(|e| sys_reply("creating the terminal channel", e))?)
        }
        ChildStdio::Fds { .. } => None,
    };
    Ok((child, io, console))
}

/// Parent side: takes the master the child sends and relays it. If the child failed first,
/// its own report says why.
pub(super) fn receive_terminal(
    console: Option<console::Receiver>,
    io: &mut ProcessIo,
    report: &mut File,
) -> Result<(), ErrorReply> {
    let Some(rx) = console else { return Ok(()) };
    match rx.receive() {
        Ok(master) => io
            .attach_terminal(master)
            .map_err(|e| sys_reply("relaying the terminal", e)),
        Err(e) => Err(match sync::read_report(report) {
            Ok(sync::ChildReport::Failed(ce)) => ce.into(),
            _ => sys_reply("receiving the process's terminal", e),
        }),
    }
}
