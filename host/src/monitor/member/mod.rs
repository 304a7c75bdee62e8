//! A pod's later container: the process that stands for it on the host.
//!
//! A pod is one VM (see `crate::oci::pod` for which containers share one): its sandbox's
//! monitor owns it, and each later container is created inside it by husk-init, next to the
//! sandbox's. On the host such a container still needs what engines expect of a runc
//! container: a process whose pid `create` reports and whose exit status is the container's,
//! a `state.json`, and a `monitor.sock` that the `husk` commands talk to. That process is
//! this one, the *member*: `husk create` starts it as it starts a monitor (`husk monitor ...
//! --pod-sandbox S`), detached, with the container's stdio; it
//!
//! 1. checks that the sandbox S runs, and runs the `prestart` and `createRuntime` hooks;
//! 2. attaches the container's rootfs and bind mounts' sources into the sandbox's share,
//!    where the guest sees them (`place`), and binds the ports on which the guest connects
//!    the container's stdio in S's directory (`crate::oci::ports`), or opens its terminal;
//! 3. writes the container's fixed state (its own pid) and [`pod::POD_FILE`], binds its
//!    `monitor.sock`, and asks S's monitor to add the container
//!    ([`MonitorRequest::AddContainer`]);
//! 4. reports "ok" to `husk create` and serves: each command on its socket is passed to S's
//!    monitor wrapped in [`MonitorRequest::ForContainer`], its replies passed back, and the
//!    status it changes recorded; when S's monitor says the container's main process exited
//!    (or S's VM ended), the member records `stopped` and exits with the status.
//!
//! `husk delete` takes the container out of the VM and its files out of the share
//! ([`leave`]).
//!
//! Here: the steps and the serving; `place` (with `mounts`) attaches the files, `proxy`
//! passes the commands on, `leave` undoes a member for `delete`, `error` says why a step
//! failed.
//!
//! The member runs as root on the host and is not jailed; it is not exposed to the guest the
//! way a monitor is: it reads only the replies of S's monitor (bounded, see `client`) and
//! relays the container's stdio streams, as `husk exec` does. Both come from a monitor that
//! may be taken over, so once it serves every thread of the member is confined by seccomp as
//! a monitor's are (`super::threads`): the stdio and terminal relays as `Relay`, the main
//! thread, the command acceptor and proxies and the terminal-resize forwarder as `Member` (no
//! exec, no signal to another process, no socket but a Unix one, no mount or namespace).

mod error;
mod leave;
mod mounts;
mod place;
mod proxy;

pub use self::error::MemberError;
pub use self::leave::leave;

use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use husk_proto::{Stdio, VsockPort};
use husk_seccomp::ThreadKind;

use self::place::{Placed, SandboxNamespaces};
use super::api::{MonitorReply, MonitorRequest};
use super::client;
use super::console::Console;
use super::setup::{self, ContainerStdio};
use super::{relay, threads};
use crate::error_chain;
use crate::oci::bundle::{Bundle, BundleError};
use crate::oci::pod::{self, Membership, PodError};
use crate::oci::ports;
use crate::oci::sockets::{self, SocketDir};
use crate::oci::state::{self, State, StateError, Status};

/// What `husk create` tells a member.
#[derive(Debug, Clone)]
pub struct MemberArgs {
    /// The state root.
    pub root: PathBuf,
    /// The container id.
    pub id: String,
    /// The bundle.
    pub bundle: PathBuf,
    /// The pod's sandbox, whose VM the container joins.
    pub sandbox: String,
    /// Write end of the pipe on which the member reports "ok" or why not (and asks for the
    /// create hooks, see `monitor::create_hooks`).
    pub notify_fd: RawFd,
    /// Read end of the pipe on which `husk create` says it ran the create hooks.
    pub hooks_fd: Option<RawFd>,
    /// Where to send the pty master when the process has a terminal.
    pub console_socket: Option<PathBuf>,
    /// The `--log` file, for the member's own diagnostics.
    pub log: Option<PathBuf>,
    /// `--systemd-cgroup`: how `cgroupsPath` reads.
    pub systemd_cgroup: bool,
}

