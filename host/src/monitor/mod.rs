//! The monitor: the long-lived process behind each container. `husk create` starts it
//! (detached into its own session, still a descendant of the engine); it owns the VM, talks to
//! husk-init over vsock, relays the container's stdio, answers `husk` commands on
//! `<state dir>/monitor.sock`, keeps `state.json` current and finally exits with the
//! container's exit status (128+N for signal N), after the VM is gone.
//!
//! Creating is four stages, each a module, run in order by [`run`]:
//!
//! 1. `setup`: what the container needs on the host, prepared while the monitor still sees the
//!    host: the bundle; the shared directory (`share`); the network namespace (a new one is
//!    unshared there, on the single thread the monitor has then), the `prestart` and
//!    `createRuntime` hooks (run by `husk create` when the monitor asks, `create_hooks`) and
//!    the namespace's interfaces taken for the VM (`network`); the sockets; the terminal
//!    (`console`); the container's fixed state; then the jail (`jail`, with `cgroup`,
//!    `userns` and `overlay`);
//! 2. `vm`: the VM started from the `VmConfig` the setup made;
//! 3. `guest`: husk-init connects, the handshake, the network and the spec (typed requests
//!    that wait for their answers); the container's stdio is relayed (`relay`, `console`)
//!    before it is created; then "ok" to `husk create`;
//! 4. `serve`: the event loop, until the VM is gone.
//!
//! Threads: besides the VMM's own (vmm, vCPUs) the monitor runs one reader of the guest's
//! control connection, one acceptor of command connections (plus a short-lived reader per
//! connection), one waiter on the VM, and the stdio relays. All of them feed one channel; the
//! main thread handles the events in order, so the container's state has a single writer.
//! Every one of them, the main thread included once the VM runs, is confined by a seccomp
//! filter of its own before it touches anything the guest sends (`threads`).
//!
//! The commands' side of the control socket is `api` (the messages) and `client` (what `husk`
//! commands call).

pub mod api;
mod args;
pub mod cgroup;
pub mod client;
mod commands;
pub mod console;
mod containers;
pub mod create_hooks;
mod error;
mod guest;
mod guest_log;
pub mod jail;
pub mod member;
mod mountinfo;
pub mod network;
mod outbox;
pub mod overlay;
mod relay;
mod serve;
mod setup;
mod share;
mod threads;
pub mod uids;
pub mod userns;
mod vm;

use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use husk_proto::{ContainerRef, ProcessRef};

pub use self::args::MonitorArgs;
pub use self::error::MonitorError;
use self::guest::GuestSession;
pub use self::relay::copy_streaming;
use self::serve::{Ev, Monitor};
use self::setup::ContainerStdio;
use crate::error_chain;
use crate::oci::state::{self, Status};

/// Runs the monitor; never returns early on success (the container's life is this process's).
pub fn run(args: MonitorArgs, process_start: Instant) -> ExitCode {
    threads::monitor_process();
    // Before the jail's /proc, which is the monitor's own pid namespace's.
    crate::pid::init();
    // SAFETY: `create` passed us this descriptor (the write end of its pipe) for our exclusive use.
    let mut notify = unsafe { std::fs::File::from_raw_fd(args.notify_fd) };
    let dir = args.root.join(&args.id);
    let created = setup::no_core_dumps()
        .and_then(|()| setup::take_stdio(args.log.as_deref()).map_err(MonitorError::Stdio))
        .and_then(|stdio| create(&args, &dir, process_start, stdio));
    let (mut monitor, rejected) = match created {
        Ok(m) => m,
        Err(e) => {
            let _ = writeln!(notify, "error: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if let Some(key) = rejected {
        // The jail hides the template cache: `husk create` removes it.
        let _ = writeln!(notify, "{TEMPLATE_REJECTED} {key}");
    }
    let _ = writeln!(notify, "ok");
    drop(notify);
    let code = monitor.serve();
    ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))
}

/// The line with which the monitor tells `husk create` that a template could not be restored
/// (KVM or a device refused it, or its guest did not greet), followed by its key, before "ok".
pub const TEMPLATE_REJECTED: &str = "template-rejected";

