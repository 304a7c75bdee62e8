//! What the VMM's threads share: the caller's ("api", which starts the VM and waits for it),
//! the device event loop's ("vmm", `event_loop`) and one per vCPU (`vstate::vcpu`).
//!
//! Each confines itself with its own seccomp filter (crate `husk-seccomp`, [`apply_seccomp`])
//! after setup and before it handles anything the guest controls; they share device and run
//! state behind mutexes taken with [`lock`]; each tells the waiting thread why the VM ended
//! ([`VmExit`]). A leaf of the VMM: the threads, the devices and the VM's handle use it, so it
//! is not in `vmm/mod.rs`, which uses them.

use std::sync::Mutex;

pub use husk_seccomp::ThreadKind;

/// Seccomp for the VMM's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    /// Install the filters; a syscall outside them kills the process.
    Enforce,
    /// Install the filters but only log violations (`dmesg`), to find a missing syscall.
    Log,
    /// No filters (debugging only).
    Off,
}

/// Installs the calling thread's seccomp filter.
pub fn apply_seccomp(mode: SeccompMode, kind: ThreadKind) -> Result<(), String> {
    let mode = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Enforce => husk_seccomp::Mode::Enforce,
        SeccompMode::Log => husk_seccomp::Mode::Log,
    };
    husk_seccomp::apply_with(kind, mode).map_err(|e| format!("{e:#}"))
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// husk-init powered off (the `PowerOff` marker) or the guest asked KVM for power-off.
    PowerOff,
    /// The guest reset (i8042, triple fault).
    Reset,
    /// The host stopped it.
    Stopped,
    /// Something failed (KVM error, emulation failure, a device model error).
    Error(String),
}

/// Locks `mutex`, also when a thread panicked while holding it. The VMM's shared state
/// (device registers, the vCPUs' run flags) stays usable after such a panic, and the panic
/// itself already ends the VM; refusing the lock would only turn it into a hang or a second
/// panic on another thread.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
