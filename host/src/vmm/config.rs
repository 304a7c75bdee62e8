//! What a VM is made of: the [`VmConfig`] it is built from, and its [`Shape`], the part of the
//! configuration that a snapshot must match to be restored into it.
//!
//! A leaf of the VMM: the builder, the snapshot (`persist`, which records a VM's shape) and
//! the running VM read it, and it needs none of them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::devices;
use super::threads::SeccompMode;

/// How a VM is built.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The uncompressed guest kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel parameters.
    pub cmdline_extra: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Attach the serial console (kernel messages to the monitor's stdout).
    pub console: bool,
    /// How the threads' seccomp filters are applied.
    pub seccomp: SeccompMode,
    /// The vsock device: the host-side Unix socket (guest-initiated connections go to
    /// `<path>_<port>`), `None` for a VM without one.
    pub vsock: Option<PathBuf>,
    /// virtio-fs devices: (tag, host directory) each.
    pub shares: Vec<(String, PathBuf)>,
    /// virtio-net devices, in the order the guest enumerates them (at most [`MAX_NETS`],
    /// spare ones included).
    pub nets: Vec<NetConfig>,
    /// virtio-net devices without a tap after those of `nets`: the slots of a VM template
    /// that this VM does not use (their frames go nowhere).
    pub spare_nets: u8,
    /// `/dev/kvm`, opened by the caller (the monitor opens it before it confines itself);
    /// `None`: [`start`](super::start) opens it.
    pub kvm: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
}

/// One virtio-net device.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Its tap. [`start`](super::start) gives the device a duplicate of the fd; the tap lives until the
    /// device and every copy of this config are gone.
    pub tap: std::sync::Arc<devices::virtio::net::Tap>,
    /// The MAC address the guest sees.
    pub mac: [u8; 6],
    /// The MTU the device announces.
    pub mtu: u32,
}

/// Most virtio-net devices a VM has.
pub const MAX_NETS: usize = 8;

/// Most vCPUs a husk VM has (the kernel is built with NR_CPUS=8).
pub const MAX_VCPUS: u8 = 8;

/// What a VM is made of; a snapshot restores only into a VM of the same shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shape {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// The serial console is attached.
    pub console: bool,
    /// There is a vsock device.
    pub vsock: bool,
    /// virtio-fs devices.
    pub shares: u8,
    /// virtio-net devices.
    pub nets: u8,
}

impl Shape {
    /// The shape of the VM `config` describes.
    pub fn of(config: &VmConfig) -> Shape {
        Shape {
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
            console: config.console,
            vsock: config.vsock.is_some(),
            shares: u8::try_from(config.shares.len()).unwrap_or(u8::MAX),
            nets: u8::try_from(config.nets.len() + usize::from(config.spare_nets))
                .unwrap_or(u8::MAX),
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} vCPU(s), {} MiB, {} virtio-fs, {} virtio-net{}{}",
            self.vcpus,
            self.mem_mib,
            self.shares,
            self.nets,
            if self.vsock { ", vsock" } else { "" },
            if self.console { ", console" } else { "" },
        )
    }
}
