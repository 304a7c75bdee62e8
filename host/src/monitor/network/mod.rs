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
mod tests;

/// Against the real kernel: a namespace with a veth made the way an engine makes it (root and
/// iproute2's `ip` needed; skipped otherwise).
#[cfg(test)]
mod netns_tests;
