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
    },
    /// Resize the terminal of an exec'd process started on this connection.
    Resize(WindowSize),
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
    /// The exec'd process runs with this guest pid.
    ExecStarted(u32),
    /// The exec'd process ended: its exit status (128+N for signal N).
    Exited(i32),
    /// Resource usage, as runc's stats JSON.
    Stats(serde_json::Value),
    /// The request failed.
    Error(String),
}