/// Runs a member; returns when the container has stopped, with its exit status.
pub fn run(args: MemberArgs) -> ExitCode {
    // Its threads confine themselves, as a monitor's do (see the module docs).
    super::threads::monitor_process();
    // The member is the first process of a pid namespace of its own, as a monitor is.
    crate::pid::init();
    // SAFETY: `create` passed us this descriptor (the write end of its pipe) for our exclusive use.
    let mut notify = unsafe { std::fs::File::from_raw_fd(args.notify_fd) };
    let dir = args.root.join(&args.id);
    let joined = setup::take_stdio(args.log.as_deref())
        .map_err(|source| MemberError::Io {
            what: "taking the container's stdio",
            path: "/proc/self/fd".into(),
            source,
        })
        .and_then(|stdio| join(&args, &dir, stdio));
    let member = match joined {
        Ok(m) => m,
        Err(e) => {
            let _ = writeln!(notify, "error: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let _ = writeln!(notify, "ok");
    drop(notify);
    super::threads::confine(ThreadKind::Member);
    let code = member.serve();
    ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))
}

/// A member whose container the sandbox's VM has.
struct Member {
    dir: PathBuf,
    /// The container's state, written by whoever changes it.
    state: Arc<Mutex<State>>,
    /// The connection on which the sandbox's monitor reports the container's exit.
    exit: client::Replies,
    /// The output relays, finished before the member exits.
    outputs: Vec<relay::Output>,
    /// The member's own sockets (its `monitor.sock`).
    own: SocketDir,
    /// The sandbox's directory (the stdio ports are there).
    vm: SocketDir,
    /// The first of the stdio ports.
    ports: u32,
}

/// Steps 1 to 3 of the module docs; on failure, what was done is undone.
fn join(args: &MemberArgs, dir: &Path, stdio: ContainerStdio) -> Result<Member, MemberError> {
    let bundle = Bundle::load(&args.bundle)?;
    let sandbox_dir =
        std::path::absolute(args.root.join(&args.sandbox)).map_err(|source| MemberError::Io {
            what: "finding",
            path: args.root.join(&args.sandbox),
            source,
        })?;
    let sandbox_id =
        husk_proto::ContainerId::new(args.sandbox.clone()).map_err(|e| MemberError::Sandbox {
            id: args.sandbox.clone(),
            source: e.into(),
        })?;
    let sandbox =
        state::read_state(&sandbox_dir, &sandbox_id).map_err(|source| MemberError::Sandbox {
            id: args.sandbox.clone(),
            source,
        })?;
    let sandbox_pid = sandbox
        .pid
        .filter(|_| state::monitor_alive(&sandbox))
        .filter(|_| matches!(sandbox.status, Status::Created | Status::Running))
        .ok_or_else(|| PodError::SandboxNotRunning {
            id: args.sandbox.clone(),
            because: "--pod-sandbox",
            why: format!("it is {}", sandbox.status),
        })?;
    fits(&bundle, &sandbox)?;
    super::create_hooks::run(args.notify_fd, args.hooks_fd, &bundle)
        .map_err(|e| MemberError::CreateHooks(Box::new(e)))?;
    join_cgroup(args, &bundle, dir)?;
    let ns = SandboxNamespaces::of(sandbox_pid)?;
    // One thread until here: `place` forks.
    let placed = place::place(&bundle, &args.id, &sandbox_dir, &ns)?;
    let workdir = placed.workdir.clone();
    crate::phases::record_now("member-placed");
    let undo = |e: MemberError| {
        place::unplace(&args.id, &sandbox_dir, Some(sandbox_pid));
        if let Some(w) = &workdir {
            let _ = std::fs::remove_dir_all(w);
        }
        e
    };
    enter_pod(args, dir, &bundle, &sandbox_dir, placed, stdio).map_err(undo)
}

/// Moves the member into the container's `cgroupsPath`, if the spec has one, without limits:
/// the container's processes, and their limits, are in the pod's VM, whose threads are in the
/// sandbox's cgroup (see `super::cgroup`). `delete` removes it.
fn join_cgroup(args: &MemberArgs, bundle: &Bundle, dir: &Path) -> Result<(), MemberError> {
    let path =
        super::cgroup::Placement::spec_path(&bundle.spec, args.systemd_cgroup).map_err(|why| {
            BundleError::Invalid {
                path: bundle.dir.join("config.json"),
                field: "linux.cgroupsPath",
                why,
            }
        })?;
    if let Some(path) = path {
        super::cgroup::join(&super::cgroup::Placement::Spec { path, limits: None }, dir)?;
    }
    Ok(())
}

/// Checks that the container's limits fit in the pod's VM (sized by the sandbox's spec, see
/// `crate::oci::bundle`): its memory limit in what the guest leaves to containers, its CPUs in
/// the vCPUs. The VM does not grow.
fn fits(bundle: &Bundle, sandbox: &State) -> Result<(), MemberError> {
    let vm = Bundle::load(&sandbox.bundle)
        .map_err(|e| MemberError::Sandbox {
            id: sandbox.id.clone(),
            source: StateError::Corrupt {
                path: sandbox.bundle.clone(),
                msg: error_chain(&e),
            },
        })?
        .vm;
    let crate::oci::bundle::Limits { memory, cpus } = crate::oci::bundle::limits(&bundle.spec)
        .map_err(|(field, why)| BundleError::Invalid {
            path: bundle.dir.join("config.json"),
            field,
            why,
        })?;
    let room_mib = vm
        .memory_mib
        .saturating_sub(crate::oci::bundle::GUEST_OVERHEAD_MIB);
    if let Some(bytes) = memory.filter(|b| b.div_ceil(1 << 20) > room_mib) {
        return Err(MemberError::DoesNotFit(format!(
            "its memory limit ({} MiB) is more than the pod's VM leaves to containers ({room_mib} MiB of {} MiB)",
            bytes.div_ceil(1 << 20),
            vm.memory_mib
        )));
    }
    if let Some(n) = cpus.filter(|n| *n > u64::from(vm.vcpus)) {
        return Err(MemberError::DoesNotFit(format!(
            "it asks for {n} CPUs, the pod's VM has {}",
            vm.vcpus
        )));
    }
    Ok(())
}

/// Step 3 and the stdio of step 2: the container's records and sockets, its stdio, and the
/// container added to the sandbox's VM.
fn enter_pod(
    args: &MemberArgs,
    dir: &Path,
    bundle: &Bundle,
    sandbox_dir: &Path,
    placed: Placed,
    stdio: ContainerStdio,
) -> Result<Member, MemberError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| MemberError::Io { what, path, source }
    };
    let vm = SocketDir::open(sandbox_dir).map_err(io("opening", sandbox_dir))?;
    let own = SocketDir::open(dir).map_err(io("opening", dir))?;
    let (base, listeners) = ports::bind(&vm).map_err(io("binding stdio ports in", sandbox_dir))?;
    // The relays wait on them for as long as the container lives (the guest connects when
    // its process starts, after `start`): blocking, unlike an exec's.
    for l in &listeners {
        l.set_nonblocking(false)
            .map_err(io("making blocking a stdio port in", sandbox_dir))?;
    }
    let result = (|| {
        let console = match (bundle.terminal(), &args.console_socket) {
            (false, _) => None,
            (true, Some(socket)) => Some(Console::open(socket)?),
            (true, None) => return Err(MemberError::NoConsoleSocket),
        };
        let pid = i32::try_from(crate::pid::host_pid()).unwrap_or(0);
        let mut state = State::creating(&args.id, bundle, Some(pid));
        state::write_fixed(dir, &state)?;
        let workdir = placed.workdir.clone();
        let membership = |container| Membership {
            sandbox: args.sandbox.clone(),
            container,
            workdir: workdir.clone(),
        };
        pod::write_json(&dir.join(pod::POD_FILE), &membership(0))?;
        let commands = UnixListener::bind(own.monitor())
            .map_err(io("listening on", &dir.join(sockets::MONITOR_SOCKET)))?;
        let stdio_ports = if console.is_some() {
            Stdio::Terminal {
                port: VsockPort(base),
            }
        } else {
            Stdio::Pipes {
                stdin: Some(VsockPort(base)),
                stdout: Some(VsockPort(base + 1)),
                stderr: Some(VsockPort(base + 2)),
            }
        };
        let added = Arc::new(std::sync::OnceLock::new());
        let outputs = relay_stdio(console, listeners, stdio, &vm, added.clone());
        let request = MonitorRequest::AddContainer {
            id: args.id.clone(),
            config_json: bundle.config_json.clone(),
            rootfs: placed.rootfs,
            mounts: placed.mounts,
            stdio: stdio_ports,
        };
        let (reply, exit) =
            client::request(&vm.monitor(), &request).map_err(MemberError::Monitor)?;
        let container = match reply {
            MonitorReply::Added { container, .. } => container,
            MonitorReply::Error(e) => return Err(MemberError::Monitor(e)),
            other => return Err(MemberError::Monitor(format!("unexpected reply {other:?}"))),
        };
        crate::phases::record_now("member-added");
        let _ = added.set(container);
        pod::write_json(&dir.join(pod::POD_FILE), &membership(container))?;
        state.status = Status::Created;
        state::write_state(dir, &state)?;
        let state = Arc::new(Mutex::new(state));
        proxy::spawn_command_proxy(
            commands,
            vm.monitor(),
            container,
            state.clone(),
            dir.to_owned(),
        );
        Ok((state, exit, outputs))
    })();
    match result {
        Ok((state, exit, outputs)) => Ok(Member {
            dir: dir.to_owned(),
            state,
            exit,
            outputs,
            own,
            vm,
            ports: base,
        }),
        Err(e) => {
            ports::remove(&vm, base, 3);
            Err(e)
        }
    }
}

