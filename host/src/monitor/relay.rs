//! Copying a process's stdio between the monitor's own descriptors (what the engine gave
//! `husk create`) and the guest's stream connections (accepted on `vsock.sock_<port>`).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::thread::JoinHandle;

/// Accepts the guest's connection on `listener`, then copies `from` into it until EOF and
/// half-closes it (the guest then closes the process's stdin).
pub fn stdin(listener: UnixListener, mut from: impl Read + Send + 'static) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        drop(listener);
        let _ = std::io::copy(&mut from, &mut conn);
        let _ = conn.shutdown(Shutdown::Write);
    })
}

/// Accepts the guest's connection on `listener`, then copies it into `to` until the guest
/// closes it.
pub fn output(listener: UnixListener, mut to: impl Write + Send + 'static) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok((conn, _)) = listener.accept() else {
            return;
        };
        drop(listener);
        let mut conn = conn;
        copy_streaming(&mut conn, &mut to);
    })
}

/// Copies `from` into `to` until EOF or an error, flushing as it goes (a terminal or pipe
/// reader sees output as it is produced).
pub fn copy_streaming(from: &mut impl Read, to: &mut impl Write) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                let _ = to.flush();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}
