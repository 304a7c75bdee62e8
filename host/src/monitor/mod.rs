//! The monitor: the long-lived process behind each container. `husk create` starts it
//! (detached into its own session, still a descendant of the engine); it owns the VM, talks to
//! husk-init over vsock, relays the container's stdio, answers `husk` commands on
//! `<state dir>/monitor.sock`, keeps `state.json` current and finally exits with the
//! container's exit status (128+N for signal N), after the VM is gone.
//!
//! Creating, in order: load the bundle; prepare the shared directory; the network namespace
//! (a new one is unshared here, on the single thread the monitor has then); the `prestart` and
//! `createRuntime` hooks (`crate::oci::hooks`, run back in the host's namespace); the
//! namespace's interfaces taken for the VM (`network`); boot the VM; husk-init connects, gets
//! the network and the spec; "ok" to `husk create`.
//!
//! Threads: besides the VMM's own (vmm, vCPUs) the monitor runs one reader of the guest's
//! control connection, one acceptor of command connections (plus a short-lived reader per
//! connection), one waiter on the VM, and the stdio relays. All of them feed one channel; the
//! main thread handles the events in order, so the container's state has a single writer.

pub mod api;
pub mod cgroup;
pub mod console;
pub mod jail;
mod mountinfo;
pub mod network;
pub mod overlay;
mod relay;

pub use relay::copy_streaming;
mod share;
pub mod userns;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use husk_proto::{
    ContainerId, CreateRequest, Event, ExecId, ExecRequest, FIRST_STDIO_PORT, FsSource,
    GuestMessage, Hello, HostMessage, ProcessRef, Request, RequestId, Response, SHARE_TAG,
    SignalTarget, Stdio, VsockPort,
};

use crate::error_chain;
use crate::oci::bundle::Bundle;
use crate::oci::hooks;
use crate::oci::sockets::{self, SocketDir};
use crate::oci::state::{self, State, Status};
use crate::vmm::{self, SeccompMode, VmConfig, VmExit};
use api::{MonitorReply, MonitorRequest};

/// How long the guest may take to connect after the VM starts. Generous because nested
/// kvm_pvm hosts take ~30-40 s to boot a guest; real KVM takes well under a second.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Ports of the terminals the monitor relays for exec'd processes: base + exec id.
const EXEC_CONSOLE_PORT_BASE: u32 = 60_000;

/// What `husk create` tells the monitor.
#[derive(Debug, Clone)]
pub struct MonitorArgs {
    /// The state root.
    pub root: PathBuf,
    /// The container id.
    pub id: String,
    /// The bundle.
    pub bundle: PathBuf,
    /// Write end of the pipe on which the monitor reports "created" or why not.
    pub notify_fd: RawFd,
    /// Serial console of the VM to the monitor's stderr (debugging).
    pub console: bool,
    /// Where to send the pty master when the process has a terminal.
    pub console_socket: Option<PathBuf>,
    /// The `--log` file: the monitor's own diagnostics go there (never into the container's
    /// stderr, which is the stderr the monitor inherited).
    pub log: Option<PathBuf>,
    /// `--monitor-uid`: run confined as this host uid (see [`userns`]).
    pub user: Option<userns::IdMap>,
}

/// The stdio the monitor inherited from `husk create`: the container's.
struct ContainerStdio {
    stdin: std::fs::File,
    stdout: std::fs::File,
    stderr: std::fs::File,
}

/// Moves the inherited stdio aside for the container and points the monitor's own fds 0-2 at
/// /dev/null (stdin) and the log file or /dev/null (stdout, stderr), so that nothing the
/// monitor or its libraries print ends up in the container's output.
fn take_stdio(log: Option<&Path>) -> std::io::Result<ContainerStdio> {
    use std::os::fd::{AsFd, BorrowedFd};
    let dup = |fd: i32| -> std::io::Result<std::fs::File> {
        // SAFETY: fds 0-2 are open for the lifetime of the process (the caller gave them).
        let b = unsafe { BorrowedFd::borrow_raw(fd) };
        Ok(std::fs::File::from(b.try_clone_to_owned()?))
    };
    let stdio = ContainerStdio {
        stdin: dup(0)?,
        stdout: dup(1)?,
        stderr: dup(2)?,
    };
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let out = match log {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)?,
        None => null.try_clone()?,
    };
    for (src, dst) in [(null.as_fd(), 0), (out.as_fd(), 1), (out.as_fd(), 2)] {
        // SAFETY: dup2 onto the standard descriptors, which we own; src is open.
        if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&src), dst) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(stdio)
}

