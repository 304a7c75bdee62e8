//! `terminal: true`: the monitor makes a pseudo-terminal on the host, hands its master to the
//! engine over `--console-socket` (SCM_RIGHTS, with the pty's name as the message, as runc
//! does) and relays the slave side to the guest's terminal stream. The engine resizes the
//! master; the monitor notices (it polls the slave's size) and resizes the guest's pty.

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::Duration;

use husk_proto::WindowSize;
use husk_seccomp::ThreadKind;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

/// Why a terminal could not be made or handed to the engine.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No pseudo-terminal could be opened, or its slave could not be set to raw mode.
    #[error("{what}")]
    Pty {
        /// The call that failed (`openpty`, `tcgetattr on the pty`, ...).
        what: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The engine's `--console-socket` does not accept a connection.
    #[error("connecting to the console socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The engine's socket took the connection but not the pty's master.
    #[error("sending the pty master to {path}")]
    Send {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// The host side of a container's terminal.
#[derive(Debug)]
pub struct Console {
    slave: File,
}

impl Console {
    /// Opens a pty, sends its master to `socket`, keeps the slave (in raw mode: the guest's
    /// pty does the line discipline).
    pub fn open(socket: &Path) -> Result<Console, ConsoleError> {
        let (master, slave, name) = open_pty()?;
        send_fd(socket, &name, &master)?;
        Ok(Console::from_slave(slave))
    }

    /// The host side of a terminal whose master someone else holds (`husk exec
    /// --console-socket` opens the pty itself and passes the slave to the jailed monitor,
    /// which cannot reach the engine's socket by path).
    pub fn from_slave(slave: OwnedFd) -> Console {
        Console {
            slave: File::from(slave),
        }
    }

    /// Relays the slave to the guest's terminal connection (accepted on `listener`) and back,
    /// and reports window-size changes on `resize`.
    pub fn relay(self, listener: UnixListener, resize: Sender<WindowSize>) {
        let slave = self.slave;
        super::threads::spawn("console", ThreadKind::Relay, move || {
            let Ok((conn, _)) = listener.accept() else {
                return;
            };
            drop(listener);
            let (Ok(reader), Ok(writer)) = (slave.try_clone(), slave.try_clone()) else {
                return;
            };
            relay_terminal(conn, reader, writer, &slave, resize);
        });
    }
}

/// Copies `from_tty` into `conn` and `conn` into `to_tty` (each in its own thread) and, on
/// the calling thread, polls `tty`'s window size, sending every change on `resize`, until
/// the guest closes the connection.
pub fn relay_terminal(
    conn: UnixStream,
    mut from_tty: impl Read + Send + 'static,
    mut to_tty: impl Write + Send + 'static,
    tty: &impl AsRawFd,
    resize: Sender<WindowSize>,
) {
    let Ok(mut conn_in) = conn.try_clone() else {
        return;
    };
    super::threads::spawn("console-in", ThreadKind::Relay, move || {
        super::relay::copy_streaming(&mut from_tty, &mut conn_in);
    });
    let mut conn_out = conn;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done2 = done.clone();
    super::threads::spawn("console-out", ThreadKind::Relay, move || {
        super::relay::copy_streaming(&mut conn_out, &mut to_tty);
        done2.store(true, std::sync::atomic::Ordering::Release);
    });
    let mut last = None;
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        if let Some(size) = window_size(tty)
            && last != Some(size)
        {
            last = Some(size);
            if resize.send(size).is_err() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The window size of a terminal, if it has one.
pub fn window_size(tty: &impl AsRawFd) -> Option<WindowSize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we pass; the fd is a live tty.
    let r = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some(WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// Opens a pseudo-terminal with its slave in raw mode (the guest's pty does the line
/// discipline). Returns the master, the slave and the slave's name.
pub fn open_pty() -> Result<(OwnedFd, OwnedFd, String), ConsoleError> {
    let pty_err = |what| move |source| ConsoleError::Pty { what, source };
    let pty = nix::pty::openpty(None, None).map_err(pty_err("openpty"))?;
    let name = nix::unistd::ttyname(&pty.slave)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut termios =
        nix::sys::termios::tcgetattr(&pty.slave).map_err(pty_err("tcgetattr on the pty"))?;
    nix::sys::termios::cfmakeraw(&mut termios);
    nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &termios)
        .map_err(pty_err("tcsetattr on the pty"))?;
    Ok((pty.master, pty.slave, name))
}

/// Sends `fd` over the Unix socket at `path` with `name` as the payload.
pub fn send_fd(path: &Path, name: &str, fd: &OwnedFd) -> Result<(), ConsoleError> {
    let sock = UnixStream::connect(path).map_err(|source| ConsoleError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let fds = [fd.as_raw_fd()];
    let payload = if name.is_empty() { "pty" } else { name };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(payload.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|source| ConsoleError::Send {
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}
