//! The `husk` commands the serving loop answers (see `api`): each is checked against the
//! state of the container it is about and sent on to husk-init as a request; the answer
//! completes it (`serve`'s `response`).
//!
//! A command is about a container of the VM: the VM's own (the one this monitor was created
//! for), or a pod's later container, which a [`MonitorRequest::AddContainer`] added and whose
//! commands come wrapped in [`MonitorRequest::ForContainer`] from the process that stands for
//! it on the host (`member`).
//!
//! The handlers are methods of the serving loop's `Monitor` (`serve`); what they keep about
//! the VM's containers (a pod's members, the limits `update` checks) is `containers`.

use std::os::unix::net::{UnixListener, UnixStream};

use husk_proto::{
    ContainerId, ContainerRef, CreateRequest, ExecId, ExecRequest, FsSource, ProcessRef, Request,
    SHARE_TAG, SignalTarget, Stdio, VsockPort,
};

use super::api::{MonitorReply, MonitorRequest};
use super::console::Console;
use super::serve::{CommandError, Monitor, Pending, relay_console, reply};
use crate::error_chain;
use crate::oci::resources;
use crate::oci::state::Status;

/// Ports of the terminals the monitor relays for exec'd processes: base + exec id.
const EXEC_CONSOLE_PORT_BASE: u32 = 60_000;

impl Monitor {
    /// Answers a command on `stream` (the reply may come later, with the guest's answer); a
    /// command that fails is answered with the error.
    pub(super) fn command(
        &mut self,
        req: MonitorRequest,
        mut stream: UnixStream,
        fd: Option<std::os::fd::OwnedFd>,
    ) {
        if let Err(e) = self.handle(ContainerRef::FIRST, req, &mut stream, fd) {
            reply(&mut stream, &MonitorReply::Error(error_chain(&e)));
        }
    }

    /// The status of container `c` of the VM.
    pub(super) fn status_of(&self, c: ContainerRef) -> Result<Status, CommandError> {
        if c == ContainerRef::FIRST {
            return Ok(self.state.status);
        }
        self.members
            .get(&c)
            .map(|m| m.status)
            .ok_or(CommandError::NoContainer(c.0))
    }

    /// Records a new status of container `c`.
    pub(super) fn set_status_of(&mut self, c: ContainerRef, status: Status) {
        if c == ContainerRef::FIRST {
            self.set_status(status);
        } else if let Some(m) = self.members.get_mut(&c) {
            m.status = status;
        }
    }

