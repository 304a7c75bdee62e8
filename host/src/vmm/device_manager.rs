//! The devices of one VM, on their buses (Firecracker's `device_manager`): made new for a boot
//! or restored from a snapshot, in MMIO window order, and saved into a snapshot.
//!
//! The builder attaches them, the running VM keeps them (to save them) and hands them to its
//! threads; this module uses neither.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;

use super::arch::layout;
use super::config::VmConfig;
use super::devices::EventFdTrigger;
use super::devices::bus::{Bus, Overlap};
use super::devices::legacy::i8042::I8042;
use super::devices::legacy::marker::{MarkerLog, MarkerPort};
use super::devices::legacy::serial::SerialDevice;
use super::devices::persist::Persist;
use super::devices::virtio::SharedDevice;
use super::devices::virtio::fs::Fs;
use super::devices::virtio::mmio::{MMIO_WINDOW_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET};
use super::devices::virtio::net::Net;
use super::devices::virtio::vsock::Vsock;
use super::error::{VmError, kvm_call, mismatch, os};
use super::persist::{DevicesState, SnapshotError, VirtioDeviceState, VirtioState};
use super::threads::lock;
use super::vstate::memory;

/// A virtio device of the VM, as the snapshot code needs to reach it.
pub(super) enum VirtioHandle {
    Vsock(Arc<Mutex<Vsock>>),
    Fs(Arc<Mutex<Fs>>),
    Net(Arc<Mutex<Net>>),
}

/// One virtio-mmio window: the transport and the device behind it.
pub(super) struct VirtioSlot {
    pub transport: Arc<Mutex<MmioTransport>>,
    pub device: VirtioHandle,
    /// The window's base address.
    pub base: u64,
    pub gsi: u32,
}

/// The devices of one VM, on their buses, with the events they raise for the event loop.
pub(super) struct Devices {
    pub pio: Bus,
    pub mmio: Bus,
    pub i8042: Arc<Mutex<I8042>>,
    pub serial: Option<Arc<Mutex<SerialDevice>>>,
    /// The virtio devices in window order: vsock, the shares, the NICs.
    pub virtio: Vec<VirtioSlot>,
    pub markers: Arc<Mutex<MarkerLog>>,
    /// Written by the vCPUs' exit reports and by a host stop request.
    pub stop_evt: EventFdTrigger,
    /// Written by the i8042 when the guest resets.
    pub reset_evt: EventFdTrigger,
    /// Written by the marker port on husk-init's `PowerOff`.
    pub power_off_evt: EventFdTrigger,
}

/// How [`Devices`] come to be: made new for a boot, or restored from a snapshot.
#[derive(Clone, Copy)]
pub(super) enum Origin<'a> {
    New,
    Saved(&'a DevicesState),
}

