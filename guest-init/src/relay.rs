//! Stdio of container processes: pipes or a pseudo-terminal on the process side, one vsock
//! stream per descriptor on the host side, and non-blocking pumps between them. A terminal is
//! opened by the process itself in the container's devpts (`container::console`); its master
//! joins the pumps here once it arrives.
//!
//! The process gets real pipes (not the sockets themselves) so that `/dev/stdout` can be
//! opened and pipe semantics (SIGPIPE, atomic small writes) hold as under runc. Each pump
//! buffers at most [`BUF_SIZE`] bytes: a host that stops reading stalls the process, never
//! husk-init's memory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use husk_proto::{Stdio, VsockPort};
use nix::fcntl::{FcntlArg, OFlag};
use nix::poll::PollFlags;
use nix::sys::socket::Shutdown;

use crate::transport::Transport;

/// Bytes a pump holds at most.
pub const BUF_SIZE: usize = 64 * 1024;

/// What the process gets as fds 0, 1 and 2.
#[derive(Debug)]
pub enum ChildStdio {
    /// These descriptors (pipes or /dev/null).
    Fds {
        /// fd 0.
        stdin: OwnedFd,
        /// fd 1.
        stdout: OwnedFd,
        /// fd 2.
        stderr: OwnedFd,
    },
    /// A terminal it opens itself in the container's devpts; the master comes back to
    /// [`ProcessIo::attach_terminal`].
    Terminal,
}

impl ChildStdio {
    /// The descriptors the forked child must keep (none for a terminal).
    pub fn raw_fds(&self) -> Vec<RawFd> {
        match self {
            ChildStdio::Fds {
                stdin,
                stdout,
                stderr,
            } => vec![stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()],
            ChildStdio::Terminal => Vec::new(),
        }
    }
}

/// Which way a pump moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Host → process.
    Input,
    /// Process → host.
    Output,
}

/// Moves bytes from one descriptor to another without blocking.
#[derive(Debug)]
struct Pump {
    src: Option<File>,
    dst: Option<File>,
    dir: Direction,
    /// Shut the destination socket down entirely when done (terminal output: the host must
    /// see EOF although the input pump holds another descriptor of the same socket).
    shutdown_dst: bool,
    buf: Vec<u8>,
    src_done: bool,
    /// The host announced EOF (`CloseStdin`): the source ends once it has nothing more to
    /// read right now, instead of at a real EOF.
    eof_when_drained: bool,
    /// Bytes written to the destination so far.
    written: u64,
}

impl Pump {
    fn new(src: File, dst: File, dir: Direction) -> Self {
        Self {
            src: Some(src),
            dst: Some(dst),
            dir,
            shutdown_dst: false,
            buf: Vec::with_capacity(BUF_SIZE),
            src_done: false,
            eof_when_drained: false,
            written: 0,
        }
    }

    fn done(&self) -> bool {
        self.dst.is_none()
    }

    fn interest(&self, out: &mut Vec<(RawFd, PollFlags)>) {
        if let Some(src) = &self.src
            && !self.src_done
            && self.buf.len() < BUF_SIZE
        {
            out.push((src.as_raw_fd(), PollFlags::POLLIN));
        }
        if let Some(dst) = &self.dst
            && !self.buf.is_empty()
        {
            out.push((dst.as_raw_fd(), PollFlags::POLLOUT));
        }
    }

