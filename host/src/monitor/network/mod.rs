//! The container's network: its network namespace, joined to the VM's virtio-net devices.
//!
//! Where the namespace comes from ([`Netns`]):
//!
//! - the engine's: podman (netavark) and containerd's CNI create a namespace, put one end of a
//!   veth pair in it with addresses and routes, and name it in the spec (`linux.namespaces`
//!   entry of type `network` with a `path`);
//! - the monitor's own: an entry *without* a path asks for a new namespace. The monitor's main
//!   thread unshares one first thing in `create` (before any thread exists, so every thread of
//!   the monitor is in it and `/proc/<monitor pid>/ns/net`, the state's `pid`'s, names it) and
//!   brings its `lo` up. The `prestart`/`createRuntime` hooks then run, in `husk create`
//!   (see `super::create_hooks` and [`crate::oci::hooks`]), in the host's namespaces: this
//!   is how Docker 20.10 fills it, its `libnetwork-setkey` hook having dockerd move a
//!   configured veth into `/proc/<pid>/ns/net`. Without such a
//!   hook (plain `husk run`) it stays empty. It dies with the monitor unless an engine
//!   bind-mounted it (dockerd does, and deletes it with the container);
//! - none: no network namespace entry; the VM has only `lo` and the monitor stays in the
//!   host's namespace.
//!
//! A VM cannot use a veth, so for the first two the monitor does what Kata Containers does by
//! default ("tcfilter" interworking):
//!
//! 1. in the namespace (entering the engine's on a short-lived thread, as `setns` changes
//!    only the calling thread; its own it is in already), open an rtnetlink socket (it stays
//!    bound to that namespace) and list its interfaces; every Ethernet interface except
//!    loopback and our own taps is taken;
//! 2. for each, read its MAC, MTU, addresses and main-table routes;
//! 3. create a tap `tap<N>_husk` beside it (same MTU, up), add an ingress qdisc to both and a
//!    u32 match-all filter with a `mirred egress redirect` action in each direction, so every
//!    frame the veth receives leaves through the tap (to the VM) and every frame the VM sends
//!    leaves through the veth;
//! 4. remove the addresses from the veth (the kernel drops the routes that used them), so the
//!    namespace's own stack no longer answers for the container's IP; the VM does;
//! 5. give the VM a virtio-net device on each tap with the veth's MAC and MTU, and tell
//!    husk-init (`ConfigureNetwork`, before `Create`) to configure the interface under the
//!    veth's name with its addresses and routes.
//!
//! What the monitor changed is written to `network.json` in the container's state directory
//! before anything is changed, so that it can be undone by whoever comes last: the monitor
//! when the VM ends, or `husk delete` when the monitor was killed. Undoing removes the taps
//! (closing the tap fd already does), the ingress qdiscs on the veths (their filters go with
//! them) and puts the addresses and routes back, so a namespace that outlives the container
//! is as the engine made it. A namespace that is gone, or whose interface is no longer the
//! one recorded, is left alone.
//!
//! A namespace with only loopback (or none at all): no virtio-net device; the VM has only
//! `lo`, which husk-init always brings up. The record of the monitor's own namespace is only
//! for the monitor's own undoing: once the monitor is gone its namespace is gone too, or
//! belongs to the engine that kept it (and deletes it with its veth), so `teardown` leaves it.
//!
//! Not handled: interfaces that are not Ethernet (ipvlan L3, wireguard, ...) are skipped
//! with a log line; two VMs in one namespace (a pod's containers as separate VMs) cannot
//! share the veth, so the second fails when it finds the first's tap.

mod error;
pub mod netlink;
mod netns;
mod record;

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use husk_proto::{IpCidr, NetInterface, NetRoute, NetworkConfig};

pub use self::error::NetworkError;
use self::netlink::{ARPHRD_ETHER, IFF_LOOPBACK, Link, Netlink, RTPROT_KERNEL, Route};
use self::netns::in_netns;
pub use self::netns::{Netns, Requested, requested};
use self::record::{InterfaceRecord, undo};
pub use self::record::{RECORD_FILE, Record, teardown};
use crate::vmm::NetConfig;
use crate::vmm::devices::virtio::net::Tap;

