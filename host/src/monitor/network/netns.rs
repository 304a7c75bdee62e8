//! Which network namespace the container gets (see the module docs of `network`): none, the
//! engine's, or one the monitor makes; and how the monitor works in one it is not in.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use super::error::NetworkError;
use super::netlink::{IFF_LOOPBACK, Netlink};

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
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|source| NetworkError::Unshare { source })?;
        let path = PathBuf::from(format!("/proc/{}/ns/net", crate::pid::host_pid()));
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
        Ok(Netns::Own { path })
    }
}

/// Runs `f` on a thread that has joined the network namespace at `netns`.
pub(super) fn in_netns<T: Send>(
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
