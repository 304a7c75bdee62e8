//! The pid by which the host knows this process.
//!
//! `husk create` starts the monitor as the first process of a pid namespace of its own
//! (`cli::oci::spawn_monitor`): inside it `getpid()` is 1, while the engine, the container's
//! state and every other process name the monitor by the pid its parent saw. That pid is what
//! `/proc/self` of the procfs the monitor started with says (the engine's, mounted for the
//! engine's pid namespace); [`init`] reads it before the monitor's jail mounts a procfs of its
//! own. Outside a monitor the two pids are the same.

use std::sync::OnceLock;

static HOST_PID: OnceLock<u32> = OnceLock::new();

/// Reads and keeps the pid the mounted `/proc` knows this process by: call it before the
/// process mounts a `/proc` of its own pid namespace.
pub(crate) fn init() {
    let _ = host_pid();
}

/// This process's pid as the host (the engine, `/proc/<pid>`, the state's `pid`) knows it.
pub(crate) fn host_pid() -> u32 {
    *HOST_PID.get_or_init(|| {
        std::fs::read_link("/proc/self")
            .ok()
            .and_then(|p| p.to_str()?.parse().ok())
            .unwrap_or_else(std::process::id)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn outside_a_pid_namespace_it_is_the_pid() {
        assert_eq!(super::host_pid(), std::process::id());
    }
}