/// Suffix of the taps the monitor creates (`tap0_husk`, `tap1_husk`, ...).
const TAP_SUFFIX: &str = "_husk";

/// The container's network, set up.
#[derive(Debug)]
pub struct Network {
    nl: Netlink,
    record: Record,
    record_path: PathBuf,
    /// Undone by `husk delete` (from the record), not on drop: a monitor under `--monitor-uid`
    /// has no say over the namespace once confined.
    left_to_delete: bool,
    /// The virtio-net devices to give the VM.
    pub devices: Vec<NetConfig>,
    /// What husk-init configures.
    pub guest: NetworkConfig,
}

/// Whether interface `link` is one the VM takes over.
fn eligible(link: &Link) -> bool {
    link.flags & IFF_LOOPBACK == 0
        && link.link_type == ARPHRD_ETHER
        && link.mac.len() == 6
        && !link.name.ends_with(TAP_SUFFIX)
}

/// Takes over the interfaces of `netns` for the VM (see the module docs), recording what it
/// changes in `<state_dir>/network.json`; `None` without a namespace. On error, whatever was
/// changed is undone. The monitor's own namespace is the calling thread's.
pub fn setup(netns: &Netns, state_dir: &Path) -> Result<Option<Network>, NetworkError> {
    let record_path = state_dir.join(RECORD_FILE);
    let (path, own) = match netns {
        Netns::None => return Ok(None),
        Netns::Path(p) => (p.clone(), false),
        Netns::Own { path, .. } => (path.clone(), true),
    };
    let nl_err = |what: String| {
        let path = path.clone();
        move |source| NetworkError::Netlink { path, what, source }
    };
    let take = || {
        let nl = Netlink::open().map_err(nl_err("opening rtnetlink".into()))?;
        let links = nl.links().map_err(nl_err("listing interfaces".into()))?;
        if let Some(ours) = links.iter().find(|l| l.name.ends_with(TAP_SUFFIX)) {
            return Err(NetworkError::Busy {
                path: path.clone(),
                tap: ours.name.clone(),
            });
        }
        let mut taps = Vec::new();
        for (i, link) in links.iter().filter(|l| eligible(l)).enumerate() {
            if i >= crate::vmm::MAX_NETS {
                return Err(NetworkError::TooMany {
                    path: path.clone(),
                    count: links.iter().filter(|l| eligible(l)).count(),
                    max: crate::vmm::MAX_NETS,
                });
            }
            // Opened here: the tap is created in this thread's (the container's) namespace.
            let tap =
                Tap::open(&format!("tap{i}{TAP_SUFFIX}")).map_err(|source| NetworkError::Tap {
                    path: path.clone(),
                    source,
                })?;
            taps.push((link.clone(), tap));
        }
        for link in links
            .iter()
            .filter(|l| !eligible(l) && l.flags & IFF_LOOPBACK == 0)
        {
            eprintln!(
                "husk monitor: network interface {} (type {}) is not Ethernet; the VM does not get it",
                link.name, link.link_type
            );
        }
        Ok((nl, taps))
    };
    let (nl, taps) = if own { take()? } else { in_netns(&path, take)? };
    let mut network = Network {
        nl,
        record: Record {
            netns: path.clone(),
            own,
            interfaces: Vec::new(),
        },
        record_path,
        left_to_delete: false,
        devices: Vec::new(),
        guest: NetworkConfig::default(),
    };
    // On error `network` drops, which undoes what was done.
    network.plumb(taps)?;
    Ok(Some(network))
}

impl Network {
    fn netlink_error(&self, what: String) -> impl FnOnce(io::Error) -> NetworkError {
        let path = self.record.netns.clone();
        move |source| NetworkError::Netlink { path, what, source }
    }

    fn save_record(&self) -> Result<(), NetworkError> {
        let data = serde_json::to_vec_pretty(&self.record).map_err(io::Error::from);
        data.and_then(|d| std::fs::write(&self.record_path, d))
            .map_err(|source| NetworkError::Record {
                path: self.record_path.clone(),
                source,
            })
    }