/// Creates the container: the stages of the module docs, up to a monitor ready to serve.
/// Also returns the template the VM could not be restored from, if any.
fn create(
    args: &MonitorArgs,
    dir: &Path,
    process_start: Instant,
    stdio: ContainerStdio,
) -> Result<(Monitor, Option<crate::template::Key>), MonitorError> {
    let mut host = setup::prepare(args, dir)?;
    let create = host.create_request();
    let limits = containers::Limits::new(host.vm_size(), &create.config_json);
    let (tx, events) = channel();
    let (started, mut guest) = start_and_greet(&host, process_start, &tx, &events)?;
    // Further connections to the control port are refused.
    host.ports.control = None;
    let stopper = started.handle;
    // Before anything of the container's reaches the guest. (Not before the greeting: a
    // restored VM that does not greet is replaced by one booted cold, which the confined
    // thread could not create; until then the guest has run only husk-init, from our image
    // or our template, nothing of the container's.)
    threads::confine(husk_seccomp::ThreadKind::Monitor);
    // From here on a failure stops the VM.
    let fail = |e: MonitorError| {
        stopper.stop();
        e
    };
    // The template's NIC slots the container's network leaves unused.
    let used = u8::try_from(host.vm.nets.len()).unwrap_or(u8::MAX);
    let spare_nics = (used..used.saturating_add(host.vm.spare_nets))
        .map(crate::vmm::spare_net_mac)
        .collect();
    guest.prepare(spare_nics).map_err(fail)?;
    if let Some(net) = host
        .network
        .as_ref()
        .filter(|n| !n.guest.interfaces.is_empty())
    {
        let mut config = net.guest.clone();
        if started.restored {
            // The guest's NICs still have the template's addresses.
            for (slot, iface) in (0u8..).zip(&mut config.interfaces) {
                iface.device_mac = crate::vmm::spare_net_mac(slot);
            }
        }
        // Before Create, so the network is up by the time `create` returns.
        guest.configure_network(config).map_err(fail)?;
    }
    let outputs = relay_stdio(host.console, host.ports.stdio, stdio, &tx);
    guest.create_container(create).map_err(fail)?;

    let mut state = host.state;
    state.status = Status::Created;
    state::write_state(dir, &state).map_err(|e| fail(MonitorError::State(e)))?;

    // Readers feeding the main loop.
    let reader = guest.reader().map_err(|e| fail(MonitorError::Io(e)))?;
    serve::spawn_guest_reader(reader, tx.clone());
    serve::spawn_command_acceptor(host.commands, tx.clone());

    let monitor = Monitor::new(serve::Parts {
        dir: dir.to_path_buf(),
        sockets: host.sockets,
        state,
        guest,
        events,
        events_tx: tx,
        stopper,
        outputs,
        network: host.network,
        limits,
    });
    Ok((monitor, started.rejected))
}

/// How long husk-init in a VM restored from a template may take to reconnect and greet: it
/// normally takes a fraction of a second; a VM that does not within this is stopped and the
/// container's VM boots cold instead. `HUSK_RESTORE_GREETING_MS` in `create`'s environment
/// changes it (for very slow hosts, and for the test of that fallback).
fn restored_greeting_timeout() -> Duration {
    std::env::var("HUSK_RESTORE_GREETING_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(60), Duration::from_millis)
}

/// Starts the VM (restored from the template, if the setup found one) and waits for husk-init
/// to connect and exchange `Hello`. A restored VM whose husk-init does not, in time or at all,
/// is stopped, its template is rejected (one log line; `husk create` removes it) and the VM
/// boots cold: a container never fails because of its template.
fn start_and_greet(
    host: &setup::Prepared,
    process_start: Instant,
    tx: &Sender<Ev>,
    events: &Receiver<Ev>,
) -> Result<(vm::Started, GuestSession), MonitorError> {
    let start = |template| {
        let vm_ended = tx.clone();
        vm::start(&host.vm, template, process_start, move |why| {
            let _ = vm_ended.send(Ev::VmEnded(why));
        })
    };
    let vm_ended = || match events.try_recv() {
        Ok(Ev::VmEnded(why)) => Some(why),
        _ => None,
    };
    let control = host
        .ports
        .control
        .as_ref()
        .ok_or(MonitorError::NoControlPort)?;
    let greet = |started: &vm::Started, timeout| {
        let mut guest = GuestSession::accept(control, &started.handle, timeout, vm_ended)?;
        guest.hello().map(|()| guest)
    };
    let started = start(host.template.as_ref())?;
    let timeout = if started.restored {
        restored_greeting_timeout()
    } else {
        guest::BOOT_TIMEOUT
    };
    let failure = match greet(&started, timeout) {
        Ok(guest) => return Ok((started, guest)),
        Err(e) => e,
    };
    started.handle.stop();
    let Some(template) = host.template.as_ref().filter(|_| started.restored) else {
        return Err(failure);
    };
    eprintln!(
        "husk monitor: the VM restored from template {} did not greet ({}); booting cold",
        template.key,
        error_chain(&failure)
    );
    // Its end frees the vsock socket that the VM booted next binds.
    loop {
        match events.recv_timeout(Duration::from_secs(30)) {
            Ok(Ev::VmEnded(_)) => break,
            Ok(_) => {}
            Err(_) => return Err(failure),
        }
    }
    let mut cold = start(None)?;
    let guest = greet(&cold, guest::BOOT_TIMEOUT).inspect_err(|_| cold.handle.stop())?;
    cold.rejected = Some(template.key.clone());
    Ok((cold, guest))
}

/// Connects the container's stdio to the guest's streams (accepted on the `stdin`, `stdout` and
/// `stderr` listeners when husk-init creates the container): the terminal, or the stdio the
/// monitor inherited. Returns the output relays, which the serving loop lets finish.
fn relay_stdio(
    console: Option<console::Console>,
    [stdin_l, stdout_l, stderr_l]: [UnixListener; 3],
    stdio: ContainerStdio,
    tx: &Sender<Ev>,
) -> Vec<relay::Output> {
    let mut outputs = Vec::new();
    if let Some(console) = console {
        serve::relay_console(
            console,
            stdin_l,
            ProcessRef::Init(ContainerRef::FIRST),
            tx.clone(),
        );
        drop((stdout_l, stderr_l));
    } else {
        outputs.push(relay::output(stdout_l, stdio.stdout, "stdout"));
        outputs.push(relay::output(stderr_l, stdio.stderr, "stderr"));
        relay::stdin(stdin_l, stdio.stdin);
    }
    outputs
}