impl Devices {
    /// Creates the devices `config` asks for (or restores them in their saved state) and puts
    /// them on the buses: the marker port and the i8042 always, the serial console on
    /// request, then the virtio devices (vsock, the virtio-fs shares, the NICs, the spare NICs)
    /// in consecutive MMIO windows and GSIs, in that order.
    pub(super) fn attach(
        vm: &VmFd,
        mem: &memory::GuestMem,
        config: &VmConfig,
        origin: Origin<'_>,
    ) -> Result<Self, VmError> {
        let stop_evt = EventFdTrigger::new().map_err(os("eventfd"))?;
        let reset_evt = EventFdTrigger::new().map_err(os("eventfd"))?;
        let power_off_evt = EventFdTrigger::new().map_err(os("eventfd"))?;
        let reset = reset_evt.try_clone().map_err(os("eventfd"))?;
        let i8042 = match origin {
            Origin::New => I8042::new(reset),
            Origin::Saved(saved) => match I8042::restore(reset, &saved.i8042) {
                Ok(dev) => dev,
                Err(never) => match never {},
            },
        };
        let mut devices = Devices {
            pio: Bus::new(),
            mmio: Bus::new(),
            i8042: Arc::new(Mutex::new(i8042)),
            serial: None,
            virtio: Vec::new(),
            markers: Arc::new(Mutex::new(MarkerLog::default())),
            stop_evt,
            reset_evt,
            power_off_evt,
        };
        devices.attach_legacy(vm, config.console, origin)?;
        let mut saved = match origin {
            Origin::New => None,
            Origin::Saved(s) => Some(s.virtio.iter()),
        };
        let mut next_saved = |what: &str| -> Result<Option<&VirtioState>, VmError> {
            match &mut saved {
                None => Ok(None),
                Some(it) => it.next().map(Some).ok_or_else(|| {
                    VmError::Snapshot(SnapshotError::Restore(format!("no saved state for {what}")))
                }),
            }
        };
        if let Some(uds) = &config.vsock {
            let what = format!("vsock at {}", uds.display());
            let saved = next_saved(&what)?;
            let device = match saved.map(|s| &s.device) {
                None => Vsock::new(u64::from(husk_proto::GUEST_CID), uds),
                Some(VirtioDeviceState::Vsock(s)) => Vsock::restore(uds.clone(), s),
                Some(_) => return Err(mismatch(&what)),
            }
            .map_err(|e| VmError::Devices(format!("{what}: {e}")))?;
            let device = Arc::new(Mutex::new(device));
            let handle = VirtioHandle::Vsock(device.clone());
            devices.attach_virtio(vm, mem, device, handle, saved)?;
        }
        for (tag, dir) in &config.shares {
            let what = format!("virtio-fs {tag:?}");
            let saved = next_saved(&what)?;
            let device = match saved.map(|s| &s.device) {
                None => Fs::new(tag, dir),
                Some(VirtioDeviceState::Fs(s)) if s.tag == *tag => Fs::restore(dir.clone(), s),
                Some(_) => return Err(mismatch(&what)),
            }
            .map_err(|e| VmError::Devices(format!("{what}: {e}")))?;
            let device = Arc::new(Mutex::new(device));
            let handle = VirtioHandle::Fs(device.clone());
            devices.attach_virtio(vm, mem, device, handle, saved)?;
        }
        let spares = (0..config.spare_nets).map(|_| None);
        for (slot, net) in (0u8..).zip(config.nets.iter().map(Some).chain(spares)) {
            let what = match net {
                Some(net) => format!("virtio-net on {}", net.tap.name()),
                None => "a spare virtio-net".to_owned(),
            };
            let err = |e: &dyn std::fmt::Display| VmError::Devices(format!("{what}: {e}"));
            let tap = match net {
                Some(net) => Some(net.tap.try_clone().map_err(|e| err(&e))?),
                None => None,
            };
            let (mac, mtu) = net.map_or((spare_net_mac(slot), SPARE_NET_MTU), |n| (n.mac, n.mtu));
            let saved = next_saved(&what)?;
            let device = match saved.map(|s| &s.device) {
                None => match tap {
                    Some(tap) => Net::new(tap, mac, mtu),
                    None => Net::unattached(mac, mtu),
                },
                Some(VirtioDeviceState::Net(s)) => Net::restore((tap, mac, mtu), s),
                Some(_) => return Err(mismatch(&what)),
            }
            .map_err(|e| err(&e))?;
            let device = Arc::new(Mutex::new(device));
            let handle = VirtioHandle::Net(device.clone());
            devices.attach_virtio(vm, mem, device, handle, saved)?;
        }
        if saved.is_some_and(|mut rest| rest.next().is_some()) {
            return Err(mismatch("the virtio devices (more were saved)"));
        }
        Ok(devices)
    }

    /// The port-I/O devices.
    fn attach_legacy(
        &mut self,
        vm: &VmFd,
        console: bool,
        origin: Origin<'_>,
    ) -> Result<(), VmError> {
        let dev_err = |e: Overlap| VmError::Devices(e.to_string());
        let power_off = self.power_off_evt.try_clone().map_err(os("eventfd"))?;
        let marker = MarkerPort::new(self.markers.clone(), power_off);
        self.pio
            .insert(
                u64::from(husk_proto::marker::MARKER_PORT),
                1,
                Arc::new(Mutex::new(marker)),
            )
            .map_err(dev_err)?;
        self.pio
            .insert(u64::from(layout::I8042_PORT), 5, self.i8042.clone())
            .map_err(dev_err)?;
        if console {
            let irq = EventFdTrigger::new().map_err(os("eventfd"))?;
            vm.register_irqfd(&irq.0, layout::SERIAL_IRQ)
                .map_err(kvm_call("KVM_IRQFD (serial)"))?;
            let out: Box<dyn std::io::Write + Send> = Box::new(std::io::stdout());
            let serial = match origin {
                Origin::Saved(DevicesState {
                    serial: Some(saved),
                    ..
                }) => SerialDevice::restore((irq, out), saved)
                    .map_err(|e| VmError::Snapshot(SnapshotError::Restore(e)))?,
                Origin::Saved(_) => return Err(mismatch("the serial console")),
                Origin::New => SerialDevice::new(irq, out),
            };
            let serial = Arc::new(Mutex::new(serial));
            self.pio
                .insert(u64::from(layout::SERIAL_PORT), 8, serial.clone())
                .map_err(dev_err)?;
            self.serial = Some(serial);
        }
        Ok(())
    }

