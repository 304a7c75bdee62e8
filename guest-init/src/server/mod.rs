//! The control loop: one poll(2) loop over the control connection, SIGCHLD (signalfd) and
//! every process's stdio pumps. Requests are handled in order, one at a time (`dispatch`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_proto::marker::Marker;
use husk_proto::{
    ContainerRef, Event, FrameDecoder, GuestMessage, Hello, HostMessage, ProcessRef, ProtoError,
    WaitStatus,
};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use crate::container::{Container, Env, SHARE_ROOT};
use crate::relay::ProcessIo;
use crate::transport::Transport;
use crate::{log, system};

mod dispatch;

/// How long husk-init waits, on its way out, for the processes it killed.
const REAP_GRACE: Duration = Duration::from_secs(2);

/// How long the host may take none of an exited process's output before husk-init drops the
/// rest and reports the exit (the monitor waits as long again on its side).
const OUTPUT_STALL: Duration = Duration::from_secs(10);

/// Reaps every child until none is left or `grace` has passed, so that husk-init's own exit
/// means its container is gone. Outside a VM its orphans would otherwise pass to an init that
/// may reap them late, and a pid namespace's init stays in exit until every process of the
/// namespace has been reaped.
fn reap_all(grace: Duration) {
    let deadline = Instant::now() + grace;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                log::warning!("processes still alive {grace:?} after being killed");
                return;
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return, // ECHILD: nothing left
        }
    }
}

