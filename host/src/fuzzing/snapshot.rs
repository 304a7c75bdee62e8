//! The `snapshot_state` target: a VM template's state file, which `husk create` reads as root
//! before it restores a VM from it. The input's first byte picks the form: even, the rest is a
//! payload that the harness puts behind a valid header (so that the decoder behind the
//! checksum is reached); odd, the rest is the whole file as it would be on disk. A state that
//! decodes must encode to a file that decodes and encodes back to the same bytes, and each of
//! its virtio transports is restored onto a real device of its kind over guest memory:
//! everything the saved registers and queues claim is checked there, as a guest's register
//! writes would be.

use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::scratch::ScratchDir;
use crate::vmm::arch::x86_64::vcpu::VcpuState;
use crate::vmm::arch::x86_64::vm::VmArchState;
use crate::vmm::config::Shape;
use crate::vmm::devices::legacy::i8042::I8042State;
use crate::vmm::devices::persist::Persist;
use crate::vmm::devices::virtio::SharedDevice;
use crate::vmm::devices::virtio::fs::{Fs, FsState};
use crate::vmm::devices::virtio::mmio::MmioTransport;
use crate::vmm::devices::virtio::mmio::persist::{MmioState, QueueRegs};
use crate::vmm::devices::virtio::net::{Net, NetState};
use crate::vmm::devices::virtio::vsock::{Vsock, VsockState};
use crate::vmm::persist::{
    DevicesState, FileIdentity, VirtioDeviceState, VirtioState, VmState, decode_state,
    encode_state, with_header,
};

pub(super) fn run(data: &[u8]) {
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    let file = if form & 1 == 0 {
        with_header(rest)
    } else {
        rest.to_vec()
    };
    let state = match decode_state(&file) {
        Ok(state) => state,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    // The decoder takes some encodings the encoder never writes (bincode's variable-length
    // integers in a longer form than needed): what it decodes must encode to a canonical file
    // that decodes and encodes back to itself.
    let again = encode_state(&state).expect("a decoded state encodes");
    let canonical = decode_state(&again).expect("an encoded state decodes");
    assert_eq!(
        encode_state(&canonical).expect("a decoded state encodes"),
        again,
        "the state does not encode back to its bytes"
    );
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("guest memory");
    let scratch = ScratchDir::new("snapshot");
    for (i, saved) in state.devices.virtio.iter().enumerate() {
        let device: SharedDevice = match &saved.device {
            VirtioDeviceState::Vsock(s) => {
                match Vsock::restore(scratch.0.join(format!("v{i}.sock")), s) {
                    Ok(d) => Arc::new(Mutex::new(d)),
                    Err(_) => continue,
                }
            }
            VirtioDeviceState::Fs(s) => match Fs::restore(scratch.0.clone(), s) {
                Ok(d) => Arc::new(Mutex::new(d)),
                Err(_) => continue,
            },
            VirtioDeviceState::Net(s) => match Net::restore((None, s.mac, u32::from(s.mtu)), s) {
                Ok(d) => Arc::new(Mutex::new(d)),
                Err(_) => continue,
            },
        };
        if let Err(e) = MmioTransport::restore((mem.clone(), device), &saved.transport) {
            assert!(!e.to_string().is_empty());
        }
    }
}

/// A running transport's registers with `n` queues of 256 entries laid out in the first MiBs.
fn running(device_type: u32, n: usize, features: u64) -> MmioState {
    MmioState {
        device_type,
        status: 0xf,
        device_features_sel: 1,
        driver_features_sel: 1,
        driver_features: features,
        queue_sel: 0,
        interrupt_status: 1,
        queues: (0..n)
            .map(|i| {
                let base = 0x10_0000 * (i as u64 + 1);
                QueueRegs {
                    size: 256,
                    ready: true,
                    desc_table: base,
                    avail_ring: base + 0x1000,
                    used_ring: base + 0x2000,
                    next_avail: 7,
                    next_used: 7,
                    event_idx: false,
                }
            })
            .collect(),
    }
}

/// A state of the shape a template has (vsock, one share, one NIC slot), as `husk template
/// build` saves it, with the KVM structures at their defaults.
fn template_state() -> VmState {
    const VERSION_1: u64 = 1 << 32;
    VmState {
        shape: Shape {
            vcpus: 1,
            mem_mib: 256,
            console: false,
            vsock: true,
            shares: 1,
            nets: 1,
        },
        memory: FileIdentity {
            dev: 2049,
            ino: 1234,
            size: 256 << 20,
            mtime_ns: 1_796_000_000_000_000_000,
            ctime_ns: 1_796_000_000_000_000_000,
        },
        arch: VmArchState::default(),
        vcpus: vec![VcpuState::default()],
        devices: DevicesState {
            i8042: I8042State {},
            serial: None,
            virtio: vec![
                VirtioState {
                    transport: running(19, 3, VERSION_1),
                    device: VirtioDeviceState::Vsock(VsockState { guest_cid: 3 }),
                },
                VirtioState {
                    transport: running(26, 2, VERSION_1),
                    device: VirtioDeviceState::Fs(FsState {
                        tag: husk_proto::SHARE_TAG.into(),
                        mounted: false,
                    }),
                },
                VirtioState {
                    transport: running(1, 2, VERSION_1 | 1 << 5),
                    device: VirtioDeviceState::Net(NetState {
                        mac: [2, 0x68, 0x75, 0x73, 0x6b, 0],
                        mtu: 65535,
                    }),
                },
            ],
        },
    }
}

pub(super) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let file = encode_state(&template_state()).expect("the seed state encodes");
    let payload = file[52..].to_vec();
    let mut mounted = template_state();
    if let VirtioDeviceState::Fs(fs) = &mut mounted.devices.virtio[1].device {
        fs.mounted = true;
    }
    let mut outside = template_state();
    outside.devices.virtio[0].transport.queues[1].used_ring = 1 << 40;
    let encoded = |s: &VmState| encode_state(s).expect("encodes")[52..].to_vec();
    vec![
        ("template_payload", [vec![0], payload].concat()),
        ("template_file", [vec![1], file].concat()),
        ("mounted_share", [vec![0], encoded(&mounted)].concat()),
        (
            "queue_outside_memory",
            [vec![0], encoded(&outside)].concat(),
        ),
    ]
}
