//! Saving a VM and building one from what was saved.
//!
//! Every part of a VM saves and restores itself next to its code: the x86 vCPU and VM state
//! (`arch::x86_64::{vcpu, vm}`), guest memory (`vstate::memory`), and, through the
//! [`Persist`](super::devices::persist::Persist) trait (`devices::persist`, the model is
//! Firecracker's trait of the same name), the virtio-mmio transport, each virtio device and the
//! legacy devices. Each part defines its saved state next to its code; [`VmState`] only gathers
//! the parts, and this module writes it to a file and reads it back. So the parts do not depend
//! on this module; it depends on them.
//!
//! # The files
//!
//! A snapshot is a directory with two files:
//! - `memory`: guest RAM, region after region, zero pages as holes (`vstate::memory::save`).
//!   A restored VM maps it privately, so it is never written.
//! - `state`: a header and the [`VmState`] in bincode. The header is the magic `HUSKSNAP`,
//!   the format version [`SNAPSHOT_VERSION`] (little-endian u32), the payload's length (u64)
//!   and its SHA-256. A file with another magic or version, a different length or checksum, or
//!   a payload that does not decode is refused before anything is built from it. The state
//!   records the memory file's identity (inode, size, modification and change times) when
//!   it was written; a memory file that was changed since (any write, truncation, `chmod` or
//!   rename changes its ctime) is refused.
//!
//! # Versions
//!
//! One version for the whole format, as Firecracker does since it dropped per-structure
//! versions: any change to a saved structure bumps [`SNAPSHOT_VERSION`], and a snapshot of
//! another version is refused (husk then boots cold and makes a new one; snapshots are a cache,
//! never the only copy of anything).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::arch::x86_64::vcpu::VcpuState;
use super::arch::x86_64::vm::VmArchState;
use super::config::Shape;
use super::devices::legacy::i8042::I8042State;
use super::devices::legacy::serial::SerialState;
use super::devices::virtio::fs::FsState;
use super::devices::virtio::mmio::persist::MmioState;
use super::devices::virtio::net::NetState;
use super::devices::virtio::vsock::VsockState;

/// The snapshot format version (see the module docs).
pub const SNAPSHOT_VERSION: u32 = 1;

/// The state file's first bytes.
const MAGIC: &[u8; 8] = b"HUSKSNAP";

/// Header: magic, version, payload length, SHA-256.
const HEADER_LEN: usize = 8 + 4 + 8 + 32;

/// Largest state payload read: a VM of 8 vCPUs and 10 devices needs well under 1 MiB.
pub const MAX_STATE_LEN: usize = 4 << 20;

/// The file names in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// See [`STATE_FILE`].
pub const MEMORY_FILE: &str = "memory";

/// Which file the saved memory is, as `fstat` saw it right after it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, in nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Last status change (which no user can set), in nanoseconds since the epoch.
    pub ctime_ns: i128,
}

impl FileIdentity {
    /// The identity of the open file `file`.
    pub fn of(file: &File) -> std::io::Result<Self> {
        let m = file.metadata()?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// One virtio device: its transport's registers and the device's own state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VirtioState {
    /// The virtio-mmio registers and queues.
    pub transport: MmioState,
    /// The device.
    pub device: VirtioDeviceState,
}

/// The device behind a transport.
#[derive(Debug, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// virtio-vsock.
    Vsock(VsockState),
    /// virtio-fs.
    Fs(FsState),
    /// virtio-net.
    Net(NetState),
}

/// Every device of the VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct DevicesState {
    /// The i8042.
    pub i8042: I8042State,
    /// The serial console, when attached.
    pub serial: Option<SerialState>,
    /// The virtio devices, in MMIO window order.
    pub virtio: Vec<VirtioState>,
}

/// A whole VM, as saved.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// What the VM is made of.
    pub shape: Shape,
    /// The memory file, when it was written.
    pub memory: FileIdentity,
    /// The irqchip, PIT and clock.
    pub arch: VmArchState,
    /// Every vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// Every device.
    pub devices: DevicesState,
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing a snapshot file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not a husk snapshot of this version, or is damaged.
    #[error("the snapshot state is not usable: {0}")]
    Format(String),
    /// The memory file is not the one the state was saved with.
    #[error("the snapshot's memory file changed after it was saved")]
    MemoryChanged,
    /// A snapshot of one shape cannot be restored into a VM of another.
    #[error("the snapshot is of a VM with {saved}; this VM has {wanted}")]
    Shape {
        /// The snapshot's shape.
        saved: Shape,
        /// The VM's.
        wanted: Shape,
    },
    /// Saving the VM failed (a vCPU, the irqchip, a device, the memory).
    #[error("saving the VM: {0}")]
    Save(String),
    /// KVM or a device refused the saved state.
    #[error("restoring the VM: {0}")]
    Restore(String),
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<MAX_STATE_LEN>()
}

