//! The flags of `husk exec` (the exec relay writes them back out for itself, see `relay`).

use std::path::PathBuf;

/// `exec`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Container id.
    pub(super) id: String,
    /// An OCI process JSON file instead of ARGS.
    #[arg(long, short = 'p')]
    pub(super) process: Option<PathBuf>,
    /// Allocate a terminal (in the guest; its master goes to --console-socket, or this
    /// command relays it to its own terminal).
    #[arg(long, short = 't')]
    pub(super) tty: bool,
    /// Return once the process runs; a host process (the exec relay, whose pid goes to
    /// --pid-file) holds its stdio and exits with its status.
    #[arg(long, short = 'd')]
    pub(super) detach: bool,
    /// Extra environment variables (KEY=VALUE).
    #[arg(long, short = 'e')]
    pub(super) env: Vec<String>,
    /// Working directory.
    #[arg(long)]
    pub(super) cwd: Option<String>,
    /// UID[:GID].
    #[arg(long, short = 'u')]
    pub(super) user: Option<String>,
    /// Write the pid of the host process that stands for the exec'd process here (it exits
    /// with the process's status).
    #[arg(long)]
    pub(super) pid_file: Option<PathBuf>,
    /// Unix socket for the pty master (with --tty).
    #[arg(long)]
    pub(super) console_socket: Option<PathBuf>,
    /// The exec relay reports "ok" (or the error) on this inherited descriptor once the
    /// process runs (internal: set by --detach).
    #[arg(long, hide = true)]
    pub(super) started_fd: Option<i32>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub(super) args: Vec<String>,
}
