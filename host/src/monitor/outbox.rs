//! The serving loop's requests to husk-init.
//!
//! A guest that stops taking what the monitor sends (it withholds vsock credit, so the vsock
//! device stops reading the host socket, whose buffer fills) must not stall the serving loop:
//! every `husk` command of the container goes through it, those that need no guest (`pause`,
//! `resume`) included. So requests are written by a thread of their own (`guest-writer`), from
//! a queue of [`QUEUE`] requests; the loop only queues them. When the queue is full the
//! request fails at once, and the command with it ("husk-init is not taking requests"); a
//! request already queued is answered when the guest answers, or not, and its command gives up
//! at its own deadline.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use husk_proto::{HostMessage, ProtoError, Request, RequestId};
use husk_seccomp::ThreadKind;

use super::threads;

/// Requests waiting for the guest to take them, at most.
pub(super) const QUEUE: usize = 16;

/// Why a request was not queued.
#[derive(Debug, thiserror::Error)]
pub(super) enum OutboxError {
    /// The request could not be encoded.
    #[error("husk-init: {0}")]
    Encode(#[source] ProtoError),
    /// The queue is full: husk-init takes nothing.
    #[error("husk-init is not taking requests ({QUEUE} are waiting)")]
    Full,
    /// The writer is gone: the connection failed.
    #[error("the connection to husk-init is closed")]
    Closed,
}

/// The queue of requests to husk-init and the id of the next one.
#[derive(Debug)]
pub(super) struct Outbox {
    frames: SyncSender<Vec<u8>>,
    next_id: u64,
}

impl Outbox {
    /// Starts the writer on `conn`; the first request gets id `first_id`.
    pub(super) fn new(conn: UnixStream, first_id: RequestId) -> Outbox {
        let (frames, queued) = sync_channel(QUEUE);
        threads::spawn("guest-writer", ThreadKind::Guest, move || {
            write_all(conn, &queued);
        });
        Outbox {
            frames,
            next_id: first_id.0,
        }
    }

    /// Queues `request`; returns its id.
    pub(super) fn send(&mut self, request: Request) -> Result<RequestId, OutboxError> {
        let id = RequestId(self.next_id);
        let mut frame = Vec::new();
        husk_proto::write_message(&mut frame, &HostMessage::Request { id, request })
            .map_err(OutboxError::Encode)?;
        match self.frames.try_send(frame) {
            Ok(()) => {
                self.next_id += 1;
                Ok(id)
            }
            Err(TrySendError::Full(_)) => Err(OutboxError::Full),
            Err(TrySendError::Disconnected(_)) => Err(OutboxError::Closed),
        }
    }
}

/// The writer: each queued frame, until the queue is dropped or the connection fails.
fn write_all(mut conn: UnixStream, queued: &Receiver<Vec<u8>>) {
    for frame in queued {
        if conn.write_all(&frame).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// A guest that reads nothing: the requests fill the socket, then the queue, and still
    /// every `send` returns at once; the ones past the queue fail, saying so.
    #[test]
    fn a_guest_that_takes_nothing_does_not_stall_the_sender() {
        let (conn, guest) = UnixStream::pair().unwrap();
        let mut outbox = Outbox::new(conn, RequestId(2));
        let big = vec![b'x'; 256 << 10];
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut results = Vec::new();
            for _ in 0..QUEUE * 4 {
                let t = Instant::now();
                let sent = outbox.send(Request::Exec(Box::new(husk_proto::ExecRequest {
                    container: husk_proto::ContainerRef::FIRST,
                    exec_id: husk_proto::ExecId(1),
                    process_json: big.clone(),
                    stdio: husk_proto::Stdio::NULL,
                })));
                results.push((sent.map_err(|e| e.to_string()), t.elapsed()));
            }
            let _ = tx.send(results);
        });
        let results = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("sending to a guest that takes nothing stalled");
        drop(guest);
        assert!(
            results
                .iter()
                .all(|(_, took)| *took < Duration::from_secs(1)),
            "{results:?}"
        );
        let refused: Vec<&String> = results
            .iter()
            .filter_map(|(r, _)| r.as_ref().err())
            .collect();
        assert!(!refused.is_empty(), "the queue never filled");
        assert!(refused[0].contains("not taking requests"), "{refused:?}");
        assert!(matches!(results[0].0, Ok(RequestId(2))), "{:?}", results[0]);
    }
}
