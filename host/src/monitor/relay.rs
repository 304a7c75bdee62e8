//! Copying a process's stdio between the monitor's own descriptors (what the engine gave
//! `husk create`) and the guest's stream connections (accepted on `vsock.sock_<port>`).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_seccomp::ThreadKind;

/// Accepts the guest's connection on `listener`, then copies `from` into it until EOF and
/// half-closes it (the guest then closes the process's stdin). (Not `std::io::copy`, which
/// between two descriptors may splice or sendfile: calls the relays' filter need not allow.)
pub fn stdin(listener: UnixListener, mut from: impl Read + Send + 'static) -> JoinHandle<()> {
    super::threads::spawn("stdin", ThreadKind::Relay, move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        drop(listener);
        copy_streaming(&mut from, &mut conn);
        let _ = conn.shutdown(Shutdown::Write);
    })
}

/// How long an output relay may go without the reader taking anything, once the process has
/// exited, before the monitor stops waiting for it (see [`Output::finish`]).
pub const OUTPUT_STALL: Duration = Duration::from_secs(10);

/// A relay of the guest's output to one of the monitor's descriptors.
#[derive(Debug)]
pub struct Output {
    thread: JoinHandle<()>,
    /// Bytes written so far.
    progress: Arc<AtomicU64>,
    name: &'static str,
}

/// Accepts the guest's connection on `listener`, then copies it into `to` until the guest
/// closes it. The copy is bounded in memory whatever the reader does: one buffer here, and
/// the vsock device holds no more than the credit it gave the guest, so a reader that is slow
/// or gone makes the guest's writer block, not the monitor grow.
pub fn output(
    listener: UnixListener,
    mut to: impl Write + Send + 'static,
    name: &'static str,
) -> Output {
    let progress = Arc::new(AtomicU64::new(0));
    let counter = progress.clone();
    let thread = super::threads::spawn(name, ThreadKind::Relay, move || {
        let Ok((conn, _)) = listener.accept() else {
            return;
        };
        drop(listener);
        let mut conn = conn;
        copy_counting(&mut conn, &mut to, &counter);
    });
    Output {
        thread,
        progress,
        name,
    }
}

impl Output {
    /// Waits until everything the guest wrote has been written out, for as long as the reader
    /// keeps taking it: a reader that takes nothing for `stall` (an engine that stopped
    /// reading) is given up on, with a log line, and the rest of the output is dropped when
    /// the monitor exits. Returns whether the relay finished.
    pub fn finish(self, stall: Duration) -> bool {
        let mut last = self.progress.load(Ordering::Relaxed);
        let mut since = Instant::now();
        while !self.thread.is_finished() {
            let now = self.progress.load(Ordering::Relaxed);
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= stall {
                eprintln!(
                    "husk monitor: the container's {} took nothing for {} s after the process exited; dropping the rest of its output",
                    self.name,
                    stall.as_secs()
                );
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.thread.join();
        true
    }
}

/// Copies `from` into `to` until EOF or an error, flushing as it goes (a terminal or pipe
/// reader sees output as it is produced).
pub fn copy_streaming(from: &mut impl Read, to: &mut impl Write) {
    copy_counting(from, to, &AtomicU64::new(0));
}

/// [`copy_streaming`], adding what it wrote to `written`.
fn copy_counting(from: &mut impl Read, to: &mut impl Write, written: &AtomicU64) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                let _ = to.flush();
                written.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn relay_into(to: std::fs::File) -> (Output, UnixStream, crate::oci::sockets::SocketDir) {
        let dir = std::env::temp_dir().join(format!(
            "husk-relay-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let sockets = crate::oci::sockets::SocketDir::open(&dir).unwrap();
        let path = sockets.vsock_port(1);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let out = output(listener, to, "stdout");
        let guest = UnixStream::connect(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        (out, guest, sockets)
    }

    #[test]
    fn a_reader_that_stops_reading_is_given_up_on() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let (out, mut guest, _s) = relay_into(std::fs::File::from(write_end));
        // More than the pipe and the socket buffers hold: the relay blocks in write.
        let writer = std::thread::spawn(move || {
            let chunk = [b'x'; 64 * 1024];
            for _ in 0..64 {
                if guest.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        let started = Instant::now();
        assert!(!out.finish(Duration::from_millis(300)));
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(read_end);
        writer.join().unwrap();
    }

    #[test]
    fn a_slow_reader_gets_everything() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let (out, mut guest, _s) = relay_into(std::fs::File::from(write_end));
        let total = 1024 * 1024;
        let writer = std::thread::spawn(move || {
            guest.write_all(&vec![b'y'; total]).unwrap();
        });
        let reader = std::thread::spawn(move || {
            let mut r = std::fs::File::from(read_end);
            let mut buf = [0u8; 64 * 1024];
            let mut got = 0;
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n,
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        writer.join().unwrap();
        // Each pause is shorter than the stall limit, the whole copy much longer.
        assert!(out.finish(Duration::from_millis(200)));
        assert_eq!(reader.join().unwrap(), total);
    }
}