/// The monitor holds the guest's memory: a crash must not write it to a core file, and other
/// processes of the same uid must not ptrace it or read its /proc/PID/mem (non-dumpable).
fn no_core_dumps() -> Result<(), String> {
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(|e| format!("setting RLIMIT_CORE to 0: {e}"))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("PR_SET_DUMPABLE 0: {e}"))
}

/// Opens `/dev/kvm` for the VMM (the monitor's jail does not hold it).
fn open_kvm() -> Result<std::os::fd::OwnedFd, String> {
    nix::fcntl::open(
        "/dev/kvm",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| {
        format!("cannot open /dev/kvm: {e} (is KVM available and do you have access to it?)")
    })
}

/// Runs the monitor; never returns early on success (the container's life is this process's).
pub fn run(args: MonitorArgs, process_start: Instant) -> ExitCode {
    // SAFETY: `create` passed us this descriptor (the write end of its pipe) for our exclusive use.
    let mut notify = unsafe { std::fs::File::from_raw_fd(args.notify_fd) };
    let dir = args.root.join(&args.id);
    if let Err(e) = no_core_dumps() {
        let _ = writeln!(notify, "error: {e}");
        return ExitCode::FAILURE;
    }
    let stdio = match take_stdio(args.log.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(notify, "error: setting up the container's stdio: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut monitor = match Monitor::create(&args, &dir, process_start, stdio) {
        Ok(m) => m,
        Err(e) => {
            let _ = writeln!(notify, "error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = writeln!(notify, "ok");
    drop(notify);
    let code = monitor.serve();
    ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))
}

enum Ev {
    Guest(Option<GuestMessage>),
    Resize(ProcessRef, husk_proto::WindowSize),
    /// A request, its connection, and the descriptor that came with it (if any).
    Command(MonitorRequest, UnixStream, Option<std::os::fd::OwnedFd>),
    VmEnded(VmExit),
}

/// What a request to the guest was for.
enum Pending {
    Start(UnixStream),
    Reply(UnixStream),
    Ps(UnixStream),
    Exec(UnixStream, ExecId),
    Stats(UnixStream),
    Shutdown,
    Ignore,
}

struct Monitor {
    dir: PathBuf,
    /// Names the sockets in `dir` (the VM's vsock device uses it for the monitor's life).
    sockets: SocketDir,
    state: State,
    guest: UnixStream,
    events: Receiver<Ev>,
    events_tx: Sender<Ev>,
    stopper: vmm::VmHandle,
    next_id: u64,
    next_exec: u32,
    pending: HashMap<RequestId, Pending>,
    execs: HashMap<ExecId, UnixStream>,
    exit_status: Option<i32>,
    outputs: Vec<relay::Output>,
    /// The container's network, undone when the monitor ends (dropped).
    _network: Option<network::Network>,
}

impl Monitor {
    fn create(
        args: &MonitorArgs,
        dir: &Path,
        process_start: Instant,
        stdio: ContainerStdio,
    ) -> Result<Monitor, String> {
        let bundle = Bundle::load(&args.bundle).map_err(|e| e.to_string())?;
        let id = ContainerId::new(args.id.clone()).map_err(|e| e.to_string())?;
        let image = crate::assets::find()?;
        let (share, mounts) = share::prepare(dir, &bundle)?;
        // The network namespace (a new one while the monitor still has a single thread), the
        // hooks that fill it, then its interfaces for the VM: undone on drop, when the monitor
        // ends or right away if creating fails below.
        let net_err =
            |e: network::NetworkError| format!("setting up the network: {}", error_chain(&e));
        let netns = network::Netns::for_spec(&bundle.spec).map_err(net_err)?;
        run_create_hooks(&bundle, &args.id, netns.host()).map_err(|e| error_chain(&e))?;
        let mut network = network::setup(&netns, dir).map_err(net_err)?;
        let sockets = SocketDir::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let vsock = sockets.vsock();
        let listen = |port: u32| {
            let path = sockets.vsock_port(port);
            let _ = std::fs::remove_file(&path);
            UnixListener::bind(&path).map_err(|e| format!("listening on {}: {e}", path.display()))
        };
        let control = listen(husk_proto::CONTROL_PORT.0)?;
        let (stdin_port, stdout_port, stderr_port) = (
            FIRST_STDIO_PORT.0,
            FIRST_STDIO_PORT.0 + 1,
            FIRST_STDIO_PORT.0 + 2,
        );
        let stdin_l = listen(stdin_port)?;
        let stdout_l = listen(stdout_port)?;
        let stderr_l = listen(stderr_port)?;

        let config = VmConfig {
            kernel: image.vmlinux,
            initrd: Some(image.initramfs),
            cmdline_extra: String::new(),
            mem_mib: bundle.vm.memory_mib,
            vcpus: bundle.vm.vcpus,
            console: args.console,
            seccomp: SeccompMode::Enforce,
            vsock: Some(vsock.clone()),
            shares: vec![(SHARE_TAG.to_string(), share.clone())],
            nets: network
                .as_ref()
                .map(|n| n.devices.clone())
                .unwrap_or_default(),
            // Before the jail, which does not hold /dev/kvm.
            kvm: Some(std::sync::Arc::new(open_kvm()?)),
        };
        // The last things that need the host's view, then the jail (before the VMM's threads).
        let terminal = bundle.terminal();
        let console = match (terminal, &args.console_socket) {
            (false, _) => None,
            (true, Some(socket)) => Some(console::Console::open(socket)?),
            (true, None) => {
                return Err("process.terminal is true but no --console-socket was given".into());
            }
        };
        // The container's fixed facts and the control socket, before the jail pins them (see
        // `crate::oci::state` on what husk trusts).
        let pid = i32::try_from(std::process::id()).unwrap_or(0);
        let mut state = State {
            oci_version: state::OCI_VERSION.into(),
            id: args.id.clone(),
            status: Status::Creating,
            pid: Some(pid),
            bundle: bundle.dir.clone(),
            annotations: bundle.spec.annotations().clone().unwrap_or_default(),
            created: state::now_rfc3339(),
            monitor_start_time: state::process_start_time(pid).unwrap_or(0),
            exit_status: None,
        };
        state::write_fixed(dir, &state).map_err(|e| e.to_string())?;
        let commands = UnixListener::bind(sockets.monitor())
            .map_err(|e| format!("listening on {}: {e}", sockets::MONITOR_SOCKET))?;
        jail::enter(&jail::Jail {
            id: &args.id,
            state_dir: dir,
            read_only: [Some(&config.kernel), config.initrd.as_ref()]
                .into_iter()
                .flatten()
                .map(PathBuf::as_path)
                .collect(),
            network: network.is_some(),
            user: args.user.map(|map| (map, share.as_path())),
        })?;
        crate::phases::record_now("monitor-confined");
        if args.user.is_some()
            && let Some(network) = network.as_mut()
        {
            network.leave_to_delete();
        }
        let vm =
            vmm::start(&config, process_start).map_err(|e| format!("starting the VM: {e:#}"))?;
        let stopper = vm.handle().map_err(|e| e.to_string())?;
        let (tx, events) = channel();
        {
            let tx = tx.clone();
            std::thread::Builder::new()
                .name("vm-wait".into())
                .spawn(move || {
                    let (why, timeline) = vm.wait(None);
                    record_vm_phases(&timeline);
                    let _ = tx.send(Ev::VmEnded(why));
                })
                .map_err(|e| e.to_string())?;
        }

        // Wait for husk-init (or for the VM to die first).
        control.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut guest = loop {
            match control.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Ok(Ev::VmEnded(why)) = events.try_recv() {
                        return Err(format!("the VM ended before husk-init connected: {why:?}"));
                    }
                    if Instant::now() > deadline {
                        stopper.stop();
                        return Err(format!(
                            "husk-init did not connect within {} s",
                            BOOT_TIMEOUT.as_secs()
                        ));
                    }
                    // Sleep in poll(2) on the listener: woken the moment husk-init connects
                    // (this is on the startup path), and every 100 ms to check the VM.
                    let mut fds = [nix::poll::PollFd::new(
                        std::os::fd::AsFd::as_fd(&control),
                        nix::poll::PollFlags::POLLIN,
                    )];
                    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
                }
                Err(e) => return Err(format!("accepting husk-init's connection: {e}")),
            }
        };
        drop(control);
        guest.set_nonblocking(false).map_err(|e| e.to_string())?;
        let fail = |msg: String| {
            stopper.stop();
            msg
        };
        let hello: Option<GuestMessage> =
            husk_proto::read_message(&mut guest).map_err(|e| fail(format!("husk-init: {e}")))?;
        match hello {
            Some(GuestMessage::Hello(h)) => {
                h.check().map_err(|e| fail(format!("husk-init: {e}")))?
            }
            other => return Err(fail(format!("husk-init sent {other:?} instead of Hello"))),
        }
        husk_proto::write_message(&mut guest, &HostMessage::Hello(Hello::current()))
            .map_err(|e| fail(format!("husk-init: {e}")))?;
        if let Some(net) = network.as_ref().filter(|n| !n.guest.interfaces.is_empty()) {
            // Before Create, so the network is up by the time `create` returns.
            husk_proto::write_message(
                &mut guest,
                &HostMessage::Request {
                    id: RequestId(1),
                    request: Request::ConfigureNetwork(net.guest.clone()),
                },
            )
            .map_err(|e| fail(format!("husk-init: {e}")))?;
            let reply: Option<GuestMessage> = husk_proto::read_message(&mut guest)
                .map_err(|e| fail(format!("husk-init: {e}")))?;
            match reply {
                Some(GuestMessage::Response { result: Ok(_), .. }) => {}
                Some(GuestMessage::Response { result: Err(e), .. }) => {
                    return Err(fail(format!(
                        "configuring the network in the VM: {}",
                        e.message
                    )));
                }
                other => {
                    return Err(fail(format!(
                        "husk-init answered ConfigureNetwork with {other:?}"
                    )));
                }
            }
        }
        let create = CreateRequest {
            container_id: id,
            config_json: bundle.config_json.clone(),
            rootfs: FsSource::Share {
                tag: SHARE_TAG.into(),
                path: "rootfs".into(),
            },
            mounts,
            stdio: Stdio::Pipes {
                stdin: Some(VsockPort(stdin_port)),
                stdout: Some(VsockPort(stdout_port)),
                stderr: Some(VsockPort(stderr_port)),
            },
        };
        let mut create = create;
        let mut outputs = Vec::new();
        if let Some(console) = console {
            let (rtx, rrx) = channel();
            console.relay(stdin_l, rtx);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for size in rrx {
                    if tx.send(Ev::Resize(ProcessRef::Init, size)).is_err() {
                        return;
                    }
                }
            });
            drop((stdout_l, stderr_l));
        } else {
            outputs.push(relay::output(stdout_l, stdio.stdout, "stdout"));
            outputs.push(relay::output(stderr_l, stdio.stderr, "stderr"));
            relay::stdin(stdin_l, stdio.stdin);
        }
        if terminal {
            create.stdio = Stdio::Terminal {
                port: VsockPort(stdin_port),
            };
        }
        husk_proto::write_message(
            &mut guest,
            &HostMessage::Request {
                id: RequestId(0),
                request: Request::Create(Box::new(create)),
            },
        )
        .map_err(|e| fail(format!("husk-init: {e}")))?;
        let reply: Option<GuestMessage> =
            husk_proto::read_message(&mut guest).map_err(|e| fail(format!("husk-init: {e}")))?;
        match reply {
            Some(GuestMessage::Response {
                result: Ok(Response::Created { .. }),
                ..
            }) => {}
            Some(GuestMessage::Response { result: Err(e), .. }) => {
                return Err(fail(format!("creating the container: {}", e.message)));
            }
            other => return Err(fail(format!("husk-init answered create with {other:?}"))),
        }

        state.status = Status::Created;
        state::write_state(dir, &state).map_err(|e| fail(e.to_string()))?;

        // Readers feeding the main loop.
        let reader = guest.try_clone().map_err(|e| fail(e.to_string()))?;
        spawn_guest_reader(reader, tx.clone());
        spawn_command_acceptor(commands, tx.clone());

        Ok(Monitor {
            dir: dir.to_path_buf(),
            sockets,
            state,
            guest,
            events,
            events_tx: tx,
            stopper,
            // 0 and 1 went to Create and ConfigureNetwork.
            next_id: 2,
            next_exec: 1,
            pending: HashMap::new(),
            execs: HashMap::new(),
            exit_status: None,
            outputs,
            _network: network,
        })
    }

    fn set_status(&mut self, status: Status) {
        self.state.status = status;
        let _ = state::write_state(&self.dir, &self.state);
    }

    fn send(&mut self, request: Request, pending: Pending) -> Result<(), String> {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        husk_proto::write_message(&mut self.guest, &HostMessage::Request { id, request })
            .map_err(|e| format!("husk-init: {e}"))?;
        self.pending.insert(id, pending);
        Ok(())
    }

    /// The main loop; returns the exit status.
    fn serve(&mut self) -> i32 {
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
                        ProcessRef::Init => {
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
                        ProcessRef::Exec(id) => {
                            if let Some(mut s) = self.execs.remove(&id) {
                                reply(&mut s, &MonitorReply::Exited(code));
                            }
                        }
                    }
                }
                Ev::Guest(Some(other)) => {
                    eprintln!("husk monitor: unexpected message from husk-init: {other:?}");
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

    fn command(
        &mut self,
        req: MonitorRequest,
        mut stream: UnixStream,
        fd: Option<std::os::fd::OwnedFd>,
    ) {
        let result = match req {
            MonitorRequest::Start => {
                if self.state.status != Status::Created {
                    Err(format!("container is {}, not created", self.state.status))
                } else {
                    let s = stream.try_clone().map_err(|e| e.to_string());
                    s.and_then(|s| self.send(Request::Start, Pending::Start(s)))
                }
            }
            MonitorRequest::Kill { signal, all } => {
                let target = if all {
                    SignalTarget::All
                } else {
                    SignalTarget::Process(ProcessRef::Init)
                };
                self.signal(target, signal, &mut stream)
            }
            MonitorRequest::KillExec { exec, signal } => {
                let target = SignalTarget::Process(ProcessRef::Exec(ExecId(exec)));
                self.signal(target, signal, &mut stream)
            }
            MonitorRequest::Ps => {
                let s = stream.try_clone().map_err(|e| e.to_string());
                s.and_then(|s| self.send(Request::ListPids, Pending::Ps(s)))
            }
            MonitorRequest::Exec {
                process_json,
                stdio,
                console,
            } => {
                if self.state.status != Status::Running {
                    Err(format!("cannot exec in a {} container", self.state.status))
                } else {
                    let exec_id = ExecId(self.next_exec);
                    self.next_exec += 1;
                    let stdio = if console {
                        let Some(slave) = fd else {
                            let e = "exec with a console: the pty did not come with the request";
                            reply(&mut stream, &MonitorReply::Error(e.into()));
                            return;
                        };
                        match self.exec_console(exec_id, slave) {
                            Ok(stdio) => stdio,
                            Err(e) => {
                                reply(&mut stream, &MonitorReply::Error(e));
                                return;
                            }
                        }
                    } else {
                        stdio
                    };
                    let req = Request::Exec(Box::new(ExecRequest {
                        exec_id,
                        process_json,
                        stdio,
                    }));
                    let s = stream.try_clone().map_err(|e| e.to_string());
                    s.and_then(|s| self.send(req, Pending::Exec(s, exec_id)))
                }
            }
            MonitorRequest::ResizeExec { exec, size } => {
                let req = Request::ResizePty {
                    process: ProcessRef::Exec(ExecId(exec)),
                    size,
                };
                let s = stream.try_clone().map_err(|e| e.to_string());
                s.and_then(|s| self.send(req, Pending::Reply(s)))
            }
            MonitorRequest::Pause => {
                if self.state.status != Status::Running {
                    Err(format!("cannot pause a {} container", self.state.status))
                } else {
                    self.stopper.pause().map(|()| {
                        self.set_status(Status::Paused);
                        reply(&mut stream, &MonitorReply::Ok);
                    })
                }
            }
            MonitorRequest::Resume => {
                if self.state.status != Status::Paused {
                    Err(format!("cannot resume a {} container", self.state.status))
                } else {
                    self.stopper.resume();
                    self.set_status(Status::Running);
                    reply(&mut stream, &MonitorReply::Ok);
                    Ok(())
                }
            }
            MonitorRequest::Stats => {
                if self.stopper.is_paused() {
                    Err("the container is paused".into())
                } else {
                    let s = stream.try_clone().map_err(|e| e.to_string());
                    s.and_then(|s| self.send(Request::Stats, Pending::Stats(s)))
                }
            }
        };
        if let Err(e) = result {
            reply(&mut stream, &MonitorReply::Error(e));
        }
    }

    /// Sends a signal request to the guest; its answer goes to `stream`.
    fn signal(
        &mut self,
        target: SignalTarget,
        signal: i32,
        stream: &mut UnixStream,
    ) -> Result<(), String> {
        let request = Request::Signal { target, signal };
        if self.stopper.is_paused() {
            // A paused guest answers only once resumed: queue the signal and say so now, as
            // runc does for a frozen container (delivered on resume).
            self.send(request, Pending::Ignore)
                .map(|()| reply(stream, &MonitorReply::Ok))
        } else {
            let s = stream.try_clone().map_err(|e| e.to_string());
            s.and_then(|s| self.send(request, Pending::Reply(s)))
        }
    }

    /// A terminal for an exec'd process whose pty master the caller sent to the engine: the
    /// monitor holds the `slave` and relays it (so the exec can be detached), on a port of its
    /// own.
    fn exec_console(
        &mut self,
        exec_id: ExecId,
        slave: std::os::fd::OwnedFd,
    ) -> Result<Stdio, String> {
        let port = EXEC_CONSOLE_PORT_BASE + exec_id.0;
        let path = self.sockets.vsock_port(port);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| format!("listening on {}: {e}", path.display()))?;
        let console = console::Console::from_slave(slave);
        let (rtx, rrx) = channel();
        console.relay(listener, rtx);
        let tx = self.events_tx.clone();
        std::thread::spawn(move || {
            for size in rrx {
                if tx
                    .send(Ev::Resize(ProcessRef::Exec(exec_id), size))
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Stdio::Terminal {
            port: VsockPort(port),
        })
    }

    fn response(&mut self, id: RequestId, result: Result<Response, husk_proto::ErrorReply>) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        match (pending, result) {
            (Pending::Start(mut s), Ok(_)) => {
                self.set_status(Status::Running);
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
            (Pending::Shutdown | Pending::Ignore, _) => {}
            (
                Pending::Start(mut s)
                | Pending::Reply(mut s)
                | Pending::Ps(mut s)
                | Pending::Stats(mut s),
                Err(e),
            )
            | (Pending::Exec(mut s, _), Err(e)) => {
                reply(&mut s, &MonitorReply::Error(e.message));
            }
            (Pending::Ps(mut s) | Pending::Exec(mut s, _) | Pending::Stats(mut s), Ok(other)) => {
                reply(
                    &mut s,
                    &MonitorReply::Error(format!("unexpected answer {other:?}")),
                );
            }
        }
    }
}

/// Runs the hooks of `create` for the container `id` of `bundle`: `prestart`, then
/// `createRuntime`, with the state of a container being created whose `pid` is this process
/// (the monitor). `netns`: the host's network namespace when the monitor made its own (see
/// [`hooks::run`]).
fn run_create_hooks(
    bundle: &Bundle,
    id: &str,
    netns: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(), hooks::HookError> {
    let hooks = bundle.spec.hooks().as_ref();
    if hooks.is_none() {
        return Ok(());
    }
    let state = State {
        oci_version: state::OCI_VERSION.into(),
        id: id.to_owned(),
        status: Status::Creating,
        pid: i32::try_from(std::process::id()).ok(),
        bundle: bundle.dir.clone(),
        annotations: bundle.spec.annotations().clone().unwrap_or_default(),
        created: String::new(),
        monitor_start_time: 0,
        exit_status: None,
    };
    hooks::run(hooks::HookKind::Prestart, hooks, &state, netns)?;
    hooks::run(hooks::HookKind::CreateRuntime, hooks, &state, netns)
}

/// Records the VM's own phases (see [`crate::phases`]): known only once it has ended, written
/// with the times they happened.
fn record_vm_phases(timeline: &vmm::Timeline) {
    if !crate::phases::enabled() {
        return;
    }
    crate::phases::record("vm-created", timeline.vm_ready);
    if let Some(t) = timeline.first_entry {
        crate::phases::record("first-vcpu-entry", t);
    }
    for (t, marker) in &timeline.markers {
        if let Ok(m) = marker {
            crate::phases::record(m.name(), *t);
        }
    }
}

fn reply(stream: &mut UnixStream, msg: &MonitorReply) {
    if let Ok(mut line) = serde_json::to_vec(msg) {
        line.push(b'\n');
        let _ = stream.write_all(&line);
    }
}

fn spawn_guest_reader(mut conn: UnixStream, tx: Sender<Ev>) {
    std::thread::spawn(move || {
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

fn spawn_command_acceptor(listener: UnixListener, tx: Sender<Ev>) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
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

/// Sends one request to a container's monitor and returns its first reply (and the stream,
/// for requests with later replies). Gives up after [`reply_timeout`].
pub fn request(
    socket: &Path,
    req: &MonitorRequest,
) -> Result<(MonitorReply, BufReader<UnixStream>), String> {
    request_with_fd(socket, req, None)
}

/// [`request`], passing `fd` along with it (see [`api::send_request`]).
pub fn request_with_fd(
    socket: &Path,
    req: &MonitorRequest,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(MonitorReply, BufReader<UnixStream>), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the container's monitor at {}: {e}",
            socket.display()
        )
    })?;
    api::send_request(&mut stream, req, fd).map_err(|e| format!("talking to the monitor: {e}"))?;
    let limit = reply_timeout();
    stream
        .set_read_timeout(Some(limit))
        .map_err(|e| format!("talking to the monitor: {e}"))?;
    let mut reader = BufReader::new(stream);
    let reply = read_reply(&mut reader)?;
    reader
        .get_ref()
        .set_read_timeout(None)
        .map_err(|e| format!("talking to the monitor: {e}"))?;
    Ok((reply, reader))
}

/// Reads the next reply line.
pub fn read_reply(reader: &mut BufReader<UnixStream>) -> Result<MonitorReply, String> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Err("the monitor closed the connection (the container stopped?)".into()),
        Ok(_) => {
            serde_json::from_str(&line).map_err(|e| format!("bad reply from the monitor: {e}"))
        }
        // Only `request` sets a read timeout, for the first reply.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(format!(
                "no answer from the container's VM within {} s (is the guest hung?); HUSK_REPLY_TIMEOUT sets the limit in seconds",
                reply_timeout().as_secs()
            ))
        }
        Err(e) => Err(format!("reading the monitor's reply: {e}")),
    }
}