/// Why serving ended.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The control connection could not be made.
    #[error("no host to talk to at {transport} port {}", husk_proto::CONTROL_PORT)]
    NoHost {
        /// Where we tried.
        transport: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The handshake failed (version mismatch, garbage, EOF).
    #[error("handshake with the host failed")]
    Handshake(#[source] ProtoError),
    /// The control connection broke or carried garbage.
    #[error("control connection failed")]
    Connection(#[source] ProtoError),
    /// The host closed the control connection.
    #[error("the host closed the control connection")]
    HostGone,
    /// A setup step of the loop itself failed.
    #[error("{what}")]
    Setup {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

impl ServerError {
    /// Whether the connection was lost (reset, closed, broken: an I/O error or EOF), rather
    /// than carrying something husk-init refuses.
    pub fn is_connection_loss(&self) -> bool {
        matches!(
            self,
            ServerError::HostGone
                | ServerError::Connection(ProtoError::Io(_) | ProtoError::Truncated { .. })
        )
    }
}

/// A process husk-init started and reports on.
#[derive(Debug)]
struct Proc {
    /// The container it belongs to.
    container: ContainerRef,
    pid: Pid,
    io: ProcessIo,
    exit: Option<WaitStatus>,
    /// After the exit, while output is still on its way: how much had reached the host, and
    /// since when no more has (see [`OUTPUT_STALL`]).
    draining: Option<(u64, Instant)>,
}

/// The guest side of one control connection.
#[derive(Debug)]
pub struct Server {
    conn: File,
    decoder: FrameDecoder,
    env: Env,
    /// The VM's containers: one, or a pod's (the first is the sandbox).
    containers: BTreeMap<ContainerRef, Container>,
    procs: HashMap<ProcessRef, Proc>,
    shutdown: bool,
    /// This process is the VM's PID 1 (not a host test): it may set the VM's clock and RNG.
    pid1: bool,
    /// The host has asked for something that changed the VM (network, container): from then
    /// on a lost connection means the host is gone (see [`Server::is_untouched`]).
    touched: bool,
}

impl Server {
    /// Wraps a connected control stream.
    pub fn new(conn: File, transport: Transport, cgroup_root: PathBuf, pid1: bool) -> Self {
        Self {
            conn,
            decoder: FrameDecoder::default(),
            env: Env {
                transport,
                cgroup_root,
                share_root: PathBuf::from(SHARE_ROOT),
            },
            containers: BTreeMap::new(),
            procs: HashMap::new(),
            shutdown: false,
            pid1,
            touched: false,
        }
    }

    /// Whether the host has asked for nothing but `Prepare` yet: a VM restored from a template
    /// is in that state when its connection to the template's builder is reset, and connects
    /// to its new host instead ([`Server::reconnect`]).
    pub fn is_untouched(&self) -> bool {
        !self.touched
    }

    /// Takes a new control connection (after the old one broke while untouched) and
    /// exchanges versions on it.
    pub fn reconnect(&mut self, conn: File) -> Result<(), ServerError> {
        self.conn = conn;
        self.decoder = FrameDecoder::default();
        self.handshake()
    }

    fn send(&mut self, msg: &GuestMessage) -> Result<(), ServerError> {
        husk_proto::write_message(&mut self.conn, msg).map_err(ServerError::Connection)
    }

    /// Exchanges versions with the host.
    pub fn handshake(&mut self) -> Result<(), ServerError> {
        self.send(&GuestMessage::Hello(Hello::current()))?;
        let msg: Option<HostMessage> =
            husk_proto::read_message(&mut self.conn).map_err(ServerError::Handshake)?;
        match msg {
            Some(HostMessage::Hello(h)) => h.check().map_err(ServerError::Handshake),
            Some(other) => Err(ServerError::Handshake(ProtoError::Unexpected {
                expected: "Hello",
                got: format!("{other:?}").chars().take(60).collect(),
            })),
            None => Err(ServerError::HostGone),
        }
    }

    /// Serves requests until the host says shutdown or goes away.
    pub fn serve(&mut self) -> Result<(), ServerError> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        mask.thread_block().map_err(|source| ServerError::Setup {
            what: "blocking SIGCHLD",
            source,
        })?;
        let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|source| ServerError::Setup {
                what: "creating the SIGCHLD signalfd",
                source,
            })?;
        let result = self.run(&sigfd);
        for c in self.containers.values_mut() {
            c.destroy();
        }
        for p in self.procs.values_mut() {
            // Not yet reaped, so the pid is still this child's: exec'd processes too, which
            // the container's own teardown misses without a cgroup or pid namespace.
            if p.exit.is_none() {
                let _ = nix::sys::signal::kill(p.pid, Signal::SIGKILL);
            }
            p.io.abort();
        }
        reap_all(REAP_GRACE);
        result
    }

    fn run(&mut self, sigfd: &SignalFd) -> Result<(), ServerError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut interest: Vec<(RawFd, PollFlags)> = vec![
                (self.conn.as_raw_fd(), PollFlags::POLLIN),
                (sigfd.as_fd().as_raw_fd(), PollFlags::POLLIN),
            ];
            for p in self.procs.values() {
                p.io.interest(&mut interest);
            }
            // SAFETY: every descriptor in `interest` belongs to an object (the connection, the
            // signalfd, a pump) that lives, unchanged, until after poll returns below.
            let mut fds: Vec<PollFd<'_>> = interest
                .iter()
                .map(|(fd, ev)| PollFd::new(unsafe { BorrowedFd::borrow_raw(*fd) }, *ev))
                .collect();
            // An exited process whose output is still draining is looked at every second.
            let timeout = if self.procs.values().any(|p| p.exit.is_some()) {
                PollTimeout::from(1000u16)
            } else {
                PollTimeout::NONE
            };
            match nix::poll::poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(source) => {
                    return Err(ServerError::Setup {
                        what: "poll",
                        source,
                    });
                }
            }
            let conn_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
            drop(fds);

            if conn_ready {
                let n = match self.conn.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ServerError::Connection(e.into())),
                };
                if n == 0 {
                    return match self.decoder.truncation_error() {
                        Some(e) => Err(ServerError::Connection(e)),
                        None => Err(ServerError::HostGone),
                    };
                }
                self.decoder.push(&buf[..n]);
                while let Some(frame) =
                    self.decoder.next_frame().map_err(ServerError::Connection)?
                {
                    let msg: HostMessage =
                        husk_proto::decode(&frame).map_err(ServerError::Connection)?;
                    self.handle(msg)?;
                    if self.shutdown {
                        return Ok(());
                    }
                }
            }
            while let Ok(Some(_)) = sigfd.read_signal() {}
            self.reap();
            for p in self.procs.values_mut() {
                p.io.progress();
            }
            self.report_exits()?;
        }
    }

    fn handle(&mut self, msg: HostMessage) -> Result<(), ServerError> {
        let (id, request) = match msg {
            HostMessage::Request { id, request } => (id, request),
            HostMessage::Hello(_) => {
                return Err(ServerError::Connection(ProtoError::Unexpected {
                    expected: "a request",
                    got: "a second Hello".into(),
                }));
            }
        };
        let result = self.dispatch(request);
        if let Err(e) = &result {
            log::warning!("request {} failed: {}", id.0, e.message);
        }
        self.send(&GuestMessage::Response { id, result })
    }

    /// Collects every exited child (PID 1 also gets every orphan of the VM).
    fn reap(&mut self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            let (pid, ws) = match status {
                nix::sys::wait::WaitStatus::Exited(pid, code) => (pid, WaitStatus::Exited(code)),
                nix::sys::wait::WaitStatus::Signaled(pid, sig, core) => (
                    pid,
                    WaitStatus::Signaled {
                        signal: sig as i32,
                        core_dumped: core,
                    },
                ),
                _ => continue,
            };
            let Some((key, proc)) = self
                .procs
                .iter_mut()
                .find(|(_, p)| p.pid == pid && p.exit.is_none())
            else {
                continue;
            };
            proc.exit = Some(ws);
            if let ProcessRef::Init(c) = *key {
                if c == ContainerRef::FIRST {
                    system::mark(Marker::ProcessExited);
                }
                if let Some(c) = self.containers.get_mut(&c) {
                    c.mark_stopped();
                }
            }
        }
    }

    /// Reports exits whose output has fully reached the host, or whose output the host has
    /// taken nothing of for [`OUTPUT_STALL`] (the engine stopped reading: the rest is dropped,
    /// so that the exit, and with it `husk kill` and `husk delete`, is not held up forever).
    fn report_exits(&mut self) -> Result<(), ServerError> {
        let now = Instant::now();
        for (key, p) in self.procs.iter_mut() {
            if p.exit.is_none() || p.io.output_done() {
                continue;
            }
            let written = p.io.output_written();
            match p.draining {
                Some((w, since)) if w == written => {
                    if now.duration_since(since) >= OUTPUT_STALL {
                        log::warning!(
                            "{key} exited; the host took none of its output for {} s: dropping the rest",
                            OUTPUT_STALL.as_secs()
                        );
                        p.io.abort();
                    }
                }
                _ => p.draining = Some((written, now)),
            }
        }
        let done: Vec<(ProcessRef, WaitStatus)> = self
            .procs
            .iter()
            .filter_map(|(k, p)| match p.exit {
                Some(ws) if p.io.output_done() => Some((*k, ws)),
                _ => None,
            })
            .collect();
        for (process, status) in done {
            self.procs.remove(&process);
            log::info!("{process} exited: {status:?}");
            self.send(&GuestMessage::Event(Event::Exited { process, status }))?;
        }
        Ok(())
    }
}