    /// Puts a virtio device on the MMIO bus in the next window, with the next GSI, behind a
    /// new transport or one restored from `saved`: its queue notifications become ioeventfds
    /// and its interrupt an irqfd, so neither costs a trip through the VMM's threads.
    fn attach_virtio(
        &mut self,
        vm: &VmFd,
        mem: &memory::GuestMem,
        device: SharedDevice,
        handle: VirtioHandle,
        saved: Option<&VirtioState>,
    ) -> Result<(), VmError> {
        let index = u32::try_from(self.virtio.len()).unwrap_or(u32::MAX);
        let base = layout::VIRTIO_MMIO_BASE + u64::from(index) * MMIO_WINDOW_SIZE;
        let gsi = layout::VIRTIO_IRQ_BASE + index;
        let what = || format!("virtio-mmio transport at {base:#x}");
        let transport = match saved {
            None => MmioTransport::new(mem.clone(), device)
                .map_err(|e| VmError::Devices(format!("{}: {e}", what())))?,
            Some(saved) => MmioTransport::restore((mem.clone(), device), &saved.transport)
                .map_err(|e| {
                    VmError::Snapshot(SnapshotError::Restore(format!("{}: {e}", what())))
                })?,
        };
        vm.register_irqfd(transport.interrupt().irq_evt(), gsi)
            .map_err(kvm_call("KVM_IRQFD (virtio)"))?;
        for (i, evt) in (0u32..).zip(transport.queue_evts()) {
            vm.register_ioevent(
                evt,
                &kvm_ioctls::IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                i,
            )
            .map_err(kvm_call("KVM_IOEVENTFD (virtio queue notify)"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(base, MMIO_WINDOW_SIZE, transport.clone())
            .map_err(|e| VmError::Devices(e.to_string()))?;
        self.virtio.push(VirtioSlot {
            transport,
            device: handle,
            base,
            gsi,
        });
        Ok(())
    }

    /// The `virtio_mmio.device=` entries for the kernel command line: (base, size, GSI).
    pub(super) fn virtio_ranges(&self) -> Vec<(u64, u64, u32)> {
        self.virtio
            .iter()
            .map(|slot| (slot.base, MMIO_WINDOW_SIZE, slot.gsi))
            .collect()
    }

    /// Every device's state. The vCPUs and the event loop must be paused.
    pub fn save(&self) -> DevicesState {
        DevicesState {
            i8042: lock(&self.i8042).save(),
            serial: self.serial.as_ref().map(|s| lock(s).save()),
            virtio: self
                .virtio
                .iter()
                .map(|slot| VirtioState {
                    transport: lock(&slot.transport).save(),
                    device: match &slot.device {
                        VirtioHandle::Vsock(d) => VirtioDeviceState::Vsock(lock(d).save()),
                        VirtioHandle::Fs(d) => VirtioDeviceState::Fs(lock(d).save()),
                        VirtioHandle::Net(d) => VirtioDeviceState::Net(lock(d).save()),
                    },
                })
                .collect(),
        }
    }
}

/// The MAC of the spare NIC in slot `slot` (its index among the VM's NICs), until a
/// container's configuration gives it its own: locally administered, unicast, one per slot.
pub fn spare_net_mac(slot: u8) -> [u8; 6] {
    [0x02, 0x68, 0x75, 0x73, 0x6b, slot]
}

/// The MTU a spare NIC announces: the largest, so that whatever MTU a container's network
/// has later, the guest can set it (the driver takes the announced MTU as its maximum).
pub const SPARE_NET_MTU: u32 = 65535;
