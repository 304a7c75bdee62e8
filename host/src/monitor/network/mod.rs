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
//!   brings its `lo` up. The `prestart`/`createRuntime` hooks then run (see
//!   [`crate::oci::hooks`]; they are `setns`ed back into the host's namespace, which
//!   [`Netns::host`] keeps open): this is how Docker 20.10 fills it, its `libnetwork-setkey`
//!   hook having dockerd move a configured veth into `/proc/<pid>/ns/net`. Without such a
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

pub mod netlink;

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use husk_proto::{IpCidr, NetInterface, NetRoute, NetworkConfig};

use self::netlink::{ARPHRD_ETHER, Address, IFF_LOOPBACK, Link, Netlink, RTPROT_KERNEL, Route};
use crate::vmm::NetConfig;
use crate::vmm::devices::virtio::net::Tap;

/// The file in the state directory that records what the monitor changed.
pub const RECORD_FILE: &str = "network.json";

/// Suffix of the taps the monitor creates (`tap0_husk`, `tap1_husk`, ...).
const TAP_SUFFIX: &str = "_husk";

/// Why the network could not be set up or torn down.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// cannot open the network namespace {path}
    #[error("cannot open the network namespace {path}")]
    OpenNamespace {
        /// The spec's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// cannot enter the network namespace {path}
    #[error("cannot enter the network namespace {path}")]
    Enter {
        /// The spec's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// in the network namespace {path}: {what}
    #[error("in the network namespace {path}: {what}")]
    Netlink {
        /// The spec's path.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// the network namespace {path} already has a husk tap ({tap}): another VM uses it
    #[error("the network namespace {path} already has a husk tap ({tap}): another VM uses it")]
    Busy {
        /// The spec's path.
        path: PathBuf,
        /// The tap found.
        tap: String,
    },
    /// in the network namespace {path}: creating the tap
    #[error("in the network namespace {path}: creating the tap")]
    Tap {
        /// The spec's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::vmm::devices::virtio::net::TapError,
    },
    /// the network namespace {path} has {count} interfaces; a VM takes at most {max}
    #[error("the network namespace {path} has {count} interfaces; a VM takes at most {max}")]
    TooMany {
        /// The spec's path.
        path: PathBuf,
        /// Interfaces found.
        count: usize,
        /// The VM's limit.
        max: usize,
    },
    /// cannot write or read the network record {path}
    #[error("cannot write or read the network record {path}")]
    Record {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// the thread that entered the network namespace died
    #[error("the thread that entered the network namespace died")]
    Thread,
    /// cannot create the container's network namespace
    #[error("cannot create the container's network namespace")]
    Unshare {
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// What the monitor changed in a namespace: enough to undo it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// The namespace's path: the spec's, or `/proc/<monitor pid>/ns/net` for the monitor's own.
    pub netns: PathBuf,
    /// Whether it is the monitor's own namespace (nothing to undo once the monitor is gone).
    #[serde(default)]
    pub own: bool,
    /// One entry per interface taken.
    pub interfaces: Vec<InterfaceRecord>,
}

/// One interface taken from the namespace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InterfaceRecord {
    /// The engine's interface (a veth).
    pub name: String,
    /// Its index.
    pub index: u32,
    /// The tap the monitor created for it.
    pub tap: String,
    /// The addresses it had.
    pub addresses: Vec<Address>,
    /// Its main-table routes, as they were.
    pub routes: Vec<Route>,
}

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

/// The network namespace the spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    /// No `network` entry in `linux.namespaces`: the host's (the VM has only `lo`).
    None,
    /// An entry with a `path`: the engine's namespace.
    Path(PathBuf),
    /// An entry without a path: a new, empty one.
    New,
}

/// What the spec asks for.
pub fn requested(spec: &oci_spec::runtime::Spec) -> Requested {
    let entry = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|n| {
            n.iter()
                .find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        });
    match entry {
        None => Requested::None,
        Some(ns) => ns.path().clone().map_or(Requested::New, Requested::Path),
    }
}

/// The container's network namespace (see the module docs).
#[derive(Debug)]
pub enum Netns {
    /// None asked for: the VM has only `lo`.
    None,
    /// The engine's, at this path.
    Path(PathBuf),
    /// The monitor's own: the one its main thread unshared.
    Own {
        /// The host's network namespace, where hooks run.
        host: OwnedFd,
        /// `/proc/<monitor pid>/ns/net`, the name hooks and engines use for it.
        path: PathBuf,
    },
}

impl Netns {
    /// The namespace the spec asks for. A new one is made here for the calling thread and the
    /// threads it starts afterwards: call this on the main thread before any other thread
    /// exists, so that `/proc/<pid>/ns/net` names it and every thread is in it.
    pub fn for_spec(spec: &oci_spec::runtime::Spec) -> Result<Netns, NetworkError> {
        match requested(spec) {
            Requested::None => Ok(Netns::None),
            Requested::Path(p) => Ok(Netns::Path(p)),
            Requested::New => Netns::unshare(),
        }
    }

    /// Moves the calling thread into a new network namespace with `lo` up.
    fn unshare() -> Result<Netns, NetworkError> {
        let here = Path::new("/proc/thread-self/ns/net");
        let host = std::fs::File::open(here).map_err(|source| NetworkError::OpenNamespace {
            path: here.to_owned(),
            source,
        })?;
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|source| NetworkError::Unshare { source })?;
        let path = PathBuf::from(format!("/proc/{}/ns/net", std::process::id()));
        let nl_err = |what: &str| {
            let (path, what) = (path.clone(), what.to_owned());
            move |source| NetworkError::Netlink { path, what, source }
        };
        // Loopback starts down in a new namespace; containers expect it up (runc does the
        // same), and engines' hooks may use it.
        let nl = Netlink::open().map_err(nl_err("opening rtnetlink"))?;
        let links = nl.links().map_err(nl_err("listing interfaces"))?;
        if let Some(lo) = links.iter().find(|l| l.flags & IFF_LOOPBACK != 0) {
            nl.set_up(lo.index, lo.mtu)
                .map_err(nl_err("bringing up lo"))?;
        }
        Ok(Netns::Own {
            host: host.into(),
            path,
        })
    }

    /// The host's network namespace, when the caller is not in it (the monitor's own
    /// namespace): hooks are run there.
    pub fn host(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Netns::Own { host, .. } => Some(host.as_fd()),
            Netns::None | Netns::Path(_) => None,
        }
    }
}

