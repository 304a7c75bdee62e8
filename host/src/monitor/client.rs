//! The `husk` commands' side of the control socket (`<state dir>/monitor.sock`, the messages
//! are in `api`): a request, its first reply within [`reply_timeout`], and later replies on
//! the same connection.
//!
//! The monitor serves a guest that may have taken it over, and the commands that talk to it
//! run as root: a reply is read at most [`MAX_REPLY`] bytes long, and the first one within one
//! deadline for the whole of it (not a timeout per read, which a monitor sending a byte now
//! and then would keep from ever expiring).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

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

/// The longest reply line a command reads: far more than any reply needs (the largest, a
/// `ps` of a container with a hundred thousand processes, is under a megabyte).
pub const MAX_REPLY: usize = 4 << 20;

/// The replies on a connection to a monitor, one JSON line each.
#[derive(Debug)]
pub struct Replies {
    stream: UnixStream,
    /// What was read past the last reply.
    pending: Vec<u8>,
}

impl Replies {
    /// The next reply: given up on at `deadline` (`None`: waited for without limit), and
    /// refused once it is longer than [`MAX_REPLY`].
    fn next(&mut self, deadline: Option<(Instant, Duration)>) -> Result<MonitorReply, String> {
        let gave_up = |limit: Duration| {
            format!(
                "no answer from the container's VM within {} s (is the guest hung?); HUSK_REPLY_TIMEOUT sets the limit in seconds",
                limit.as_secs()
            )
        };
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return serde_json::from_slice(&line)
                    .map_err(|e| format!("bad reply from the monitor: {e}"));
            }
            if self.pending.len() > MAX_REPLY {
                return Err(format!(
                    "a reply from the monitor longer than {MAX_REPLY} bytes (refused)"
                ));
            }
            let timeout = match deadline {
                None => None,
                Some((at, limit)) => match at.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(gave_up(limit)),
                },
            };
            self.stream
                .set_read_timeout(timeout)
                .map_err(|e| format!("talking to the monitor: {e}"))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err("the monitor closed the connection (the container stopped?)".into());
                }
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(gave_up(deadline.map_or(Duration::ZERO, |(_, l)| l)));
                }
                Err(e) => return Err(format!("reading the monitor's reply: {e}")),
            }
        }
    }
}

/// Sends one request to a container's monitor and returns its first reply (and the
/// connection, for requests with later replies). Gives up after [`reply_timeout`].
pub fn request(socket: &Path, req: &MonitorRequest) -> Result<(MonitorReply, Replies), String> {
    request_with_fd(socket, req, None)
}

/// [`request`], passing `fd` along with it (see [`api::send_request`]).
pub fn request_with_fd(
    socket: &Path,
    req: &MonitorRequest,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(MonitorReply, Replies), String> {
    request_within(socket, req, fd, reply_timeout())
}

/// [`request_with_fd`], the first reply within `limit`.
fn request_within(
    socket: &Path,
    req: &MonitorRequest,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    limit: Duration,
) -> Result<(MonitorReply, Replies), String> {
    let deadline = Instant::now() + limit;
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the container's monitor at {}: {e}",
            socket.display()
        )
    })?;
    api::send_request(&mut stream, req, fd).map_err(|e| format!("talking to the monitor: {e}"))?;
    let mut replies = Replies {
        stream,
        pending: Vec::new(),
    };
    let reply = replies.next(Some((deadline, limit)))?;
    Ok((reply, replies))
}

/// Reads the next reply, without a time limit (an exec'd process's exit comes when it comes).
pub fn read_reply(replies: &mut Replies) -> Result<MonitorReply, String> {
    replies.next(None)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;
    use std::time::Instant;

    use super::*;

    /// A monitor that reads the request line, then writes `answer` into the connection.
    fn fake_monitor(
        name: &str,
        answer: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (std::path::PathBuf, std::thread::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!("husk-client-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("monitor.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let thread = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut b = [0u8];
            while conn.read(&mut b).is_ok_and(|n| n == 1) && b[0] != b'\n' {}
            answer(conn);
        });
        (socket, thread)
    }

    /// What the call gave, or `None` if it had not returned within `wait`.
    fn within<T: Send + 'static>(
        wait: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(wait).ok()
    }

    #[test]
    fn an_endless_reply_line_is_refused_not_read_into_memory() {
        let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = written.clone();
        // 64 MiB without a newline, then the connection closes.
        let (socket, monitor) = fake_monitor("endless", move |mut conn| {
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..1024 {
                if conn.write_all(&chunk).is_err() {
                    return;
                }
                count.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
            }
        });
        let path = socket.clone();
        let got = within(Duration::from_secs(60), move || {
            request_within(&path, &MonitorRequest::Start, None, Duration::from_secs(30))
                .map(|(reply, _)| reply)
        })
        .expect("the request did not return");
        monitor.join().unwrap();
        let _ = std::fs::remove_dir_all(socket.parent().unwrap());
        let err = got.unwrap_err();
        assert!(err.contains("longer than"), "{err}");
        let written = written.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            written < 16 << 20,
            "the command took {written} bytes of one reply"
        );
    }

    #[test]
    fn a_trickling_reply_ends_at_the_deadline() {
        // A byte every 50 ms, never a newline: each read comes well within the limit.
        let (socket, monitor) = fake_monitor("trickle", |mut conn| {
            while conn.write_all(b"x").is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let path = socket.clone();
        let started = Instant::now();
        let got = within(Duration::from_secs(10), move || {
            request_within(&path, &MonitorRequest::Start, None, Duration::from_secs(1))
                .map(|(reply, _)| reply)
        });
        let took = started.elapsed();
        let _ = std::fs::remove_dir_all(socket.parent().unwrap());
        let err = got
            .expect("the request went on past its deadline")
            .unwrap_err();
        assert!(err.contains("no answer"), "{err}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        drop(monitor);
    }
}