/// The state file's bytes for `state`.
pub fn encode_state(state: &VmState) -> Result<Vec<u8>, SnapshotError> {
    let payload = bincode::serde::encode_to_vec(state, bincode_config())
        .map_err(|e| SnapshotError::Format(format!("encoding the state: {e}")))?;
    Ok(with_header(&payload))
}

/// `payload` behind the state file's header (this version, its length and checksum).
pub(crate) fn with_header(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(payload);
    out
}

/// Decodes a state file's bytes, checking everything the header promises. Never panics, and
/// allocates at most about [`MAX_STATE_LEN`], whatever `bytes` hold: the file is read as root
/// and is a fuzz target.
pub fn decode_state(bytes: &[u8]) -> Result<VmState, SnapshotError> {
    let bad = |why: &str| SnapshotError::Format(why.to_owned());
    let header = bytes
        .get(..HEADER_LEN)
        .ok_or_else(|| bad("shorter than its header"))?;
    if &header[..8] != MAGIC {
        return Err(bad("no HUSKSNAP magic"));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Format(format!(
            "format version {version}, this husk reads {SNAPSHOT_VERSION}"
        )));
    }
    let len = u64::from_le_bytes(header[12..20].try_into().unwrap_or_default());
    let payload = &bytes[HEADER_LEN..];
    if len > MAX_STATE_LEN as u64 || payload.len() as u64 != len {
        return Err(SnapshotError::Format(format!(
            "the header promises {len} bytes of state, the file holds {}",
            payload.len()
        )));
    }
    if Sha256::digest(payload).as_slice() != &header[20..52] {
        return Err(bad("the checksum does not match (damaged or truncated)"));
    }
    let (state, used): (VmState, usize) =
        bincode::serde::decode_from_slice(payload, bincode_config())
            .map_err(|e| SnapshotError::Format(format!("decoding the state: {e}")))?;
    if used != payload.len() {
        return Err(bad("trailing bytes after the state"));
    }
    Ok(state)
}

/// A snapshot opened for restoring: its state, and its memory file (read-only).
#[derive(Debug)]
pub struct Snapshot {
    /// The VM's state.
    pub state: VmState,
    /// The guest memory file.
    pub memory: File,
}

impl Snapshot {
    /// Opens the snapshot in `dir`: reads and checks the state, opens the memory file and
    /// checks it is the one the state was saved with.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let io = |what, path: &Path| {
            let path = path.display().to_string();
            move |source| SnapshotError::Io { what, path, source }
        };
        let state_path = dir.join(STATE_FILE);
        let mut bytes = Vec::new();
        File::open(&state_path)
            .map_err(io("opening", &state_path))?
            .take((MAX_STATE_LEN + HEADER_LEN + 1) as u64)
            .read_to_end(&mut bytes)
            .map_err(io("reading", &state_path))?;
        let state = decode_state(&bytes)?;
        let memory_path = dir.join(MEMORY_FILE);
        let memory = File::open(&memory_path).map_err(io("opening", &memory_path))?;
        let identity = FileIdentity::of(&memory).map_err(io("reading", &memory_path))?;
        if identity != state.memory || identity.size != state.shape.mem_mib << 20 {
            return Err(SnapshotError::MemoryChanged);
        }
        Ok(Snapshot { state, memory })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `payload` behind a header of format `version`.
    fn with_header(version: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = super::with_header(payload);
        out[8..12].copy_from_slice(&version.to_le_bytes());
        out
    }

    #[test]
    fn headers_are_checked_before_the_payload() {
        let cases: [(Vec<u8>, &str); 5] = [
            (vec![1, 2, 3], "shorter than its header"),
            (vec![0; 80], "magic"),
            (with_header(SNAPSHOT_VERSION + 1, b"x"), "format version"),
            (
                {
                    let mut b = with_header(SNAPSHOT_VERSION, b"abcd");
                    b.truncate(b.len() - 1);
                    b
                },
                "promises 4 bytes",
            ),
            (
                {
                    let mut b = with_header(SNAPSHOT_VERSION, b"abcd");
                    *b.last_mut().unwrap() ^= 1;
                    b
                },
                "checksum",
            ),
        ];
        for (bytes, want) in cases {
            let err = decode_state(&bytes).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should say {want:?}");
        }
        let err = decode_state(&with_header(SNAPSHOT_VERSION, &[0xff; 64])).unwrap_err();
        assert!(err.to_string().contains("decoding"), "{err}");
    }
}