/// Connects the container's stdio to the guest's streams: the terminal (whose resizes go to
/// the sandbox's monitor once the container has its number, `added`), or the stdio the member
/// inherited.
fn relay_stdio(
    console: Option<Console>,
    [stdin_l, stdout_l, stderr_l]: [UnixListener; 3],
    stdio: ContainerStdio,
    vm: &SocketDir,
    added: Arc<std::sync::OnceLock<u32>>,
) -> Vec<relay::Output> {
    let Some(console) = console else {
        relay::stdin(stdin_l, stdio.stdin);
        return vec![
            relay::output(stdout_l, stdio.stdout, "stdout"),
            relay::output(stderr_l, stdio.stderr, "stderr"),
        ];
    };
    let (tx, sizes) = std::sync::mpsc::channel();
    console.relay(stdin_l, tx);
    let monitor = vm.monitor();
    threads::spawn("resize", ThreadKind::Member, move || {
        for size in sizes {
            let Some(&container) = added.get() else {
                // Not added yet: the guest sizes the terminal when it creates it, and the
                // next change comes on its own.
                continue;
            };
            let request = MonitorRequest::ForContainer {
                container,
                request: Box::new(MonitorRequest::Resize { size }),
            };
            let _ = client::request(&monitor, &request);
        }
    });
    Vec::new()
}

impl Member {
    /// Waits for the container's exit (step 4); returns its status.
    fn serve(mut self) -> i32 {
        let code = match client::read_reply(&mut self.exit) {
            Ok(MonitorReply::Exited(code)) => code,
            Ok(other) => {
                eprintln!("husk: unexpected reply from the pod's sandbox's monitor: {other:?}");
                255
            }
            Err(e) => {
                eprintln!("husk: the pod's sandbox's monitor went away: {e}");
                128 + 9
            }
        };
        for out in self.outputs.drain(..) {
            out.finish(relay::OUTPUT_STALL);
        }
        {
            let mut st = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            st.status = Status::Stopped;
            st.exit_status = Some(code);
            let _ = state::write_state(&self.dir, &st);
        }
        ports::remove(&self.vm, self.ports, 3);
        // Fails (EBUSY) only if pinned; `delete` removes it with the directory.
        let _ = std::fs::remove_file(self.own.monitor());
        code
    }
}