    fn plumb(&mut self, taps: Vec<(Link, Tap)>) -> Result<(), NetworkError> {
        for (link, tap) in taps {
            let addresses = self
                .nl
                .addresses(link.index)
                .map_err(self.netlink_error(format!("reading the addresses of {}", link.name)))?;
            let routes = self
                .nl
                .routes(link.index)
                .map_err(self.netlink_error(format!("reading the routes of {}", link.name)))?;
            // Recorded before anything changes.
            self.record.interfaces.push(InterfaceRecord {
                name: link.name.clone(),
                index: link.index,
                tap: tap.name().to_owned(),
                addresses: addresses.clone(),
                routes: routes.clone(),
            });
            self.save_record()?;
            let tap_index = self
                .nl
                .links()
                .map_err(self.netlink_error("listing interfaces".into()))?
                .into_iter()
                .find(|l| l.name == tap.name())
                .map(|l| l.index)
                .ok_or_else(|| NetworkError::Netlink {
                    path: self.record.netns.clone(),
                    what: format!("finding the tap {}", tap.name()),
                    source: io::Error::from(io::ErrorKind::NotFound),
                })?;
            let tap_name = tap.name().to_owned();
            self.nl
                .set_up(tap_index, link.mtu)
                .map_err(self.netlink_error(format!("bringing up {tap_name}")))?;
            for (dev, name) in [(link.index, &link.name), (tap_index, &tap_name)] {
                self.nl
                    .add_ingress_qdisc(dev)
                    .map_err(self.netlink_error(format!("adding an ingress qdisc to {name}")))?;
            }
            self.nl
                .add_redirect(link.index, tap_index)
                .map_err(self.netlink_error(format!("redirecting {} to {tap_name}", link.name)))?;
            self.nl
                .add_redirect(tap_index, link.index)
                .map_err(self.netlink_error(format!("redirecting {tap_name} to {}", link.name)))?;
            for a in &addresses {
                self.nl
                    .delete_address(link.index, a)
                    .map_err(self.netlink_error(format!(
                        "removing {}/{} from {}",
                        a.addr, a.prefix_len, link.name
                    )))?;
            }
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&link.mac);
            self.devices.push(NetConfig {
                tap: Arc::new(tap),
                mac,
                mtu: link.mtu,
            });
            self.guest.interfaces.push(NetInterface {
                name: link.name.clone(),
                device_mac: mac,
                mac,
                mtu: link.mtu,
                addresses: addresses
                    .iter()
                    .filter(|a| !is_link_local(&a.addr))
                    .map(|a| IpCidr {
                        addr: a.addr,
                        prefix_len: a.prefix_len,
                    })
                    .collect(),
            });
            self.guest.routes.extend(guest_routes(&link.name, &routes));
        }
        // Routes through a gateway after the on-link ones they depend on.
        self.guest.routes.sort_by_key(|r| r.gateway.is_some());
        Ok(())
    }
}

impl Network {
    /// From now on the setup is undone by `husk delete`, from the record, not on drop.
    pub fn leave_to_delete(&mut self) {
        self.left_to_delete = true;
    }
}

impl Drop for Network {
    /// Undoes the setup (see the module docs); errors are logged.
    fn drop(&mut self) {
        if self.left_to_delete {
            return;
        }
        undo(&self.nl, &self.record);
        let _ = std::fs::remove_file(&self.record_path);
    }
}

/// The routes husk-init adds: the veth's, except those the guest kernel makes itself for
/// its addresses (`proto kernel`) and IPv6 link-local ones.
fn guest_routes(interface: &str, routes: &[Route]) -> Vec<NetRoute> {
    routes
        .iter()
        .filter(|r| r.protocol != RTPROT_KERNEL)
        .filter(|r| !r.destination.is_some_and(|d| is_link_local(&d.addr)))
        .map(|r| NetRoute {
            destination: r.destination.map(|d| IpCidr {
                addr: d.addr,
                prefix_len: d.prefix_len,
            }),
            gateway: r.gateway,
            interface: interface.to_owned(),
        })
        .collect()
}

fn is_link_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => v.is_link_local(),
        IpAddr::V6(v) => v.segments()[0] & 0xffc0 == 0xfe80,
    }
}

#[cfg(test)]
mod tests;

/// Against the real kernel: a namespace with a veth made the way an engine makes it (root and
/// iproute2's `ip` needed; skipped otherwise).
#[cfg(test)]
mod netns_tests;
