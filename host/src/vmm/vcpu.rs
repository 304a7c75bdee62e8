//! vCPU threads: each runs `KVM_RUN` in a loop and routes port I/O and MMIO exits to the
//! buses. A vCPU stops when the VM's stop flag is set; the VMM kicks it out of `KVM_RUN` with
//! [`kick_signal`], whose handler does nothing (the interrupted ioctl returns `EINTR`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::VmExit;
use super::devices::EventFdTrigger;
use super::devices::bus::Bus;

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (process-wide) no-op handler for [`kick_signal`]; without SA_RESTART, so a
/// blocked `KVM_RUN` returns `EINTR`.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Its index.
    pub id: u8,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Set when the VM stops.
    pub stop: Arc<AtomicBool>,
    /// Where a vCPU reports why the VM must end.
    pub exits: Sender<VmExit>,
    /// Written together with `exits`, so the event loop wakes up.
    pub exit_evt: EventFdTrigger,
    /// Whether to confine the thread with its seccomp filter before the first entry.
    pub seccomp: super::SeccompMode,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish()
    }
}

impl Vcpu {
    /// Runs the vCPU until the VM stops. Returns the time of the first `KVM_RUN`.
    pub fn run(mut self) -> Option<Instant> {
        if let Err(e) = super::apply_seccomp(self.seccomp, super::ThreadKind::Vcpu) {
            self.exit(VmExit::Error(format!("vCPU {}: {e}", self.id)));
            return None;
        }
        let mut first_entry = None;
        while !self.stop.load(Ordering::Acquire) {
            if first_entry.is_none() {
                first_entry = Some(Instant::now());
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    let msg = format!("vCPU {}: KVM_RUN failed: {e}", self.id);
                    self.exit(VmExit::Error(msg));
                    break;
                }
            };
            match exit {
                VcpuExit::IoIn(port, data) => {
                    self.pio.read(u64::from(port), data);
                }
                VcpuExit::IoOut(port, data) => {
                    self.pio.write(u64::from(port), data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.mmio.read(addr, data);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write(addr, data);
                }
                VcpuExit::Shutdown => {
                    // A triple fault, or the guest asked KVM to shut down.
                    self.exit(VmExit::Reset);
                    break;
                }
                VcpuExit::SystemEvent(kind, _) => {
                    let reset = kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET;
                    self.exit(if reset {
                        VmExit::Reset
                    } else {
                        VmExit::PowerOff
                    });
                    break;
                }
                VcpuExit::Hlt => {
                    // With the in-kernel irqchip KVM handles HLT itself; an HLT exit means the
                    // vCPU stopped for good (interrupts off).
                    self.exit(VmExit::Error(format!(
                        "vCPU {} halted with interrupts off",
                        self.id
                    )));
                    break;
                }
                VcpuExit::InternalError => {
                    self.exit(VmExit::Error(format!(
                        "vCPU {}: KVM internal error (an instruction KVM could not emulate?)",
                        self.id
                    )));
                    break;
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    self.exit(VmExit::Error(format!(
                        "vCPU {}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})",
                        self.id
                    )));
                    break;
                }
                VcpuExit::Intr => {}
                other => {
                    let msg = format!("vCPU {}: unexpected exit {other:?}", self.id);
                    self.exit(VmExit::Error(msg));
                    break;
                }
            }
        }
        first_entry
    }

    fn exit(&self, why: VmExit) {
        let _ = self.exits.send(why);
        let _ = vm_superio::Trigger::trigger(&self.exit_evt);
    }
}
