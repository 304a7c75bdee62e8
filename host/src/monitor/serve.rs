//! Creating done, the monitor serves: one loop on the main thread takes every event in turn
//! (a `husk` command, an answer or event from husk-init, a terminal resize, the VM's end) so
//! that the container's state has a single writer, until the VM is gone. Commands that need the
//! guest are sent on as requests; their answers come back as events and complete the command.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

use husk_proto::{
    ContainerRef, Event, ExecId, GuestMessage, ProcessRef, Request, RequestId, Response, WindowSize,
};
use husk_seccomp::ThreadKind;

use super::api::{self, MonitorReply, MonitorRequest};
use super::console::Console;
use super::containers::{Limits, Member};
use super::guest::GuestSession;
use super::guest_log::{self, GuestLog};
use super::network::Network;
use super::outbox::{Outbox, OutboxError};
use super::{relay, threads};
use crate::oci::sockets::{self, SocketDir};
use crate::oci::state::{self, State, Status};
use crate::vmm::{VmExit, VmHandle};

/// What the main loop handles.
pub(super) enum Ev {
    Guest(Option<GuestMessage>),
    Resize(ProcessRef, WindowSize),
    /// A request, its connection, and the descriptor that came with it (if any).
    Command(MonitorRequest, UnixStream, Option<std::os::fd::OwnedFd>),
    VmEnded(VmExit),
}