/// Runs `f` on a thread that has joined the network namespace at `netns`.
fn in_netns<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, NetworkError> + Send,
) -> Result<T, NetworkError> {
    let file = std::fs::File::open(netns).map_err(|source| NetworkError::OpenNamespace {
        path: netns.to_owned(),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                |source| NetworkError::Enter {
                    path: netns.to_owned(),
                    source,
                },
            )?;
            f()
        })
        .join()
        .map_err(|_| NetworkError::Thread)?
    })
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

/// Undoes what `record` says was done, with a netlink socket in its namespace. Every step is
/// tried; failures other than "already gone" are logged.
fn undo(nl: &Netlink, record: &Record) {
    let log = |what: String, e: io::Error| {
        eprintln!(
            "husk: cleaning up the network namespace {}: {what}: {e}",
            record.netns.display()
        );
    };
    let links = match nl.links() {
        Ok(l) => l,
        Err(e) => return log("listing interfaces".into(), e),
    };
    for iface in &record.interfaces {
        if let Some(tap) = links.iter().find(|l| l.name == iface.tap)
            && let Err(e) = nl.delete_link(tap.index)
            && e.raw_os_error() != Some(libc::ENODEV)
        {
            log(format!("deleting {}", iface.tap), e);
        }
        // The engine's interface: only if it is still the one we changed.
        if !links
            .iter()
            .any(|l| l.index == iface.index && l.name == iface.name)
        {
            continue;
        }
        match nl.delete_ingress_qdisc(iface.index) {
            Ok(()) => {}
            // Not there (never added, or already removed).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {}
            Err(e) => log(format!("removing the ingress qdisc of {}", iface.name), e),
        }
        for a in &iface.addresses {
            match nl.add_address(iface.index, a) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => log(
                    format!("restoring {}/{} on {}", a.addr, a.prefix_len, iface.name),
                    e,
                ),
            }
        }
        // On-link routes first: a gateway must be reachable when its route is added.
        let mut routes: Vec<&Route> = iface.routes.iter().collect();
        routes.sort_by_key(|r| r.gateway.is_some());
        for r in routes {
            match nl.add_route(iface.index, r) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => log(format!("restoring a route of {}", iface.name), e),
            }
        }
    }
}