    /// Moves what can be moved now.
    fn progress(&mut self) {
        loop {
            let mut moved = false;
            if !self.buf.is_empty() {
                let Some(dst) = self.dst.as_mut() else { return };
                match dst.write(&self.buf) {
                    Ok(n) => {
                        self.buf.drain(..n);
                        self.written += n as u64;
                        moved = n > 0;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        // The other side is gone: drop what is buffered and stop reading, so
                        // a writing process sees EPIPE as it would on a closed pipe.
                        self.buf.clear();
                        self.src = None;
                        self.finish();
                        return;
                    }
                }
            }
            if self.buf.is_empty() && self.src_done {
                self.finish();
                return;
            }
            if !self.src_done && self.buf.len() < BUF_SIZE {
                let Some(src) = self.src.as_mut() else { return };
                let start = self.buf.len();
                self.buf.resize(BUF_SIZE, 0);
                match src.read(&mut self.buf[start..]) {
                    Ok(0) => {
                        self.buf.truncate(start);
                        self.src_done = true;
                        self.src = None;
                        moved = true;
                    }
                    Ok(n) => {
                        self.buf.truncate(start + n);
                        moved = true;
                    }
                    Err(e) => {
                        self.buf.truncate(start);
                        match e.kind() {
                            io::ErrorKind::WouldBlock if self.eof_when_drained => {
                                self.src_done = true;
                                self.src = None;
                                moved = true;
                            }
                            io::ErrorKind::WouldBlock => {}
                            io::ErrorKind::Interrupted => continue,
                            // EIO: every holder of the pty slave is gone.
                            _ => {
                                self.src_done = true;
                                self.src = None;
                                moved = true;
                            }
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn finish(&mut self) {
        if let Some(dst) = self.dst.take()
            && self.shutdown_dst
        {
            let _ = nix::sys::socket::shutdown(dst.as_raw_fd(), Shutdown::Both);
        }
    }
}

/// The guest end of a process's stdio.
#[derive(Debug, Default)]
pub struct ProcessIo {
    pumps: Vec<Pump>,
    /// The pty master (for resizing), when the process has a terminal.
    master: Option<OwnedFd>,
    /// The host's terminal connection while the master is on its way from the process.
    terminal_conn: Option<File>,
}

fn nonblocking(fd: &impl AsFd) -> io::Result<()> {
    let flags = nix::fcntl::fcntl(fd.as_fd(), FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags))?;
    Ok(())
}

fn null() -> io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

fn connect(transport: &Transport, port: VsockPort) -> io::Result<File> {
    let f = transport
        .connect(port)
        .map_err(|e| io::Error::new(e.kind(), format!("connecting to stdio port {port}: {e}")))?;
    nonblocking(&f)?;
    Ok(f)
}

impl ProcessIo {
    /// Connects the host's stdio ports and makes the process side.
    pub fn setup(stdio: &Stdio, transport: &Transport) -> io::Result<(ChildStdio, ProcessIo)> {
        match *stdio {
            Stdio::Terminal { port } => {
                let conn = connect(transport, port)?;
                Ok((
                    ChildStdio::Terminal,
                    ProcessIo {
                        terminal_conn: Some(conn),
                        ..ProcessIo::default()
                    },
                ))
            }
            Stdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                let mut io = ProcessIo::default();
                let child_stdin = match stdin {
                    Some(port) => {
                        let conn = connect(transport, port)?;
                        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                        nonblocking(&w)?;
                        io.pumps
                            .push(Pump::new(conn, File::from(w), Direction::Input));
                        r
                    }
                    None => null()?,
                };
                let mut out = |port: Option<VsockPort>| -> io::Result<OwnedFd> {
                    match port {
                        Some(port) => {
                            let conn = connect(transport, port)?;
                            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                            nonblocking(&r)?;
                            io.pumps
                                .push(Pump::new(File::from(r), conn, Direction::Output));
                            Ok(w)
                        }
                        None => null(),
                    }
                };
                let child_stdout = out(stdout)?;
                let child_stderr = out(stderr)?;
                Ok((
                    ChildStdio::Fds {
                        stdin: child_stdin,
                        stdout: child_stdout,
                        stderr: child_stderr,
                    },
                    io,
                ))
            }
        }
    }

    /// Relays the terminal whose master the process sent (see [`ChildStdio::Terminal`]).
    pub fn attach_terminal(&mut self, master: OwnedFd) -> io::Result<()> {
        let Some(conn) = self.terminal_conn.take() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the process has no terminal connection",
            ));
        };
        nonblocking(&master)?;
        let out = File::from(master.try_clone()?);
        let inp = File::from(master.try_clone()?);
        let mut output = Pump::new(out, conn.try_clone()?, Direction::Output);
        output.shutdown_dst = true;
        let input = Pump::new(conn, inp, Direction::Input);
        self.pumps = vec![output, input];
        self.master = Some(master);
        Ok(())
    }

    /// Descriptors and events to poll for.
    pub fn interest(&self, out: &mut Vec<(RawFd, PollFlags)>) {
        for p in &self.pumps {
            p.interest(out);
        }
    }

    /// Moves whatever can be moved.
    pub fn progress(&mut self) {
        for p in &mut self.pumps {
            p.progress();
        }
    }

    /// Whether all output has reached the host (or the host went away).
    pub fn output_done(&self) -> bool {
        self.pumps
            .iter()
            .filter(|p| p.dir == Direction::Output)
            .all(Pump::done)
    }

    /// Bytes of output that have reached the host's connections so far (a count that stops
    /// moving means the host stopped reading).
    pub fn output_written(&self) -> u64 {
        self.pumps
            .iter()
            .filter(|p| p.dir == Direction::Output)
            .map(|p| p.written)
            .sum()
    }

    /// Closes the process's stdin (pipes only: a terminal has no separate stdin to close)
    /// once what the host sent before has reached it: the host writes its last bytes, then
    /// asks, so they are in the connection (or the pump's buffer) by now and must not be
    /// dropped. Whatever is readable is delivered; the pipe closes at the first empty read.
    pub fn close_stdin(&mut self) {
        if self.master.is_some() {
            return;
        }
        for p in self.pumps.iter_mut().filter(|p| p.dir == Direction::Input) {
            p.eof_when_drained = true;
            p.progress();
        }
    }

    /// Sets the terminal size; an error if the process has no terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        match &self.master {
            Some(m) => crate::sys::set_winsize(m, rows, cols),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the process has no terminal",
            )),
        }
    }

    /// Stops everything (the process is gone and the host will not read more).
    pub fn abort(&mut self) {
        for p in &mut self.pumps {
            p.src = None;
            p.buf.clear();
            p.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn sockpair() -> (File, File) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (File::from(OwnedFd::from(a)), File::from(OwnedFd::from(b)))
    }

    #[test]
    fn a_pump_moves_everything_then_closes_its_destination() {
        let (mut host_w, src) = sockpair();
        let (dst, mut host_r) = sockpair();
        let mut p = Pump::new(src, dst, Direction::Output);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            if sent < data.len() {
                match host_w.write(&data[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
                if sent == data.len() {
                    nix::sys::socket::shutdown(host_w.as_raw_fd(), Shutdown::Write).unwrap();
                }
            }
            p.progress();
            assert!(p.buf.len() <= BUF_SIZE);
            match host_r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, data);
        assert_eq!(p.written, data.len() as u64);
        assert!(p.done());
    }

    #[test]
    fn a_vanished_reader_stops_the_pump() {
        let (mut host_w, src) = sockpair();
        let (dst, host_r) = sockpair();
        drop(host_r);
        let mut p = Pump::new(src, dst, Direction::Output);
        host_w.write_all(b"hello").unwrap();
        p.progress();
        assert!(p.done());
        assert!(p.src.is_none());
    }

    #[test]
    fn a_terminal_master_joins_the_pumps_when_it_arrives() {
        let (mut host, conn) = sockpair();
        let mut io = ProcessIo {
            terminal_conn: Some(conn),
            ..ProcessIo::default()
        };
        // Not relayed yet: nothing to resize.
        assert!(io.resize(10, 20).is_err());
        let (master, slave) = crate::sys::open_pty().unwrap();
        io.attach_terminal(master).unwrap();
        io.resize(10, 20).unwrap();
        let mut slave = File::from(slave);
        slave.write_all(b"from the process\n").unwrap();
        host.write_all(b"typed\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        for _ in 0..1000 {
            io.progress();
            match host.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            if got.ends_with(b"typed\r\n") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // The process's output, then the terminal's echo of what the host typed.
        assert_eq!(got, b"from the process\r\ntyped\r\n");
        assert!(
            io.attach_terminal(crate::sys::open_pty().unwrap().0)
                .is_err()
        );
    }

    #[test]
    fn close_stdin_delivers_what_was_sent_before_it() {
        let (mut host_w, src) = sockpair();
        let (dst, mut proc_r) = sockpair();
        let mut io = ProcessIo {
            pumps: vec![Pump::new(src, dst, Direction::Input)],
            ..ProcessIo::default()
        };
        host_w.write_all(b"last words").unwrap();
        // The host keeps its end open: EOF comes from the request alone, and everything is
        // delivered at once (read_to_end would fail on WouldBlock otherwise).
        io.close_stdin();
        let mut got = Vec::new();
        proc_r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words");
        assert!(io.pumps[0].done());
    }
}
