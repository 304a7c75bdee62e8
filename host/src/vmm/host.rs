//! What kind of KVM host this is, and the guest kernel command line that follows from it.
//!
//! The parameters every husk guest gets live in `kernel-config/cmdline`; those only a kvm_pvm
//! host needs (nested, page-table based KVM whose emulator cannot run some instructions in
//! guest kernel mode) in `kernel-config/cmdline-kvm-pvm`. `kernel-config/README.md` says why
//! each is there. They are compiled in so the binary and the image agree.

use std::path::Path;

/// Parameters for every guest.
const BASE_CMDLINE: &str = include_str!("../../../kernel-config/cmdline");
/// Parameters only for kvm_pvm hosts.
const KVM_PVM_CMDLINE: &str = include_str!("../../../kernel-config/cmdline-kvm-pvm");

/// The host's KVM flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostProfile {
    /// `/dev/kvm` is provided by kvm_pvm: CPUID masks and compatibility parameters apply.
    pub kvm_pvm: bool,
}

impl HostProfile {
    /// Detects the host: kvm_pvm exposes itself as the `kvm_pvm` module in sysfs. Looked at
    /// once per process: the monitor detects it before it confines itself to a root without
    /// `/sys` (see `monitor::jail`), and the VM it starts afterwards uses that answer.
    pub fn detect() -> HostProfile {
        static PROFILE: std::sync::OnceLock<HostProfile> = std::sync::OnceLock::new();
        *PROFILE.get_or_init(|| HostProfile {
            kvm_pvm: Path::new("/sys/module/kvm_pvm").exists(),
        })
    }
}

/// What goes on the guest kernel command line.
#[derive(Debug, Clone, Default)]
pub struct CmdlineOptions {
    /// Kernel console on the 16550 (`console=ttyS0`); otherwise no console at all.
    pub console: bool,
    /// `virtio_mmio.device=` entries: (base, size, irq).
    pub virtio_devices: Vec<(u64, u64, u32)>,
    /// Extra parameters from the user, appended last (so they win).
    pub extra: String,
}

/// The full command line for this host.
pub fn cmdline(profile: HostProfile, opts: &CmdlineOptions) -> String {
    let mut parts: Vec<String> = BASE_CMDLINE.split_whitespace().map(String::from).collect();
    if profile.kvm_pvm {
        parts.extend(KVM_PVM_CMDLINE.split_whitespace().map(String::from));
    }
    if opts.console {
        parts.push("console=ttyS0".into());
    } else {
        // No console device: keep printk from formatting for nobody.
        parts.push("quiet".into());
    }
    for (base, size, irq) in &opts.virtio_devices {
        parts.push(format!(
            "virtio_mmio.device={}K@{base:#x}:{irq}",
            size / 1024
        ));
    }
    parts.extend(opts.extra.split_whitespace().map(String::from));
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_pvm_parameters_only_on_kvm_pvm() {
        let opts = CmdlineOptions {
            console: true,
            virtio_devices: vec![(0xd000_0000, 0x1000, 5)],
            extra: "foo=bar".into(),
        };
        let real = cmdline(HostProfile { kvm_pvm: false }, &opts);
        let pvm = cmdline(HostProfile { kvm_pvm: true }, &opts);
        assert!(!real.contains("noxsave"), "{real}");
        assert!(
            pvm.contains("noxsave") && pvm.contains("clearcpuid="),
            "{pvm}"
        );
        for c in [&real, &pvm] {
            assert!(c.contains("reboot=k"));
            assert!(c.contains("console=ttyS0"));
            assert!(c.contains("virtio_mmio.device=4K@0xd0000000:5"), "{c}");
            assert!(c.ends_with("foo=bar"));
        }
    }
}
