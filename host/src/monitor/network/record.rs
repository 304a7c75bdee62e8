//! What the monitor changed in a network namespace, recorded before it changes it, and how
//! that is undone: by the monitor when the VM ends, or by `husk delete` after a killed monitor
//! (see the module docs of `network`).

use std::io;
use std::path::{Path, PathBuf};

use super::error::NetworkError;
use super::netlink::{Address, Netlink, Route};
use super::netns::in_netns;

/// The file in the state directory that records what the monitor changed.
pub const RECORD_FILE: &str = "network.json";

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

/// Undoes what `record` says was done, with a netlink socket in its namespace. Every step is
/// tried; failures other than "already gone" are logged.
pub(super) fn undo(nl: &Netlink, record: &Record) {
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
