//! The messages between `husk` commands and a container's monitor, over `monitor.sock`:
//! one JSON object per line. A command sends one [`MonitorRequest`] and reads
//! [`MonitorReply`]s until the one that answers it (an exec also gets `Exited` later, on the
//! same connection).

use husk_proto::{Stdio, WindowSize};
use serde::{Deserialize, Serialize};

/// What a command asks the monitor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MonitorRequest {
    /// Start the container's process.
    Start,
    /// Deliver a signal to the main process, or to every process with `all`.
    Kill {
        /// Signal number.
        signal: i32,
        /// All processes.
        all: bool,
    },
    /// The guest pids of the container's processes.
    Ps,
    /// Run another process in the container.
    Exec {
        /// The OCI process JSON.
        process_json: Vec<u8>,
        /// Its stdio (ports the caller listens on at `vsock.sock_<port>`).
        stdio: Stdio,
        /// With a terminal: where the monitor sends the pty master (it then relays the
        /// terminal itself and `stdio` is ignored).
        console_socket: Option<std::path::PathBuf>,
    },
    /// Resize the terminal of an exec'd process (`exec` is the id from
    /// [`MonitorReply::ExecStarted`]).
    ResizeExec {
        /// Which exec.
        exec: u32,
        /// The new size.
        size: WindowSize,
    },
    /// Pause the VM's vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// Resource usage of the container (runc's `events --stats` data).
    Stats,
}

/// What the monitor answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MonitorReply {
    /// Done.
    Ok,
    /// Pids for `Ps`.
    Pids(Vec<u32>),
    /// The exec'd process runs.
    ExecStarted {
        /// Its guest pid.
        pid: u32,
        /// Its exec id (for resizes).
        exec: u32,
    },
    /// The exec'd process ended: its exit status (128+N for signal N).
    Exited(i32),
    /// Resource usage, as runc's stats JSON.
    Stats(serde_json::Value),
    /// The request failed.
    Error(String),
}
