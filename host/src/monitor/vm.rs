//! Creating, second stage: the VM, restored from its template when the setup found one, else
//! booted, from the `VmConfig` the setup made.

use std::time::Instant;

use super::error::MonitorError;
use super::setup::Template;
use crate::template::Key;
use crate::vmm::{self, VmConfig, VmExit, VmHandle};

/// How the VM came to be.
#[derive(Debug)]
pub(super) struct Started {
    /// Stops, pauses and resumes it.
    pub(super) handle: VmHandle,
    /// It was restored from a template (its NICs still have the template's MACs).
    pub(super) restored: bool,
    /// The template that could not be restored (the VM then booted): `husk create` removes it.
    pub(super) rejected: Option<Key>,
}

/// Restores the VM of `config` from `template` or, without one or when the restore is refused
/// (after one log line), boots it; a thread waits for its end, records its phases and calls
/// `on_end` with why it ended.
pub(super) fn start(
    config: &VmConfig,
    template: Option<&Template>,
    process_start: Instant,
    on_end: impl FnOnce(VmExit) + Send + 'static,
) -> Result<Started, MonitorError> {
    let mut rejected = None;
    let restored = template.and_then(|t| match vmm::restore(config, &t.snapshot, process_start) {
        Ok(vm) => Some(vm),
        Err(e) => {
            eprintln!(
                "husk monitor: template {} refused, booting cold: {}",
                t.key,
                crate::error_chain(&e)
            );
            rejected = Some(t.key.clone());
            None
        }
    });
    let is_restored = restored.is_some();
    let vm = match restored {
        Some(vm) => {
            crate::phases::record_now("vm-restored");
            vm
        }
        None => vmm::start(config, process_start).map_err(MonitorError::StartVm)?,
    };
    let handle = vm.handle().map_err(MonitorError::VmHandle)?;
    std::thread::Builder::new()
        .name("vm-wait".into())
        .spawn(move || {
            super::threads::confine(husk_seccomp::ThreadKind::VmWait);
            let (why, timeline) = vm.wait(None);
            record_vm_phases(&timeline);
            on_end(why);
        })
        .map_err(MonitorError::Io)?;
    Ok(Started {
        handle,
        restored: is_restored,
        rejected,
    })
}

/// Records the VM's own phases (see [`crate::phases`]): known only once it has ended, written
/// with the times they happened.
fn record_vm_phases(timeline: &vmm::Timeline) {
    if !crate::phases::enabled() {
        return;
    }
    crate::phases::record("vm-created", timeline.vm_ready);
    if let Some(t) = timeline.first_entry {
        crate::phases::record("first-vcpu-entry", t);
    }
    for (t, marker) in &timeline.markers {
        if let Ok(m) = marker {
            crate::phases::record(m.name(), *t);
        }
    }
}
