//! `husk delete`: stops a monitor that is still there (with `--force`), then removes
//! everything the container left on the host, and runs the `poststop` hooks.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::Context;
use crate::error_chain;
use crate::oci::hooks::{self, HookKind};
use crate::oci::state::{self, Status};

/// `delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Container id.
    id: String,
    /// Stop the container's VM first if it still runs.
    #[arg(long, short = 'f')]
    force: bool,
}

/// `husk delete`.
pub fn delete(ctx: &Context, args: DeleteArgs) -> Result<ExitCode> {
    let entry = ctx.store().open(&args.id)?;
    let st = entry.current()?;
    if st.status != Status::Stopped && !args.force {
        bail!(
            "cannot delete container {} that is {} (use --force)",
            args.id,
            st.status
        );
    }
    // A monitor that is still there (running, or just finishing) is stopped with its VM.
    if let Some(pid) = st.pid.filter(|_| state::monitor_alive(&st)) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while state::monitor_alive(&st) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if state::monitor_alive(&st) {
            bail!(
                "the monitor (pid {pid}) of container {} did not die",
                args.id
            );
        }
    }
    remove_entry(entry)?;
    Ok(ExitCode::SUCCESS)
}

/// Removes a container whose monitor is gone: first, for a pod's later container, the
/// container in its sandbox's VM and its files in the sandbox's share; then what a killed monitor could not undo in
/// the container's network namespace (its tap, qdiscs and filters), then the monitor's cgroup,
/// then the work directories of overlays remounted for `--monitor-uid` and the monitor's uid
/// range, then the state directory, then runs its `poststop` hooks (the spec: after the container is
/// deleted, before `delete` returns; also after a failed `create`). A network or cgroup
/// cleanup that fails (an unreadable record, a namespace that cannot be entered) is reported
/// but does not keep the state directory: a retry could not do better.
pub(super) fn remove_entry(entry: state::Entry) -> Result<()> {
    // A pod's later container: out of its sandbox's VM and share.
    crate::monitor::member::leave(entry.dir());
    if let Err(e) = crate::monitor::network::teardown(entry.dir()) {
        let e = anyhow::Error::from(e);
        eprintln!("husk: cleaning up the container's network namespace: {e:#}");
    }
    // The monitor's cgroup (see monitor::cgroup); like the network, not worth keeping the
    // state for.
    if let Err(e) = crate::monitor::cgroup::remove(entry.dir()) {
        eprintln!("husk: {}", error_chain(&e));
    }
    // The work directories of overlays remounted for `--monitor-uid` (monitor::overlay).
    if let Err(e) = crate::monitor::overlay::remove_workdirs(entry.dir(), &entry.id().to_string()) {
        eprintln!("husk: {}", error_chain(&e));
    }
    // The monitor's uid range, for another container (monitor::uids).
    let registry = std::path::Path::new(crate::monitor::uids::REGISTRY);
    if let Err(e) = crate::monitor::uids::release(registry, entry.dir()) {
        eprintln!("husk: {}", error_chain(&e));
    }
    let (kept, st) = (hooks::load_or_warn(entry.dir()), entry.read());
    entry.remove()?;
    if let (Some(kept), Ok(mut st)) = (kept, st) {
        st.status = Status::Stopped;
        hooks::run_warning(HookKind::Poststop, Some(&kept), &st);
    }
    Ok(())
}
