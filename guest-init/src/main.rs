//! husk-init: PID 1 of a husk VM.
//!
//! It mounts the guest's own /proc, /sys, /dev, /run and cgroup2, marks its start on the boot
//! marker port, connects to the host monitor over vsock and then serves the control protocol
//! (see `husk-proto`): it builds the container the way runc would (namespaces, mounts,
//! pivot_root, cgroup v2, capabilities, seccomp, user), starts it, relays its stdio, reaps
//! every orphan, reports exit statuses and finally powers the VM off.
//!
//! For tests the same engine runs as an ordinary process on a host:
//! `husk-init --connect unix:PREFIX` connects to the Unix socket `PREFIX_<port>` instead of
//! vsock (the naming Firecracker uses for guest-initiated connections) and touches nothing of
//! the host's system setup.

mod container;
mod log;
mod net;
mod relay;
mod server;
mod sys;
mod system;
mod transport;

use std::process::ExitCode;

use husk_proto::marker::Marker;

use crate::transport::Transport;

/// How this husk-init runs.
struct Options {
    /// Where the host is.
    transport: Transport,
    /// Whether this process is the VM's PID 1 (system setup, markers, power-off).
    pid1: bool,
    /// Where the cgroup v2 hierarchy is mounted.
    cgroup_root: std::path::PathBuf,
}

fn parse_args() -> Result<Options, String> {
    let mut transport = Transport::Vsock;
    let mut cgroup_root = std::path::PathBuf::from("/sys/fs/cgroup");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--connect" => {
                let v = args
                    .next()
                    .ok_or("--connect needs a value (vsock or unix:PREFIX)")?;
                transport = v.parse()?;
            }
            "--cgroup-root" => {
                cgroup_root = args.next().ok_or("--cgroup-root needs a path")?.into();
            }
            // The kernel passes unknown `key=value` and bare words of its command line to init.
            other if std::process::id() == 1 => {
                log::debug!("ignoring argument {other:?}");
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Options {
        transport,
        pid1: std::process::id() == 1,
        cgroup_root,
    })
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("husk-init: {e}");
            return ExitCode::from(2);
        }
    };
    // Before any thread or child: what the host has every container process run with.
    container::host_env::capture();
    if opts.pid1 {
        log::init_kmsg();
        std::panic::set_hook(Box::new(|info| {
            log::error!("panic: {info}");
        }));
        system::enable_markers();
        system::mark(Marker::InitStarted);
        if let Err(e) = system::setup() {
            log::error!("system setup failed: {}", log::chain(&e));
            system::power_off();
        }
    } else {
        system::become_subreaper();
    }

    let result = run(&opts);
    match &result {
        Ok(()) => log::info!("host is done with this VM"),
        Err(e) if opts.pid1 => log::error!("{}; powering the VM off", log::chain(e)),
        Err(e) => log::error!("{}", log::chain(e)),
    }
    if opts.pid1 {
        system::power_off();
    }
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// How long husk-init keeps trying to reach a host that reset its connection before it was
/// asked for anything (see [`run`]).
const RECONNECT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

fn connect(opts: &Options) -> Result<std::fs::File, server::ServerError> {
    opts.transport
        .connect(husk_proto::CONTROL_PORT)
        .map_err(|e| server::ServerError::NoHost {
            transport: opts.transport.to_string(),
            source: e,
        })
}

/// Connects again, retrying while the host is not there yet (a restored VM may run before its
/// monitor listens), for at most [`RECONNECT_WINDOW`].
fn reconnect(opts: &Options) -> Result<std::fs::File, server::ServerError> {
    let deadline = std::time::Instant::now() + RECONNECT_WINDOW;
    loop {
        match connect(opts) {
            Ok(conn) => return Ok(conn),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
}

fn run(opts: &Options) -> Result<(), server::ServerError> {
    let conn = connect(opts)?;
    let mut server = server::Server::new(
        conn,
        opts.transport.clone(),
        opts.cgroup_root.clone(),
        opts.pid1,
    );
    server.handshake()?;
    system::mark(Marker::HostConnected);
    loop {
        match server.serve() {
            // A VM template was saved here; restored, its vsock device reset the connection
            // to the template's builder (ECONNRESET, or EOF). The monitor that restored it is
            // listening. Garbage or a protocol violation is no reset: husk-init gives up.
            Err(e) if server.is_untouched() && e.is_connection_loss() => {
                log::info!("{}; connecting to the host again", log::chain(&e));
                server.reconnect(reconnect(opts)?)?;
                system::mark(Marker::HostConnected);
            }
            other => break other?,
        }
    }
    if opts.pid1 {
        // Power off while the control connection is still open: the host then learns that the
        // guest is done from the PowerOff marker, written after the sync, rather than from the
        // connection closing (on which it stops the VM at once, as for a crashed guest).
        log::info!("host is done with this VM");
        system::power_off();
    }
    Ok(())
}
