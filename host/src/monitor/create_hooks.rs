//! The `prestart` and `createRuntime` hooks, which run once the container's network namespace
//! exists and before its interfaces are taken for the VM (see `crate::oci::hooks`).
//!
//! They are run by `husk create`, not by the monitor: the monitor is the first process of a
//! pid namespace of its own, and a hook started from there would be in it too, where the
//! state's `pid` (the monitor's, as the host knows it) names nothing. Hooks pass that pid to
//! the kernel (`ip link ... netns <pid>`, `nsenter -t <pid>`, `kill`): they must run where
//! the engine runs the runtime, as runc runs them. The namespace they fill is the monitor's:
//! its main thread unshared it (`network::Netns::for_spec`), so `/proc/<pid>/ns/net` of the
//! state's `pid` names it.
//!
//! The exchange: the monitor writes [`REQUEST`] on its report pipe (the one it later writes
//! `ok` or `error: ...` on), and `husk create`, which reads that pipe, runs the hooks with the
//! state of the container being created (`pid`: the monitor's pid as `create` started it, not
//! anything the monitor said) and answers [`DONE`] on the hooks pipe, whose read end it gave
//! the monitor as `--hooks-fd`. If a hook fails, `create` closes the hooks pipe without an
//! answer: the monitor then fails as for any other error, undoing what it made, and `create`
//! reports the hook's error. `create` runs the hooks at most once, and refuses an `ok` from a
//! monitor that never asked for hooks the bundle has.

use std::io::Read;
use std::os::fd::{BorrowedFd, FromRawFd, RawFd};

use super::MonitorError;
use crate::oci::bundle::Bundle;
use crate::oci::hooks::HookKind;

/// The line the monitor writes on its report pipe to have `husk create` run the hooks.
pub const REQUEST: &str = "run-create-hooks";

/// The line `husk create` answers on the hooks pipe once they all ran.
pub const DONE: &str = "hooks-done";

/// Whether `bundle` has hooks to run while creating.
pub fn wanted(bundle: &Bundle) -> bool {
    bundle.spec.hooks().as_ref().is_some_and(|h| {
        !HookKind::Prestart.hooks(h).is_empty() || !HookKind::CreateRuntime.hooks(h).is_empty()
    })
}

/// Has `husk create` run the bundle's `prestart` and `createRuntime` hooks, if it has any,
/// and waits until they ran (see the module docs). Closes `--hooks-fd` either way: the
/// monitor lives as long as the container and needs it no longer.
/// `notify_fd` is the report pipe's write end, `hooks_fd` the hooks pipe's read end (both
/// from `husk create`'s command line).
pub(super) fn run(
    notify_fd: RawFd,
    hooks_fd: Option<RawFd>,
    bundle: &Bundle,
) -> Result<(), MonitorError> {
    // SAFETY: `create` passed us this descriptor (the read end of its hooks pipe) for our
    // exclusive use; nothing else in the process uses it, and this is its only reader (the
    // monitor's `prepare` or a pod member's `join` calls this once).
    let answers = hooks_fd.map(|fd| unsafe { std::fs::File::from_raw_fd(fd) });
    if !wanted(bundle) {
        return Ok(());
    }
    let mut answers = answers.ok_or(MonitorError::NoHooksChannel)?;
    let err = |what| move |source| MonitorError::HooksChannel { what, source };
    // SAFETY: `monitor::run` (or `member::run`) keeps the report pipe's write end open (it
    // owns it as a File) until it reports, which is after this returns; the descriptor is
    // borrowed here for one write.
    let notify = unsafe { BorrowedFd::borrow_raw(notify_fd) };
    let line = format!("{REQUEST}\n");
    // A pipe takes a write this short (under PIPE_BUF) whole or not at all.
    nix::unistd::write(notify, line.as_bytes())
        .map_err(std::io::Error::from)
        .map_err(err("asking husk create to run them"))?;
    let mut answer = String::new();
    (&mut answers)
        .take(256)
        .read_to_string(&mut answer)
        .map_err(err("waiting for husk create to run them"))?;
    match answer.trim() {
        DONE => Ok(()),
        "" => Err(err("husk create did not run them")(std::io::Error::other(
            "it closed the hooks pipe without an answer (a hook failed)",
        ))),
        other => Err(err("husk create did not run them")(std::io::Error::other(
            format!("it answered {other:?}"),
        ))),
    }
}
