//! What a template is made for ([`TemplateShape`]: the VM's size) and the fixed device set
//! every template has ([`NET_SLOTS`]; see the module docs of `template`). A leaf that the key,
//! the cache's descriptions and the build all use.

use serde::{Deserialize, Serialize};

/// virtio-net slots every template has.
pub const NET_SLOTS: u8 = 1;

/// What a template is made for: the VM's size. The device set is fixed (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateShape {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
}