    fn handle(
        &mut self,
        target: ContainerRef,
        req: MonitorRequest,
        stream: &mut UnixStream,
        fd: Option<std::os::fd::OwnedFd>,
    ) -> Result<(), CommandError> {
        let first = target == ContainerRef::FIRST;
        match req {
            MonitorRequest::Start => {
                let status = self.status_of(target)?;
                if status != Status::Created {
                    return Err(CommandError::NotCreated(status));
                }
                let s = stream.try_clone().map_err(CommandError::Stream)?;
                self.send(
                    Request::Start { container: target },
                    Pending::Start(s, target),
                )
            }
            MonitorRequest::Kill { signal, all } => {
                self.status_of(target)?;
                let target = if all {
                    SignalTarget::All(target)
                } else {
                    SignalTarget::Process(ProcessRef::Init(target))
                };
                self.signal(target, signal, stream)
            }
            MonitorRequest::KillExec { exec, signal } => {
                let target = SignalTarget::Process(ProcessRef::Exec(ExecId(exec)));
                self.signal(target, signal, stream)
            }
            MonitorRequest::Ps => {
                self.status_of(target)?;
                let s = stream.try_clone().map_err(CommandError::Stream)?;
                self.send(Request::ListPids { container: target }, Pending::Ps(s))
            }
            MonitorRequest::Exec {
                process_json,
                stdio,
                console,
            } => {
                let status = self.status_of(target)?;
                if status != Status::Running {
                    return Err(CommandError::CannotExec(status));
                }
                let exec_id = ExecId(self.next_exec);
                self.next_exec += 1;
                let stdio = if console {
                    let slave = fd.ok_or(CommandError::NoPty)?;
                    self.exec_console(exec_id, slave)?
                } else {
                    stdio
                };
                let req = Request::Exec(Box::new(ExecRequest {
                    container: target,
                    exec_id,
                    process_json,
                    stdio,
                }));
                let s = stream.try_clone().map_err(CommandError::Stream)?;
                self.send(req, Pending::Exec(s, exec_id))
            }
            MonitorRequest::ResizeExec { exec, size } => {
                let req = Request::ResizePty {
                    process: ProcessRef::Exec(ExecId(exec)),
                    size,
                };
                let s = stream.try_clone().map_err(CommandError::Stream)?;
                self.send(req, Pending::Reply(s))
            }
            MonitorRequest::Resize { size } => {
                self.status_of(target)?;
                let req = Request::ResizePty {
                    process: ProcessRef::Init(target),
                    size,
                };
                let s = stream.try_clone().map_err(CommandError::Stream)?;
                self.send(req, Pending::Reply(s))
            }
            MonitorRequest::Pause => {
                let status = self.status_of(target)?;
                if status != Status::Running {
                    return Err(CommandError::CannotPause(status));
                }
                if first {
                    // The VM's own container: its vCPUs stop.
                    self.stopper.pause().map_err(CommandError::Pause)?;
                    self.set_status(Status::Paused);
                    reply(stream, &MonitorReply::Ok);
                    return Ok(());
                }
                // A pod's container: its cgroup freezes, the VM goes on.
                let s = stream.try_clone().map_err(CommandError::Stream)?;
                let req = Request::Freeze {
                    container: target,
                    frozen: true,
                };
                self.send(req, Pending::Froze(s, target, Status::Paused))
            }
            MonitorRequest::Resume => {
                let status = self.status_of(target)?;
                if status != Status::Paused {
                    return Err(CommandError::CannotResume(status));
                }
                if first {
                    self.stopper.resume();
                    self.set_status(Status::Running);
                    reply(stream, &MonitorReply::Ok);
                    return Ok(());
                }
                let s = stream.try_clone().map_err(CommandError::Stream)?;
                let req = Request::Freeze {
                    container: target,
                    frozen: false,
                };
                self.send(req, Pending::Froze(s, target, Status::Running))
            }
            MonitorRequest::Stats => {
                if self.stopper.is_paused() {
                    return Err(CommandError::Paused);
                }
                self.status_of(target)?;
                let s = stream.try_clone().map_err(CommandError::Stream)?;
                self.send(Request::Stats { container: target }, Pending::Stats(s))
            }
            MonitorRequest::AddContainer {
                id,
                config_json,
                rootfs,
                mounts,
                stdio,
            } => {
                if !first {
                    return Err(CommandError::Nested);
                }
                if !matches!(self.state.status, Status::Created | Status::Running) {
                    return Err(CommandError::PodStopped(self.state.status));
                }
                let container_id = ContainerId::new(id.clone()).map_err(CommandError::Id)?;
                let container = ContainerRef(self.next_container);
                self.next_container += 1;
                self.limits.add(container, &config_json);
                let req = Request::Create(Box::new(CreateRequest {
                    container,
                    join: Some(ContainerRef::FIRST),
                    container_id,
                    config_json,
                    rootfs: FsSource::Share {
                        tag: SHARE_TAG.into(),
                        path: rootfs,
                    },
                    mounts,
                    stdio,
                }));
                let s = stream.try_clone().map_err(CommandError::Stream)?;
                self.send(req, Pending::Added(s, container, id))
            }
            MonitorRequest::ForContainer { container, request } => {
                if !first || matches!(*request, MonitorRequest::ForContainer { .. }) {
                    return Err(CommandError::Nested);
                }
                let c = ContainerRef(container);
                if c == ContainerRef::FIRST {
                    return Err(CommandError::NoContainer(container));
                }
                self.status_of(c)?;
                self.handle(c, *request, stream, fd)
            }
            MonitorRequest::Update { resources } => {
                let status = self.status_of(target)?;
                if !matches!(status, Status::Created | Status::Running | Status::Paused) {
                    return Err(CommandError::CannotUpdate(status));
                }
                if self.stopper.is_paused() {
                    return Err(CommandError::Paused);
                }
                let present = self.limits.resources.get(&target).cloned();
                let merged = resources::merge(&present.unwrap_or_default(), &resources);
                resources::fits(&merged, self.limits.vm).map_err(CommandError::DoesNotFit)?;
                let resources_json = serde_json::to_vec(&merged).map_err(CommandError::Json)?;
                let s = stream.try_clone().map_err(CommandError::Stream)?;
                let req = Request::Update {
                    container: target,
                    resources_json,
                };
                self.send(req, Pending::Updated(s, target, Box::new(merged)))
            }
            MonitorRequest::Remove => {
                if first {
                    return Err(CommandError::RemoveFirst);
                }
                let s = stream.try_clone().map_err(CommandError::Stream)?;
                self.send(
                    Request::Remove { container: target },
                    Pending::Removed(s, target),
                )
            }
        }
    }

    /// Sends a signal request to the guest; its answer goes to `stream`.
    fn signal(
        &mut self,
        target: SignalTarget,
        signal: i32,
        stream: &mut UnixStream,
    ) -> Result<(), CommandError> {
        let request = Request::Signal { target, signal };
        if self.stopper.is_paused() {
            // A paused guest answers only once resumed: queue the signal and say so now, as
            // runc does for a frozen container (delivered on resume).
            self.send(request, Pending::Ignore)
                .map(|()| reply(stream, &MonitorReply::Ok))
        } else {
            let s = stream.try_clone().map_err(CommandError::Stream)?;
            self.send(request, Pending::Reply(s))
        }
    }

    /// A terminal for an exec'd process whose pty master the caller sent to the engine: the
    /// monitor holds the `slave` and relays it (so the exec can be detached), on a port of its
    /// own.
    fn exec_console(
        &mut self,
        exec_id: ExecId,
        slave: std::os::fd::OwnedFd,
    ) -> Result<Stdio, CommandError> {
        let port = EXEC_CONSOLE_PORT_BASE + exec_id.0;
        let path = self.sockets.vsock_port(port);
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).map_err(|source| CommandError::Listen { path, source })?;
        let console = Console::from_slave(slave);
        relay_console(
            console,
            listener,
            ProcessRef::Exec(exec_id),
            self.events_tx.clone(),
        );
        Ok(Stdio::Terminal {
            port: VsockPort(port),
        })
    }
}
