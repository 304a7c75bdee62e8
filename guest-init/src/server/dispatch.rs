//! The requests: what each one does to the VM and its containers, and its answer.

use husk_proto::marker::Marker;
use husk_proto::{
    ContainerRef, CreateRequest, ErrorCode, ErrorReply, ExecRequest, MAX_ENTROPY_LEN,
    PrepareRequest, ProcessRef, Request, Response, SignalTarget,
};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{Proc, Server};
use crate::container::Container;
use crate::{log, system};

fn reply(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        code,
        message: message.into(),
    }
}

impl Server {
    fn container(&mut self, c: ContainerRef) -> Result<&mut Container, ErrorReply> {
        self.containers
            .get_mut(&c)
            .ok_or_else(|| reply(ErrorCode::InvalidState, format!("no {c} in this VM")))
    }

    pub(super) fn proc(&mut self, p: ProcessRef) -> Result<&mut Proc, ErrorReply> {
        self.procs
            .get_mut(&p)
            .ok_or_else(|| reply(ErrorCode::NoSuchProcess, format!("no process {p}")))
    }

    pub(super) fn dispatch(&mut self, request: Request) -> Result<Response, ErrorReply> {
        if !matches!(request, Request::Prepare(_)) {
            self.touched = true;
        }
        match request {
            Request::Create(req) => self.create(&req),
            Request::Prepare(req) => self.prepare(&req),
            Request::ConfigureNetwork(cfg) => {
                crate::net::configure(&cfg).map_err(|e| reply(ErrorCode::System, e))?;
                Ok(Response::Done)
            }
            Request::Start { container } => {
                self.container(container)?.start()?;
                if container == ContainerRef::FIRST {
                    system::mark(Marker::ProcessStarted);
                }
                Ok(Response::Started)
            }
            Request::Signal { target, signal } => self.signal(target, signal),
            Request::Exec(req) => self.exec(&req),
            Request::ResizePty { process, size } => {
                self.proc(process)?
                    .io
                    .resize(size.rows, size.cols)
                    .map_err(|e| {
                        reply(
                            ErrorCode::InvalidState,
                            format!("resizing the terminal of {process}: {e}"),
                        )
                    })?;
                Ok(Response::Done)
            }
            Request::CloseStdin { process } => {
                self.proc(process)?.io.close_stdin();
                Ok(Response::Done)
            }
            Request::ListPids { container } => {
                Ok(Response::Pids(self.container(container)?.pids()))
            }
            Request::Stats { container } => Ok(Response::Stats(self.container(container)?.stats())),
            Request::Freeze { container, frozen } => {
                self.container(container)?.freeze(frozen)?;
                Ok(Response::Done)
            }
            Request::Remove { container } => self.remove(container),
            Request::Update {
                container,
                resources_json,
            } => {
                let resources: oci_spec::runtime::LinuxResources =
                    serde_json::from_slice(&resources_json).map_err(|e| {
                        reply(ErrorCode::InvalidSpec, format!("linux.resources: {e}"))
                    })?;
                self.container(container)?.update(&resources)?;
                Ok(Response::Done)
            }
            Request::Shutdown => {
                for c in self.containers.values_mut() {
                    c.destroy();
                }
                // The host ends the VM on the answer: what the containers wrote must be on the
                // host by then (writes through the share already are; a shared mapping's dirty
                // pages are not until written back).
                if self.pid1 {
                    nix::unistd::sync();
                }
                self.shutdown = true;
                Ok(Response::Done)
            }
        }
    }

    /// `Create`: the VM's first container, or a pod's later one (which may join another's
    /// namespaces).
    fn create(&mut self, req: &CreateRequest) -> Result<Response, ErrorReply> {
        if self.containers.contains_key(&req.container) {
            return Err(reply(
                ErrorCode::InvalidState,
                format!("{} was already created in this VM", req.container),
            ));
        }
        let join = match req.join {
            Some(j) => Some(
                self.containers
                    .get(&j)
                    .filter(|c| c.is_alive())
                    .ok_or_else(|| {
                        reply(
                            ErrorCode::InvalidState,
                            format!(
                                "{j}, whose namespaces {} joins, is not running",
                                req.container
                            ),
                        )
                    })?,
            ),
            None => None,
        };
        let first = req.container == ContainerRef::FIRST;
        if first {
            system::mark(Marker::SpecReceived);
        }
        let (c, spawned) = Container::create(req, &self.env, join)?;
        let pid = spawned.pid;
        self.procs.insert(
            ProcessRef::Init(req.container),
            Proc {
                container: req.container,
                pid,
                io: spawned.io,
                exit: None,
                draining: None,
            },
        );
        self.containers.insert(req.container, c);
        if first {
            system::mark(Marker::ContainerCreated);
        }
        log::info!(
            "container {} ({}) created, pid {pid}",
            req.container_id,
            req.container
        );
        Ok(Response::Created {
            pid: pid.as_raw().unsigned_abs(),
        })
    }

