//! Creating, second stage: the VM starts from the `VmConfig` the setup made. One small
//! function, so that a VM restored from a template can start here instead of booting.

use std::time::Instant;

use super::error::MonitorError;
use crate::vmm::{self, VmConfig, VmExit, VmHandle};

/// Builds and starts the VM of `config`; a thread waits for its end, records its phases and
/// calls `on_end` with why it ended. Returns the handle that stops, pauses and resumes it.
pub(super) fn start(
    config: &VmConfig,
    process_start: Instant,
    on_end: impl FnOnce(VmExit) + Send + 'static,
) -> Result<VmHandle, MonitorError> {
    let vm = vmm::start(config, process_start).map_err(MonitorError::StartVm)?;
    let stopper = vm.handle().map_err(MonitorError::VmHandle)?;
    std::thread::Builder::new()
        .name("vm-wait".into())
        .spawn(move || {
            super::threads::confine(husk_seccomp::ThreadKind::VmWait);
            let (why, timeline) = vm.wait(None);
            record_vm_phases(&timeline);
            on_end(why);
        })
        .map_err(MonitorError::Io)?;
    Ok(stopper)
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