/// Undoes what the record in `state_dir` says (for `husk delete` after the monitor was
/// killed) and removes the record. Nothing to do without a record, or when the namespace is
/// gone.
pub fn teardown(state_dir: &Path) -> Result<(), NetworkError> {
    let path = state_dir.join(RECORD_FILE);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(NetworkError::Record { path, source }),
    };
    if data.is_empty() {
        // No network: the jail pinned an empty record (see `jail::PINNED`).
        return std::fs::remove_file(&path).map_err(|source| NetworkError::Record { path, source });
    }
    let record: Record = serde_json::from_slice(&data).map_err(|e| NetworkError::Record {
        path: path.clone(),
        source: e.into(),
    })?;
    if record.own {
        // The monitor's namespace went with it, or is the engine's now (see the module docs).
        return std::fs::remove_file(&path).map_err(|source| NetworkError::Record { path, source });
    }
    let netns = record.netns.clone();
    let undone = in_netns(&netns, || {
        let nl = Netlink::open().map_err(|source| NetworkError::Netlink {
            path: netns.clone(),
            what: "opening rtnetlink".into(),
            source,
        })?;
        undo(&nl, &record);
        Ok(())
    });
    match undone {
        // The engine deleted the namespace: nothing of ours is left in it.
        Err(NetworkError::OpenNamespace { source, .. })
            if source.kind() == io::ErrorKind::NotFound => {}
        other => other?,
    }
    std::fs::remove_file(&path).map_err(|source| NetworkError::Record { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: Option<&str>, gw: Option<&str>, protocol: u8) -> Route {
        Route {
            destination: dst.map(|d| {
                let (a, p) = d.split_once('/').unwrap();
                Address {
                    addr: a.parse().unwrap(),
                    prefix_len: p.parse().unwrap(),
                }
            }),
            gateway: gw.map(|g| g.parse().unwrap()),
            protocol,
            scope: 0,
            priority: None,
            family: 2,
        }
    }

    #[test]
    fn guest_routes_skip_kernel_and_link_local_routes() {
        let routes = [
            route(Some("10.1.2.0/24"), None, RTPROT_KERNEL),
            route(None, Some("10.1.2.1"), 3),
            route(Some("fe80::/64"), None, 3),
            route(Some("192.168.0.0/16"), Some("10.1.2.254"), 4),
        ];
        let got = guest_routes("eth0", &routes);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].destination, None);
        assert_eq!(got[0].gateway, Some("10.1.2.1".parse().unwrap()));
        assert_eq!(got[1].interface, "eth0");
    }

    #[test]
    fn link_local_addresses_are_recognised() {
        assert!(is_link_local(&"fe80::1".parse().unwrap()));
        assert!(is_link_local(&"169.254.1.1".parse().unwrap()));
        assert!(!is_link_local(&"fd00::1".parse().unwrap()));
        assert!(!is_link_local(&"10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn loopback_taps_and_non_ethernet_are_not_taken() {
        let link = |name: &str, link_type, flags| Link {
            index: 1,
            name: name.into(),
            link_type,
            flags,
            mac: vec![2, 0, 0, 0, 0, 1],
            mtu: 1500,
            kind: None,
        };
        assert!(eligible(&link("eth0", ARPHRD_ETHER, 0)));
        assert!(!eligible(&link("lo", 772, IFF_LOOPBACK)));
        assert!(!eligible(&link("tap0_husk", ARPHRD_ETHER, 0)));
        assert!(!eligible(&link("wg0", 65534, 0)));
    }

    #[test]
    fn the_spec_asks_for_no_namespace_a_path_or_a_new_one() {
        let spec = |namespaces: &str| -> oci_spec::runtime::Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion": "1.0.2", "root": {{"path": "rootfs"}},
                    "linux": {{"namespaces": [{namespaces}]}}}}"#
            ))
            .unwrap()
        };
        assert_eq!(requested(&spec(r#"{"type": "pid"}"#)), Requested::None);
        assert_eq!(requested(&spec(r#"{"type": "network"}"#)), Requested::New);
        assert_eq!(
            requested(&spec(
                r#"{"type": "pid"}, {"type": "network", "path": "/run/netns/x"}"#
            )),
            Requested::Path(PathBuf::from("/run/netns/x"))
        );
    }

    #[test]
    fn teardown_without_a_record_does_nothing() {
        let dir = std::env::temp_dir().join(format!("husk-net-norecord-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        teardown(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_namespace_is_a_clear_error() {
        let netns = Netns::Path(PathBuf::from("/nonexistent/netns"));
        let err = setup(&netns, Path::new("/tmp")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    }
}

/// Against the real kernel: a namespace with a veth made the way an engine makes it (root and
/// iproute2's `ip` needed; skipped otherwise).
#[cfg(test)]
mod netns_tests {
    use std::process::Command;

    use super::*;

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("running ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A namespace `name` with `eth0` (10.<n>.<m>.2/24, default route via .1) whose peer
    /// stays in the host namespace; deleted on drop.
    struct EngineNetns {
        name: String,
    }

    impl EngineNetns {
        fn new(tag: &str) -> Option<Self> {
            // SAFETY: geteuid(2) has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            let has_ip = Command::new("ip").arg("-V").output().is_ok();
            if !root || !has_ip {
                eprintln!("SKIPPED: needs root and iproute2");
                return None;
            }
            let pid = std::process::id();
            let name = format!("husk-{tag}-{pid}");
            let host_end = format!("hk{}{}", &tag[..2], pid % 100_000);
            let ns = Self { name };
            let subnet = format!("10.{}.{}", 100 + pid % 100, pid / 100 % 250);
            ip(&["netns", "add", &ns.name]);
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ]);
            let n = |args: &[&str]| {
                let mut all = vec!["-n", ns.name.as_str()];
                all.extend_from_slice(args);
                ip(&all)
            };
            n(&["addr", "add", &format!("{subnet}.2/24"), "dev", "eth0"]);
            n(&["link", "set", "eth0", "mtu", "1400", "up"]);
            n(&["link", "set", "lo", "up"]);
            n(&["route", "add", "default", "via", &format!("{subnet}.1")]);
            Some(ns)
        }

        fn path(&self) -> PathBuf {
            PathBuf::from("/run/netns").join(&self.name)
        }

        fn ip(&self, args: &[&str]) -> String {
            let mut all = vec!["-n", self.name.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        }
    }

    impl Drop for EngineNetns {
        fn drop(&mut self) {
            // Deleting the namespace deletes eth0 and with it its peer.
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    fn assert_as_the_engine_made_it(ns: &EngineNetns) {
        let links = ns.ip(&["-o", "link"]);
        assert!(!links.contains("_husk"), "a tap is left: {links}");
        assert!(!ns.ip(&["-o", "addr", "show", "dev", "eth0"]).is_empty());
        assert!(
            ns.ip(&["-o", "-4", "addr", "show", "dev", "eth0"])
                .contains("/24")
        );
        assert!(
            ns.ip(&["route"]).contains("default via"),
            "{}",
            ns.ip(&["route"])
        );
        let qdiscs = Command::new("tc")
            .args(["-n", &ns.name, "qdisc", "show", "dev", "eth0", "ingress"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        assert!(qdiscs.is_empty(), "an ingress qdisc is left: {qdiscs}");
    }

    #[test]
    fn setup_takes_the_veth_and_drop_gives_it_back() {
        let Some(ns) = EngineNetns::new("setup") else {
            return;
        };
        let state = std::env::temp_dir().join(format!("husk-net-state-{}", ns.name));
        std::fs::create_dir_all(&state).unwrap();
        let network = setup(&Netns::Path(ns.path()), &state).unwrap().unwrap();
        assert_eq!(network.devices.len(), 1);
        assert_eq!(network.devices[0].mtu, 1400);
        assert_eq!(network.guest.interfaces[0].name, "eth0");
        let addrs = &network.guest.interfaces[0].addresses;
        assert_eq!(addrs.len(), 1, "{addrs:?}");
        assert_eq!(addrs[0].prefix_len, 24);
        assert!(
            network
                .guest
                .routes
                .iter()
                .any(|r| r.destination.is_none() && r.gateway.is_some()),
            "{:?}",
            network.guest.routes
        );
        assert!(state.join(RECORD_FILE).is_file());
        // In the namespace: the tap, up, with the veth's MTU; ingress qdiscs with a filter
        // each way; the veth without its IPv4 address.
        let tap = ns.ip(&["-o", "link", "show", "tap0_husk"]);
        assert!(tap.contains("mtu 1400") && tap.contains("UP"), "{tap}");
        assert!(
            ns.ip(&["-o", "-4", "addr", "show", "dev", "eth0"])
                .is_empty()
        );
        let nl = &network.nl;
        let links = nl.links().unwrap();
        let index = |name: &str| links.iter().find(|l| l.name == name).unwrap().index;
        assert!(nl.has_ingress_qdisc(index("eth0")).unwrap());
        assert!(nl.has_ingress_qdisc(index("tap0_husk")).unwrap());
        let filters = Command::new("tc")
            .args(["-n", &ns.name, "filter", "show", "dev", "eth0", "ingress"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if !filters.is_empty() {
            assert!(filters.contains("tap0_husk"), "{filters}");
        }
        // A second VM in the same namespace is refused.
        let state2 = state.join("second");
        std::fs::create_dir_all(&state2).unwrap();
        let err = setup(&Netns::Path(ns.path()), &state2).unwrap_err();
        assert!(matches!(err, NetworkError::Busy { .. }), "{err}");

        drop(network);
        assert!(!state.join(RECORD_FILE).exists());
        assert_as_the_engine_made_it(&ns);
        std::fs::remove_dir_all(&state).unwrap();
    }

    /// The monitor's own namespace, as Docker fills it: made on a thread of its own (as the
    /// monitor's main thread makes it), `lo` up, a hook run from it lands in the host's
    /// namespace, and what appears in it (here one end of a veth with an address and a
    /// default route, put there by `ip` run from that thread) is taken for the VM.
    #[test]
    fn a_new_namespace_is_made_filled_by_a_hook_and_taken() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 || Command::new("ip").arg("-V").output().is_err() {
            eprintln!("SKIPPED: needs root and iproute2");
            return;
        }
        let spec: oci_spec::runtime::Spec = serde_json::from_str(
            r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"},
                "linux": {"namespaces": [{"type": "network"}]}}"#,
        )
        .unwrap();
        let host_ns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let state = std::env::temp_dir().join(format!("husk-net-own-{}", std::process::id()));
        std::fs::create_dir_all(&state).unwrap();
        let seen = state.join("hook-netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                let t = std::time::Instant::now();
                let netns = Netns::for_spec(&spec).unwrap();
                // What every container asking for a new namespace now pays in `create`.
                eprintln!("network: a new namespace with lo up took {:?}", t.elapsed());
                let own_ns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
                assert_ne!(own_ns, host_ns);
                assert!(ip(&["-o", "link", "show", "lo"]).contains("UP"));
                // The hook runs in the host's namespace.
                let hooks: oci_spec::runtime::Hooks = serde_json::from_value(serde_json::json!({
                    "createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c",
                        format!("readlink /proc/self/ns/net > {}", seen.display())]}]
                }))
                .unwrap();
                let st = crate::oci::state::State {
                    oci_version: "1.2.0".into(),
                    id: "own".into(),
                    status: crate::oci::state::Status::Creating,
                    pid: Some(1),
                    bundle: state.clone(),
                    annotations: Default::default(),
                    created: String::new(),
                    monitor_start_time: 0,
                    exit_status: None,
                };
                crate::oci::hooks::run(
                    crate::oci::hooks::HookKind::CreateRuntime,
                    Some(&hooks),
                    &st,
                    netns.host(),
                )
                .unwrap();
                let hook_ns = std::fs::read_to_string(&seen).unwrap();
                assert_eq!(hook_ns.trim(), host_ns.to_str().unwrap());
                // `ip` forked from this thread works in the new namespace.
                // The peer goes to the host's namespace (that of this process's main
                // thread): only eth0 is the container's. It goes when this namespace does.
                let pid = std::process::id().to_string();
                let peer = format!("hko{}", std::process::id() % 100_000);
                ip(&[
                    "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", &pid,
                ]);
                ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
                ip(&["link", "set", "eth0", "up"]);
                ip(&["route", "add", "default", "via", "10.77.0.1"]);
                let network = setup(&netns, &state).unwrap().unwrap();
                assert_eq!(network.guest.interfaces.len(), 1);
                assert_eq!(network.guest.interfaces[0].name, "eth0");
                assert!(network.record.own);
                assert!(ip(&["-o", "link"]).contains("tap0_husk"));
                // A killed monitor's record of its own namespace: nothing to undo later.
                let record = std::fs::read(state.join(RECORD_FILE)).unwrap();
                drop(network);
                std::fs::write(state.join(RECORD_FILE), record).unwrap();
                teardown(&state).unwrap();
                assert!(!state.join(RECORD_FILE).exists());
            });
        });
        std::fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn a_killed_monitor_is_cleaned_up_from_the_record() {
        let Some(ns) = EngineNetns::new("record") else {
            return;
        };
        let state = std::env::temp_dir().join(format!("husk-net-state-{}", ns.name));
        std::fs::create_dir_all(&state).unwrap();
        let network = setup(&Netns::Path(ns.path()), &state).unwrap().unwrap();
        // As if the monitor were killed: nothing undone, the tap fd stays open.
        std::mem::forget(network);
        teardown(&state).unwrap();
        assert!(!state.join(RECORD_FILE).exists());
        assert_as_the_engine_made_it(&ns);
        std::fs::remove_dir_all(&state).unwrap();
    }
}