/// Why a command failed: its message is the `Error` reply.
#[derive(Debug, thiserror::Error)]
pub(super) enum CommandError {
    /// `start` of a container that is not `created`.
    #[error("container is {0}, not created")]
    NotCreated(Status),
    /// `exec` in a container that does not run.
    #[error("cannot exec in a {0} container")]
    CannotExec(Status),
    /// `pause` of a container that does not run.
    #[error("cannot pause a {0} container")]
    CannotPause(Status),
    /// `resume` of a container that is not paused.
    #[error("cannot resume a {0} container")]
    CannotResume(Status),
    /// A request the guest would answer only once resumed.
    #[error("the container is paused")]
    Paused,
    /// An exec with a console whose pty did not come with the request.
    #[error("exec with a console: the pty did not come with the request")]
    NoPty,
    /// The vCPUs did not stop.
    #[error("{0}")]
    Pause(String),
    /// The command's connection could not be kept for the answer.
    #[error(transparent)]
    Stream(std::io::Error),
    /// An exec's terminal port could not be bound.
    #[error("listening on {path}")]
    Listen {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The request could not be sent to husk-init.
    #[error(transparent)]
    Guest(OutboxError),
    /// A command for a container the VM does not have (or no longer has).
    #[error("the VM has no container {0}")]
    NoContainer(u32),
    /// A pod's container's command nested in another, or a container added from one.
    #[error("a request for one of the VM's containers cannot hold another")]
    Nested,
    /// A container added to a pod whose own container has stopped.
    #[error("the pod's sandbox is {0}: no container can join it")]
    PodStopped(Status),
    /// An added container with an invalid id.
    #[error(transparent)]
    Id(husk_proto::InvalidContainerId),
    /// `Remove` of the VM's own container.
    #[error("the VM's own container is not removed from it: its end is the VM's")]
    RemoveFirst,
    /// `update` of a container that has stopped.
    #[error("cannot update a {0} container")]
    CannotUpdate(Status),
    /// `update` to limits the VM cannot meet without growing.
    #[error("{0}")]
    DoesNotFit(String),
    /// `update`'s resources could not be encoded for husk-init.
    #[error("encoding linux.resources")]
    Json(#[source] serde_json::Error),
}

/// What a request to the guest was for.
pub(super) enum Pending {
    /// `Start` of a container.
    Start(UnixStream, ContainerRef),
    Reply(UnixStream),
    Ps(UnixStream),
    Exec(UnixStream, ExecId),
    Stats(UnixStream),
    /// A pod's container added (its number and id).
    Added(UnixStream, ContainerRef, String),
    /// A pod's container frozen or thawed: its status then.
    Froze(UnixStream, ContainerRef, Status),
    /// A pod's container removed.
    Removed(UnixStream, ContainerRef),
    /// A container's limits changed: its resources now.
    Updated(
        UnixStream,
        ContainerRef,
        Box<oci_spec::runtime::LinuxResources>,
    ),
    Shutdown,
    Ignore,
}

/// What creating hands over to the serving loop.
pub(super) struct Parts {
    pub(super) dir: PathBuf,
    /// Names the sockets in `dir` (the VM's vsock device uses it for the monitor's life).
    pub(super) sockets: SocketDir,
    pub(super) state: State,
    pub(super) guest: GuestSession,
    pub(super) events: Receiver<Ev>,
    pub(super) events_tx: Sender<Ev>,
    pub(super) stopper: VmHandle,
    pub(super) outputs: Vec<relay::Output>,
    /// The container's network, undone when the monitor ends (dropped).
    pub(super) network: Option<Network>,
    /// The VM's size and its containers' resources (for `update`).
    pub(super) limits: Limits,
}

/// The monitor of a created container.
pub(super) struct Monitor {
    dir: PathBuf,
    /// Names the sockets in `dir` (the VM's vsock device uses it for the monitor's life).
    pub(super) sockets: SocketDir,
    pub(super) state: State,
    /// Requests to husk-init (see `outbox`: the loop never waits for the guest to take them).
    pub(super) guest: Outbox,
    events: Receiver<Ev>,
    pub(super) events_tx: Sender<Ev>,
    pub(super) stopper: VmHandle,
    pub(super) next_exec: u32,
    /// A pod's other containers in the VM (see `commands` and `containers`).
    pub(super) members: HashMap<ContainerRef, Member>,
    /// The number the next added container gets.
    pub(super) next_container: u32,
    /// The VM's size and its containers' resources (for `update`).
    pub(super) limits: Limits,
    pending: HashMap<RequestId, Pending>,
    execs: HashMap<ExecId, UnixStream>,
    exit_status: Option<i32>,
    outputs: Vec<relay::Output>,
    /// The container's network, undone when the monitor ends (dropped).
    _network: Option<Network>,
    /// What the monitor says about husk-init's messages, rate limited.
    guest_log: GuestLog,
}

impl Monitor {
    pub(super) fn new(parts: Parts) -> Monitor {
        Monitor {
            dir: parts.dir,
            sockets: parts.sockets,
            state: parts.state,
            guest: {
                let (conn, next) = parts.guest.into_writer();
                Outbox::new(conn, next)
            },
            events: parts.events,
            events_tx: parts.events_tx,
            stopper: parts.stopper,
            next_exec: 1,
            members: HashMap::new(),
            next_container: 1,
            limits: parts.limits,
            pending: HashMap::new(),
            execs: HashMap::new(),
            exit_status: None,
            outputs: parts.outputs,
            _network: parts.network,
            guest_log: GuestLog::default(),
        }
    }

    pub(super) fn set_status(&mut self, status: Status) {
        self.state.status = status;
        let _ = state::write_state(&self.dir, &self.state);
    }

    pub(super) fn send(&mut self, request: Request, pending: Pending) -> Result<(), CommandError> {
        let id = self.guest.send(request).map_err(CommandError::Guest)?;
        self.pending.insert(id, pending);
        Ok(())
    }

    /// The main loop; returns the exit status.
    pub(super) fn serve(&mut self) -> i32 {
        let mut shutting_down = false;
        while let Ok(ev) = self.events.recv() {
            match ev {
                Ev::Command(req, stream, fd) => self.command(req, stream, fd),
                Ev::Resize(process, size) => {
                    let req = Request::ResizePty { process, size };
                    let _ = self.send(req, Pending::Ignore);
                }
                Ev::Guest(Some(GuestMessage::Response { id, result })) => {
                    self.response(id, result);
                }
                Ev::Guest(Some(GuestMessage::Event(Event::Exited { process, status }))) => {
                    let code = status.exit_code();
                    match process {
                        ProcessRef::Init(ContainerRef::FIRST) => {
                            crate::phases::record_now("process-exit-seen");
                            self.exit_status = Some(code);
                            self.state.exit_status = Some(code);
                            // All output of the process has arrived (the guest closes the
                            // streams first); let the relays finish writing it, unless the
                            // reader has stopped taking it (then the monitor would never end).
                            for out in self.outputs.drain(..) {
                                out.finish(relay::OUTPUT_STALL);
                            }
                            if !shutting_down {
                                shutting_down = true;
                                let _ = self.send(Request::Shutdown, Pending::Shutdown);
                            }
                        }
                        ProcessRef::Init(member) => {
                            // A pod's container: the process standing for it exits with it.
                            if let Some(m) = self.members.get_mut(&member) {
                                m.status = Status::Stopped;
                                if let Some(mut s) = m.waiter.take() {
                                    reply(&mut s, &MonitorReply::Exited(code));
                                }
                            }
                        }
                        ProcessRef::Exec(id) => {
                            if let Some(mut s) = self.execs.remove(&id) {
                                reply(&mut s, &MonitorReply::Exited(code));
                            }
                        }
                    }
                }
                Ev::Guest(Some(other)) => {
                    unexpected(&mut self.guest_log, &mut std::io::stderr(), &other);
                }
                Ev::Guest(None) => {
                    // The guest is gone (powered off, crashed, or sent garbage).
                    self.stopper.stop();
                }
                Ev::VmEnded(why) => {
                    crate::phases::record_now("vm-torn-down");
                    if self.exit_status.is_none() {
                        eprintln!(
                            "husk monitor: the VM ended before the container's process: {why:?}"
                        );
                    }
                    break;
                }
            }
        }
        let code = self.exit_status.unwrap_or(255);
        self.state.exit_status = Some(code);
        self.set_status(Status::Stopped);
        // A pod's containers still running went with the VM: killed (128 + SIGKILL).
        for (_, m) in self.members.drain() {
            if let Some(mut s) = m.waiter {
                eprintln!("husk monitor: {} ended with the pod's VM", m.id);
                reply(&mut s, &MonitorReply::Exited(128 + 9));
            }
        }
        for (_, mut s) in self.execs.drain() {
            reply(&mut s, &MonitorReply::Error("the container stopped".into()));
        }
        // Fails (EBUSY) when the jail pinned it; `delete` removes it with the directory.
        let _ = std::fs::remove_file(self.dir.join(sockets::MONITOR_SOCKET));
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("vsock.sock") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        code
    }

    fn response(&mut self, id: RequestId, result: Result<Response, husk_proto::ErrorReply>) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        match (pending, result) {
            (Pending::Start(mut s, c), Ok(_)) => {
                self.set_status_of(c, Status::Running);
                reply(&mut s, &MonitorReply::Ok);
            }
            (Pending::Added(mut s, c, id), Ok(Response::Created { pid })) => {
                let waiter = s.try_clone().ok();
                self.members.insert(
                    c,
                    Member {
                        id,
                        status: Status::Created,
                        waiter,
                    },
                );
                reply(
                    &mut s,
                    &MonitorReply::Added {
                        container: c.0,
                        pid,
                    },
                );
            }
            (Pending::Froze(mut s, c, status), Ok(_)) => {
                self.set_status_of(c, status);
                reply(&mut s, &MonitorReply::Ok);
            }
            (Pending::Removed(mut s, c), Ok(_)) => {
                self.members.remove(&c);
                self.limits.resources.remove(&c);
                reply(&mut s, &MonitorReply::Ok);
            }
            (Pending::Updated(mut s, c, resources), Ok(_)) => {
                self.limits.resources.insert(c, *resources);
                reply(&mut s, &MonitorReply::Ok);
            }
            (Pending::Reply(mut s), Ok(_)) => reply(&mut s, &MonitorReply::Ok),
            (Pending::Ps(mut s), Ok(Response::Pids(pids))) => {
                reply(&mut s, &MonitorReply::Pids(pids));
            }
            (Pending::Exec(mut s, exec_id), Ok(Response::ExecStarted { pid })) => {
                reply(
                    &mut s,
                    &MonitorReply::ExecStarted {
                        pid,
                        exec: exec_id.0,
                    },
                );
                self.execs.insert(exec_id, s);
            }
            (Pending::Stats(mut s), Ok(Response::Stats(st))) => {
                let limit = |v: u64| {
                    if v == u64::MAX {
                        serde_json::Value::Null
                    } else {
                        v.into()
                    }
                };
                let data = serde_json::json!({
                    "cpu": {"usage": {"total": st.cpu_usage_ns, "user": st.cpu_user_ns, "kernel": st.cpu_system_ns}},
                    "memory": {"usage": {"usage": st.memory_usage, "limit": limit(st.memory_limit)}},
                    "pids": {"current": st.pids_current, "limit": limit(st.pids_limit)},
                });
                reply(&mut s, &MonitorReply::Stats(data));
            }
            (Pending::Shutdown, Ok(_)) => {
                // husk-init has killed what was left and synced: nothing the VM still does
                // (its kernel's power-off) matters to anyone, so it ends now.
                crate::phases::record_now("guest-shut-down");
                self.stopper.stop();
            }
            (Pending::Shutdown | Pending::Ignore, _) => {}
            (Pending::Reply(mut s) | Pending::Ps(mut s) | Pending::Stats(mut s), Err(e))
            | (
                Pending::Start(mut s, _)
                | Pending::Exec(mut s, _)
                | Pending::Froze(mut s, _, _)
                | Pending::Removed(mut s, _)
                | Pending::Updated(mut s, _, _)
                | Pending::Added(mut s, _, _),
                Err(e),
            ) => {
                reply(&mut s, &MonitorReply::Error(e.message));
            }
            (
                Pending::Ps(mut s)
                | Pending::Exec(mut s, _)
                | Pending::Stats(mut s)
                | Pending::Added(mut s, _, _),
                Ok(other),
            ) => {
                reply(
                    &mut s,
                    &MonitorReply::Error(format!(
                        "unexpected answer {}",
                        guest_log::describe(&other)
                    )),
                );
            }
        }
    }
}

/// Logs a message from husk-init that nothing waits for (a second `Hello`, say): rate
/// limited, and described in a few hundred bytes at most (see `guest_log`).
fn unexpected(log: &mut GuestLog, out: &mut impl Write, msg: &GuestMessage) {
    log.line(
        std::time::Instant::now(),
        out,
        format_args!(
            "husk monitor: unexpected message from husk-init: {}",
            guest_log::describe(msg)
        ),
    );
}

/// Relays `console` to the guest's terminal connection (accepted on `listener`) and sends the
/// terminal's resizes to the main loop, for `process`.
pub(super) fn relay_console(
    console: Console,
    listener: UnixListener,
    process: ProcessRef,
    tx: Sender<Ev>,
) {
    let (rtx, rrx) = channel();
    console.relay(listener, rtx);
    threads::spawn("resize", ThreadKind::Relay, move || {
        for size in rrx {
            if tx.send(Ev::Resize(process, size)).is_err() {
                return;
            }
        }
    });
}

pub(super) fn reply(stream: &mut UnixStream, msg: &MonitorReply) {
    if let Ok(mut line) = serde_json::to_vec(msg) {
        line.push(b'\n');
        let _ = stream.write_all(&line);
    }
}

pub(super) fn spawn_guest_reader(mut conn: UnixStream, tx: Sender<Ev>) {
    threads::spawn("guest-reader", ThreadKind::Guest, move || {
        loop {
            let msg: Result<Option<GuestMessage>, _> = husk_proto::read_message(&mut conn);
            match msg {
                Ok(Some(m)) => {
                    if tx.send(Ev::Guest(Some(m))).is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = tx.send(Ev::Guest(None));
                    return;
                }
                Err(e) => {
                    eprintln!("husk monitor: control connection to husk-init: {e}");
                    let _ = tx.send(Ev::Guest(None));
                    return;
                }
            }
        }
    });
}

pub(super) fn spawn_command_acceptor(listener: UnixListener, tx: Sender<Ev>) {
    threads::spawn("commands", ThreadKind::Commands, move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let tx = tx.clone();
            threads::spawn("command", ThreadKind::Commands, move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let Ok((line, mut fds)) = api::receive_request(&stream) else {
                    return;
                };
                let _ = stream.set_read_timeout(None);
                match serde_json::from_slice::<MonitorRequest>(&line) {
                    Ok(req) => {
                        // At most one descriptor is meaningful; extra ones are closed here.
                        let fd = fds.drain(..).next();
                        let _ = tx.send(Ev::Command(req, stream, fd));
                    }
                    Err(e) => {
                        let mut s = stream;
                        reply(&mut s, &MonitorReply::Error(format!("bad request: {e}")));
                    }
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use husk_proto::Hello;

    use super::*;

    /// A guest that repeats a message nothing waits for (a second Hello) gets a few lines a
    /// minute in the engine's log, not one each; each line is short whatever the message.
    #[test]
    fn unexpected_messages_from_the_guest_are_logged_a_few_times() {
        let mut log = GuestLog::default();
        let mut out = Vec::new();
        for _ in 0..10_000 {
            unexpected(&mut log, &mut out, &GuestMessage::Hello(Hello::current()));
        }
        let big = GuestMessage::Response {
            id: RequestId(7),
            result: Ok(Response::Pids(vec![1; 1 << 20])),
        };
        let mut fresh = GuestLog::default();
        let mut one = Vec::new();
        unexpected(&mut fresh, &mut one, &big);
        let lines = String::from_utf8(out).unwrap();
        assert!(
            lines.lines().count() <= guest_log::BURST as usize,
            "{} lines for 10000 messages",
            lines.lines().count()
        );
        assert!(one.len() < 512, "a line of {} bytes", one.len());
    }
}
