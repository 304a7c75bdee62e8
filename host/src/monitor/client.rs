//! The `husk` commands' side of the control socket (`<state dir>/monitor.sock`, the messages
//! are in `api`): a request, its first reply within [`reply_timeout`], and later replies on
//! the same connection.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::api::{self, MonitorReply, MonitorRequest};

/// How long a `husk` command waits for the first answer to a request (the monitor relays most
/// requests to husk-init, so a hung guest would otherwise hang the command): 120 s, or
/// `HUSK_REPLY_TIMEOUT` seconds. Generous because a loaded nested-KVM host can take tens of
/// seconds to exec a process in the guest. Later replies (an exec'd process's exit) are
/// waited for without limit.
pub fn reply_timeout() -> Duration {
    std::env::var("HUSK_REPLY_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(Duration::from_secs(120), Duration::from_secs)
}

/// Sends one request to a container's monitor and returns its first reply (and the stream,
/// for requests with later replies). Gives up after [`reply_timeout`].
pub fn request(
    socket: &Path,
    req: &MonitorRequest,
) -> Result<(MonitorReply, BufReader<UnixStream>), String> {
    request_with_fd(socket, req, None)
}

/// [`request`], passing `fd` along with it (see [`api::send_request`]).
pub fn request_with_fd(
    socket: &Path,
    req: &MonitorRequest,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(MonitorReply, BufReader<UnixStream>), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the container's monitor at {}: {e}",
            socket.display()
        )
    })?;
    api::send_request(&mut stream, req, fd).map_err(|e| format!("talking to the monitor: {e}"))?;
    let limit = reply_timeout();
    stream
        .set_read_timeout(Some(limit))
        .map_err(|e| format!("talking to the monitor: {e}"))?;
    let mut reader = BufReader::new(stream);
    let reply = read_reply(&mut reader)?;
    reader
        .get_ref()
        .set_read_timeout(None)
        .map_err(|e| format!("talking to the monitor: {e}"))?;
    Ok((reply, reader))
}

/// Reads the next reply line.
pub fn read_reply(reader: &mut BufReader<UnixStream>) -> Result<MonitorReply, String> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Err("the monitor closed the connection (the container stopped?)".into()),
        Ok(_) => {
            serde_json::from_str(&line).map_err(|e| format!("bad reply from the monitor: {e}"))
        }
        // Only `request` sets a read timeout, for the first reply.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(format!(
                "no answer from the container's VM within {} s (is the guest hung?); HUSK_REPLY_TIMEOUT sets the limit in seconds",
                reply_timeout().as_secs()
            ))
        }
        Err(e) => Err(format!("reading the monitor's reply: {e}")),
    }
}