    /// `Prepare`: the VM's RNG, clock and spare NICs (see [`PrepareRequest`]).
    fn prepare(&mut self, req: &PrepareRequest) -> Result<Response, ErrorReply> {
        if !self.containers.is_empty() {
            return Err(reply(
                ErrorCode::InvalidState,
                "Prepare comes before the first container is created",
            ));
        }
        // Only as the VM's PID 1: in host tests this process must not touch the host's RNG,
        // clock or NICs.
        if self.pid1 {
            let entropy = &req.entropy[..req.entropy.len().min(MAX_ENTROPY_LEN)];
            system::reseed_rng(entropy).map_err(|e| {
                reply(
                    ErrorCode::System,
                    format!("reseeding the kernel's RNG: {e}"),
                )
            })?;
            system::set_wall_clock(req.realtime_ns)
                .map_err(|e| reply(ErrorCode::System, format!("setting the clock: {e}")))?;
            for mac in &req.spare_nics {
                crate::net::remove(mac).map_err(|e| reply(ErrorCode::System, e))?;
            }
        }
        Ok(Response::Done)
    }

    fn signal(&mut self, target: SignalTarget, signal: i32) -> Result<Response, ErrorReply> {
        let sig = Signal::try_from(signal).map_err(|_| {
            reply(
                ErrorCode::InvalidSpec,
                format!("{signal} is not a signal number"),
            )
        })?;
        let pids: Vec<Pid> = match target {
            SignalTarget::All(c) => self
                .container(c)?
                .pids()
                .into_iter()
                .filter_map(|p| i32::try_from(p).ok().map(Pid::from_raw))
                .collect(),
            SignalTarget::Process(p) => {
                let proc = self.proc(p)?;
                if proc.exit.is_some() {
                    return Err(reply(
                        ErrorCode::NoSuchProcess,
                        format!("process {p} has already exited"),
                    ));
                }
                vec![proc.pid]
            }
        };
        for pid in pids {
            match nix::sys::signal::kill(pid, sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => {
                    return Err(reply(
                        ErrorCode::System,
                        format!("sending {sig} to {pid}: {e}"),
                    ));
                }
            }
        }
        Ok(Response::Done)
    }

    fn exec(&mut self, req: &ExecRequest) -> Result<Response, ErrorReply> {
        let key = ProcessRef::Exec(req.exec_id);
        if self.procs.contains_key(&key) {
            return Err(reply(
                ErrorCode::Protocol,
                format!("{} is already in use", req.exec_id),
            ));
        }
        let env = self.env.clone();
        let spawned = self.container(req.container)?.exec(req, &env)?;
        let pid = spawned.pid;
        self.procs.insert(
            key,
            Proc {
                container: req.container,
                pid,
                io: spawned.io,
                exit: None,
                draining: None,
            },
        );
        Ok(Response::ExecStarted {
            pid: pid.as_raw().unsigned_abs(),
        })
    }

    /// `Remove`: a pod's container (not the first, whose end is the VM's) goes: what is left
    /// of its processes is killed, their stdio dropped, its cgroup removed. Its rootfs was
    /// mounted only in its own mount namespace, which goes with its last process.
    fn remove(&mut self, c: ContainerRef) -> Result<Response, ErrorReply> {
        if c == ContainerRef::FIRST {
            return Err(reply(
                ErrorCode::InvalidState,
                "the first container of a VM is not removed: the VM ends with it (Shutdown)",
            ));
        }
        let mut container = self
            .containers
            .remove(&c)
            .ok_or_else(|| reply(ErrorCode::InvalidState, format!("no {c} in this VM")))?;
        container.destroy();
        let gone: Vec<ProcessRef> = self
            .procs
            .iter()
            .filter(|(_, p)| p.container == c)
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            if let Some(mut p) = self.procs.remove(&key) {
                if p.exit.is_none() {
                    let _ = nix::sys::signal::kill(p.pid, Signal::SIGKILL);
                }
                p.io.abort();
            }
        }
        log::info!("container {} ({c}) removed", container.id());
        Ok(Response::Done)
    }
}
