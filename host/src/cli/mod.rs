//! The `husk` command line: runc's commands, flags and exit codes (`oci`, one verb a file),
//! developer commands (`vm`), and how errors are reported (`log`).

mod log;
mod oci;
mod template;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "husk",
    version,
    about = "OCI runtime that runs each container in its own KVM microVM",
    after_help = "Not supported: checkpoint and restore (a container's VM cannot be saved and restored yet)."
)]
struct Cli {
    /// Root directory for container state.
    #[arg(long, global = true, default_value = "/run/husk")]
    root: PathBuf,
    /// Also write errors to this file.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Format of the --log file: text or json (runc's JSON lines).
    #[arg(long, global = true, default_value = "text")]
    log_format: log::Format,
    /// Debug output.
    #[arg(long, global = true)]
    debug: bool,
    /// cgroupsPath is systemd's "slice:prefix:name" (the cgroup is made on the cgroup
    /// filesystem where runc's systemd driver would have its scope).
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// Who each container's monitor runs as: `auto` (the default), a range of 65536 host uids
    /// and gids of its own from --monitor-uid-pool, in a user namespace where the container's
    /// ids 0-65535 are that range (its files keep their owners on disk, served through
    /// idmapped mounts, which the filesystems must support); a UID, the same range
    /// UID..UID+65535 for every monitor (weaker: monitors may signal one another); or `root`
    /// (weaker still: confined by its jail and seccomp filters only).
    #[arg(
        long,
        global = true,
        value_name = "auto|root|UID",
        default_value = "auto",
        env = crate::monitor::userns::ENV
    )]
    monitor_uid: crate::monitor::uids::MonitorUser,
    /// The host uids `--monitor-uid auto` takes ranges from: COUNT ids from FIRST, a multiple
    /// of 65536 (one range per container that is not deleted yet). Keep it apart from the
    /// host's users and from other subordinate ranges (/etc/subuid).
    #[arg(
        long,
        global = true,
        value_name = "FIRST:COUNT",
        default_value = crate::monitor::uids::DEFAULT_POOL,
        env = crate::monitor::uids::POOL_ENV
    )]
    monitor_uid_pool: crate::monitor::uids::Pool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a container (boots its VM; the process waits for `start`).
    Create(oci::create::CreateArgs),
    /// Start a created container's process.
    Start(oci::IdArg),
    /// Print the state of a container as JSON.
    State(oci::IdArg),
    /// Send a signal to the container's process (or every process with --all).
    Kill(oci::kill::KillArgs),
    /// Delete a stopped container (--force: stop it first).
    Delete(oci::delete::DeleteArgs),
    /// Create and start a container, wait for it unless --detach.
    Run(oci::run::RunArgs),
    /// Run another process in a running container (in its VM).
    Exec(oci::exec::ExecArgs),
    /// List the processes of a container (guest pids).
    Ps(oci::state::PsArgs),
    /// List containers.
    List(oci::state::ListArgs),
    /// Print the features this runtime supports (runtime-spec features JSON).
    Features,
    /// Write a default config.json into the current (or --bundle) directory.
    Spec(oci::spec::SpecArgs),
    /// Pause a container (its VM's vCPUs stop).
    Pause(oci::IdArg),
    /// Resume a paused container.
    Resume(oci::IdArg),
    /// Print the container's resource usage as stats events (JSON lines).
    Events(oci::events::EventsArgs),
    /// Change a running container's resource limits (in its VM and on its host cgroup).
    Update(oci::update::UpdateArgs),
    /// Not supported: a container's VM cannot be checkpointed yet.
    Checkpoint(oci::Unsupported),
    /// Not supported: a container's VM cannot be restored from a checkpoint yet.
    Restore(oci::Unsupported),
    /// Manage VM templates (booted guests that `create` restores instead of booting).
    #[command(subcommand)]
    Template(template::TemplateCommand),
    /// Developer commands that work on a VM without the OCI layer.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// The per-container monitor (started by `create`; not for direct use).
    #[command(hide = true)]
    Monitor(oci::create::MonitorCmdArgs),
}

/// Parses the arguments and runs the command.
pub fn main(process_start: Instant) -> ExitCode {
    let cli = Cli::parse();
    let logger = log::Logger::new(cli.log.clone(), cli.log_format, cli.debug);
    let ctx = oci::Context {
        log: cli.log.clone(),
        log_format: cli.log_format,
        root: cli.root.clone(),
        debug: cli.debug,
        monitor_uid: cli.monitor_uid,
        monitor_uid_pool: cli.monitor_uid_pool,
        systemd_cgroup: cli.systemd_cgroup,
    };
    let is_monitor = matches!(cli.command, Command::Monitor(_));
    crate::phases::record(
        if is_monitor {
            "monitor-start"
        } else {
            "cli-start"
        },
        process_start,
    );
    let result = match cli.command {
        Command::Create(a) => oci::create::create(&ctx, a),
        Command::Start(a) => oci::start::start(&ctx, a),
        Command::State(a) => oci::state::state(&ctx, a),
        Command::Kill(a) => oci::kill::kill(&ctx, a),
        Command::Delete(a) => oci::delete::delete(&ctx, a),
        Command::Run(a) => oci::run::run(&ctx, a),
        Command::Exec(a) => oci::exec::exec(&ctx, a),
        Command::Ps(a) => oci::state::ps(&ctx, a),
        Command::List(a) => oci::state::list(&ctx, a),
        Command::Features => oci::spec::features(),
        Command::Spec(a) => oci::spec::spec(a),
        Command::Pause(a) => oci::pause::pause(&ctx, a, true),
        Command::Resume(a) => oci::pause::pause(&ctx, a, false),
        Command::Events(a) => oci::events::events(&ctx, a),
        Command::Update(a) => oci::update::update(&ctx, a),
        Command::Checkpoint(_) => oci::spec::checkpoint("checkpoint"),
        Command::Restore(_) => oci::spec::checkpoint("restore"),
        Command::Template(cmd) => template::run(cmd),
        Command::Vm(cmd) => vm::run(cmd, process_start),
        Command::Monitor(a) => Ok(oci::create::monitor(&ctx, a, process_start)),
    };
    crate::phases::record_now(if is_monitor {
        "monitor-exit"
    } else {
        "cli-exit"
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            logger.error(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}
