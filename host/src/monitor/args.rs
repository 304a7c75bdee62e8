//! What `husk create` tells the monitor ([`MonitorArgs`]): the input of every stage. A leaf,
//! so that the stages (`setup` first) read it without depending on `mod.rs`, which runs them.

use std::os::fd::RawFd;
use std::path::PathBuf;

use super::userns::IdMap;

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
    /// Read end of the pipe on which `husk create` says it ran the create hooks (see
    /// [`create_hooks`](super::create_hooks)).
    pub hooks_fd: Option<RawFd>,
    /// Serial console of the VM to the monitor's stderr (debugging).
    pub console: bool,
    /// Where to send the pty master when the process has a terminal.
    pub console_socket: Option<PathBuf>,
    /// The `--log` file: the monitor's own diagnostics go there (never into the container's
    /// stderr, which is the stderr the monitor inherited).
    pub log: Option<PathBuf>,
    /// `--monitor-uid`: run confined as this host uid (see [`userns`](super::userns)).
    pub user: Option<IdMap>,
    /// `--systemd-cgroup`: `cgroupsPath` is `slice:prefix:name` (see [`cgroup::path`](super::cgroup::path)).
    pub systemd_cgroup: bool,
}
