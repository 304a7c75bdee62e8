//! The monitor's threads, each named and each confined by its seccomp filter (crate
//! `husk-seccomp`) before it does anything else: a monitor taken over by its guest must find
//! no thread without one. The VMM's threads (vmm, vCPUs) filter themselves in `crate::vmm`;
//! the monitor's own are started here: `vm-wait` (`VmWait`), `guest-reader` and
//! `guest-writer` (`Guest`), `commands` and one `command` per connection (`Commands`), and the
//! relays of the container's stdio and terminals (`Relay`). The main thread filters itself as `Monitor` once the VM runs
//! ([`confine`], called from `super::create`).
//!
//! A thread created after its parent filtered itself runs under the parent's filter until it
//! installs its own on top (filters stack, a syscall must pass each): the parents' filters hold
//! what their children need until then (see `husk-seccomp`'s docs).
//!
//! Only a monitor process confines its threads: [`monitor_process`] says this process is one
//! (the first thing `super::run` does). The same code run elsewhere (`husk exec` relays a
//! terminal with it, unit tests run it in the test process) leaves its threads as they are.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use husk_seccomp::ThreadKind;

/// Whether this process is a monitor (see the module docs).
static MONITOR: AtomicBool = AtomicBool::new(false);

/// This process is a monitor: from now on [`confine`] and [`spawn`] filter threads.
pub(super) fn monitor_process() {
    MONITOR.store(true, Ordering::SeqCst);
}

/// Filters the calling thread as `kind`, in a monitor process. A thread that cannot be
/// filtered must not go on (it would serve the guest unconfined): the monitor aborts, and the
/// container stops.
pub(crate) fn confine(kind: ThreadKind) {
    if !MONITOR.load(Ordering::SeqCst) {
        return;
    }
    if let Err(e) = husk_seccomp::apply(kind) {
        eprintln!("husk monitor: {}", crate::error_chain(&e));
        std::process::abort();
    }
}

/// Starts a thread named `name` that confines itself as `kind` (see [`confine`]), then runs
/// `f`. Like `std::thread::spawn`, panics if the thread cannot be created.
pub(crate) fn spawn<T: Send + 'static>(
    name: &str,
    kind: ThreadKind,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            confine(kind);
            f()
        })
        .expect("failed to spawn a monitor thread")
}
