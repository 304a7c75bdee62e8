//! The ports on which the guest connects an exec'd process's stdio back to `husk exec`:
//! `vsock.sock_<port>` listeners beside the container's vsock socket (the VM's vsock device
//! connects the guest's streams to them), bound for the request and removed once the guest
//! connected or the request failed.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// Binds `vsock.sock_<port>` listeners for three consecutive free ports.
pub(super) fn bind(vsock: &Path) -> Result<(u32, [UnixListener; 3])> {
    // The monitor connects to them: they get the state directory's owner, which is the
    // monitor's uid under --monitor-uid (root's otherwise, a no-op).
    let dir = vsock.parent().unwrap_or(Path::new("."));
    let owner = std::fs::metadata(dir)
        .with_context(|| format!("reading the owner of {}", dir.display()))?;
    let (uid, gid) = (
        std::os::unix::fs::MetadataExt::uid(&owner),
        std::os::unix::fs::MetadataExt::gid(&owner),
    );
    let seed = std::process::id() % 10_000;
    for attempt in 0..1000u32 {
        let base = 10_000 + ((seed + attempt * 7) % 20_000) * 3;
        let mut bound = Vec::new();
        for p in base..base + 3 {
            let path = PathBuf::from(format!("{}_{p}", vsock.display()));
            // A port taken by another exec: its socket is not ours to remove.
            let Ok(l) = UnixListener::bind(&path) else {
                break;
            };
            bound.push((path, l));
        }
        if bound.len() < 3 {
            for (path, _) in bound {
                let _ = std::fs::remove_file(path);
            }
            continue;
        }
        for (path, _) in &bound {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to uid {uid}", path.display()))?;
        }
        let mut listeners = bound.into_iter().map(|(_, l)| l);
        let mut next = || listeners.next().expect("three bound");
        return Ok((base, [next(), next(), next()]));
    }
    bail!("no free vsock ports for exec")
}

/// Removes the listeners [`bind`] bound from `base` on.
pub(super) fn remove(vsock: &Path, base: u32) {
    for p in base..base + 3 {
        let _ = std::fs::remove_file(format!("{}_{p}", vsock.display()));
    }
}
