//! A pod's container's files in the sandbox's share: its rootfs and the sources of its bind
//! mounts, attached under `pod/<id>/` of the share in the sandbox monitor's mount namespace
//! while the VM runs (the guest sees them appear in the share it has mounted), and detached
//! again by `husk delete`.
//!
//! The sandbox's monitor, confined, can neither open the host's paths nor mount: the member
//! (the process that stands for the container, as root on the host) does it. Each tree is cloned from
//! the host (recursively for the rootfs and `rbind`), made read-only as a whole for `ro`,
//! idmapped through the sandbox monitor's user namespace when it runs in one
//! (`--monitor-uid`), then attached from a child that entered the monitor's mount
//! namespace. An overlay rootfs (what engines give) cannot be idmapped: it is mounted anew
//! there on idmapped views of its layers ([`RemountedOverlay`]), as `monitor::overlay` does
//! for a VM's own container.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use husk_proto::{FsSource, MountSource, SHARE_TAG};

use super::error::MemberError;
use super::mounts::{Detached, Last, detach, in_mount_namespace, walk};
use crate::monitor::overlay;
use crate::oci::bundle::Bundle;

/// The share's directory of a pod's container `id`, relative to the share.
pub(super) fn share_path(id: &str) -> String {
    format!("pod/{id}")
}

/// Where the container's files are in the share, for husk-init.
#[derive(Debug)]
pub(super) struct Placed {
    /// The rootfs, relative to the share.
    pub(super) rootfs: String,
    /// The bind mounts' sources.
    pub(super) mounts: Vec<MountSource>,
    /// The work directory of an overlay rootfs mounted anew (see [`RemountedOverlay`]), for
    /// `delete` to remove.
    pub(super) workdir: Option<PathBuf>,
}

/// Where the idmapped views of an overlay rootfs's layers are attached in the sandbox
/// monitor's mount namespace: outside the share (the guest does not see them), in the
/// sandbox's state directory.
const LAYERS_DIR: &str = "pod-layers";

/// The engine's overlay rootfs of a pod's container, mounted anew in the sandbox monitor's
/// namespace on idmapped views of its layers, as `monitor::overlay` does for a VM's own
/// container: each layer's view is attached at `pod-layers/<id>/<n>` of the sandbox's state
/// directory, and the overlay is mounted with those paths (relative to that directory, which
/// keeps the options short) and a work directory of husk's own inside the engine's.
struct RemountedOverlay {
    /// The layers' idmapped views, attached as their index.
    layers: Vec<Detached>,
    /// The overlay's options.
    data: String,
    /// Its `MOUNT_ATTR_*` flags.
    attrs: u64,
    /// The host uid and gid of the monitor's namespace root, which mounts it.
    base: u32,
    /// husk's work directory, made here.
    workdir: Option<PathBuf>,
}

impl RemountedOverlay {
    fn prepare(
        o: &overlay::Overlay,
        id: &str,
        userns: &OwnedFd,
        base: u32,
        sandbox_dir: &Path,
    ) -> Result<RemountedOverlay, MemberError> {
        let dirs = o.layer_dirs()?;
        let mut layers = Vec::new();
        for dir in &dirs {
            // Not its submounts: overlayfs does not see a layer's submounts either.
            let tree = Detached::clone_of(dir, false).map_err(|source| MemberError::Io {
                what: "cloning the mount of the overlay layer",
                path: dir.clone(),
                source,
            })?;
            tree.idmap(userns)
                .map_err(|error| MemberError::NotIdmappable {
                    path: dir.clone(),
                    error,
                })?;
            layers.push(tree);
        }
        let workdir = o.workdir(id);
        if let Some(w) = &workdir {
            match std::fs::create_dir(w) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(MemberError::Io {
                        what: "making the overlay's work directory",
                        path: w.clone(),
                        source: e,
                    });
                }
                _ => {}
            }
        }
        let data = o.data(id, &|p| {
            let (n, dir) = (0..)
                .zip(&dirs)
                .find(|(_, d)| p.starts_with(d))
                .ok_or_else(|| overlay::OverlayError::Layer {
                    dir: p.to_owned(),
                    source: std::io::ErrorKind::NotFound.into(),
                })?;
            let rest = p.strip_prefix(dir).unwrap_or(Path::new(""));
            Ok(Path::new(&format!("{n}")).join(rest))
        })?;
        let flags = o.flags();
        let attrs = [
            (nix::mount::MsFlags::MS_RDONLY, libc::MOUNT_ATTR_RDONLY),
            (nix::mount::MsFlags::MS_NOSUID, libc::MOUNT_ATTR_NOSUID),
            (nix::mount::MsFlags::MS_NODEV, libc::MOUNT_ATTR_NODEV),
            (nix::mount::MsFlags::MS_NOEXEC, libc::MOUNT_ATTR_NOEXEC),
        ]
        .into_iter()
        .filter(|(f, _)| flags.contains(*f))
        .fold(0, |a, (_, attr)| a | attr);
        // The layers' mount points.
        let sandbox = open_dir(sandbox_dir).map_err(|source| MemberError::Io {
            what: "opening",
            path: sandbox_dir.to_owned(),
            source,
        })?;
        for n in 0..layers.len() {
            let names = [LAYERS_DIR, id, &n.to_string()];
            walk(&sandbox, &names, Last::Dir, true).map_err(|source| MemberError::Io {
                what: "creating a mount point in",
                path: sandbox_dir.join(names.join("/")),
                source,
            })?;
        }
        Ok(RemountedOverlay {
            layers,
            data,
            attrs,
            base,
            workdir,
        })
    }

    /// In the sandbox monitor's mount namespace: attaches the layers, mounts the overlay and
    /// attaches it at `target`.
    fn mount(&self, sandbox_dir: &Path, id: &str, target: &OwnedFd) -> Result<(), String> {
        let layers_dir = open_dir(sandbox_dir)
            .and_then(|d| walk(&d, &[LAYERS_DIR, id], Last::Dir, false))
            .map_err(|e| format!("opening {}/{LAYERS_DIR}/{id}: {e}", sandbox_dir.display()))?;
        for (n, tree) in self.layers.iter().enumerate() {
            let point = walk(&layers_dir, &[&n.to_string()], Last::Dir, false)
                .map_err(|e| format!("opening the mount point of layer {n}: {e}"))?;
            tree.attach(&point)
                .map_err(|e| format!("attaching layer {n}: {e}"))?;
        }
        // The layers' paths are relative to it.
        nix::unistd::fchdir(&layers_dir).map_err(|e| format!("entering the layers: {e}"))?;
        let options: Vec<&str> = self.data.split(',').collect();
        let mounted = overlay::as_namespace_root(self.base, || {
            Detached::new_mount("overlay", &options, self.attrs)
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("mounting the overlay ({}): {e}", self.data))?;
        mounted
            .attach(target)
            .map_err(|e| format!("attaching the overlay: {e}"))
    }
}

/// The sandbox monitor's namespaces, opened from its pid.
pub(super) struct SandboxNamespaces {
    /// Its mount namespace.
    pub(super) mnt: OwnedFd,
    /// Its user namespace, when it is not ours (`--monitor-uid`), and the host uid of that
    /// namespace's root.
    pub(super) user: Option<(OwnedFd, u32)>,
}

impl SandboxNamespaces {
    /// The namespaces of process `pid` (the sandbox's monitor).
    pub(super) fn of(pid: i32) -> Result<SandboxNamespaces, MemberError> {
        let open = |name: &str| {
            let path = PathBuf::from(format!("/proc/{pid}/ns/{name}"));
            std::fs::File::open(&path)
                .map(OwnedFd::from)
                .map_err(|source| MemberError::Io {
                    what: "opening the sandbox monitor's namespace",
                    path,
                    source,
                })
        };
        let same_user = std::fs::read_link(format!("/proc/{pid}/ns/user")).ok()
            == std::fs::read_link("/proc/self/ns/user").ok();
        let user = if same_user {
            None
        } else {
            let map = PathBuf::from(format!("/proc/{pid}/uid_map"));
            let text = std::fs::read_to_string(&map).map_err(|source| MemberError::Io {
                what: "reading",
                path: map.clone(),
                source,
            })?;
            // "0 BASE COUNT": the namespace's root is host uid BASE.
            let base = text
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.first() == Some(&"0"))
                .and_then(|f| f.get(1).and_then(|b| b.parse().ok()))
                .ok_or_else(|| MemberError::Io {
                    what: "finding the root of the sandbox monitor's user namespace in",
                    path: map,
                    source: std::io::ErrorKind::InvalidData.into(),
                })?;
            Some((open("user")?, base))
        };
        Ok(SandboxNamespaces {
            mnt: open("mnt")?,
            user,
        })
    }
}

/// Opens a state directory (the sandbox's), by its absolute path: the same path in the host's
/// mount namespace and in the sandbox monitor's, whose jail holds the directory there.
fn open_dir(dir: &Path) -> std::io::Result<OwnedFd> {
    nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(std::io::Error::from)
}

/// Attaches the container's rootfs and bind-mount sources under `share/pod/<id>` of the
/// sandbox (state directory `sandbox_dir`, absolute), in the sandbox monitor's mount
/// namespace. The guest can change the share at any time, so every path into it is walked a
/// component at a time without following links (`mounts::walk`), on the host (to create the
/// mount points) as in the monitor's namespace (to attach). Must be called while the process
/// has one thread.
pub(super) fn place(
    bundle: &Bundle,
    id: &str,
    sandbox_dir: &Path,
    ns: &SandboxNamespaces,
) -> Result<Placed, MemberError> {
    let rel = share_path(id);
    let io =
        |what: &'static str, path: PathBuf| move |source| MemberError::Io { what, path, source };
    let share_dir = sandbox_dir.join("share");
    let share = open_dir(sandbox_dir)
        .and_then(|d| walk(&d, &["share"], Last::Dir, false))
        .map_err(io("opening", share_dir.clone()))?;
    let clone = |source: &Path, recursive: bool, read_only: bool| {
        let tree = Detached::clone_of(source, recursive)
            .map_err(io("cloning the mount of", source.to_owned()))?;
        if read_only {
            tree.set_read_only()
                .map_err(io("making read-only", source.to_owned()))?;
        }
        if let Some((userns, _)) = &ns.user {
            tree.idmap(userns).map_err(|e| MemberError::NotIdmappable {
                path: source.to_owned(),
                error: e,
            })?;
        }
        Ok::<_, MemberError>(tree)
    };

    // (tree, where below the share, what the mount point is)
    let mut trees: Vec<(Detached, Vec<String>, Last)> = Vec::new();
    let rootfs_at = vec!["pod".into(), id.into(), "rootfs".into()];
    // An overlay cannot be idmapped: for the monitor's user namespace it is mounted anew.
    let overlay = match &ns.user {
        Some((userns, base)) => overlay::at(&bundle.rootfs)?
            .map(|o| RemountedOverlay::prepare(&o, id, userns, *base, sandbox_dir))
            .transpose()?,
        None => None,
    };
    if overlay.is_none() {
        // Writable even for `root.readonly`: husk-init makes the root read-only in the guest
        // after it created the mount points (as for the VM's own container).
        trees.push((
            clone(&bundle.rootfs, true, false)?,
            rootfs_at.clone(),
            Last::Dir,
        ));
    }
    let mut mounts = Vec::new();
    for (index, m, source) in bundle.bind_mounts() {
        let options = m.options().as_deref().unwrap_or_default();
        let Some(source) = source else {
            return Err(MemberError::NoSource {
                index,
                destination: m.destination().clone(),
            });
        };
        let is_dir = std::fs::metadata(&source)
            .map_err(io("reading", source.clone()))?
            .is_dir();
        let recursive = options.iter().any(|o| o == "rbind");
        let read_only = options.iter().any(|o| o == "ro");
        trees.push((
            clone(&source, recursive, read_only)?,
            vec!["pod".into(), id.into(), "mounts".into(), index.to_string()],
            if is_dir { Last::Dir } else { Last::File },
        ));
        mounts.push(MountSource {
            index,
            source: FsSource::Share {
                tag: SHARE_TAG.into(),
                path: format!("{rel}/mounts/{index}"),
            },
        });
    }
    let attached = attach_all(
        sandbox_dir,
        &share,
        &trees,
        overlay.as_ref(),
        &rootfs_at,
        id,
        ns,
    );
    let workdir = overlay.and_then(|o| o.workdir);
    if let Err(e) = attached {
        // The caller undoes the rest (`unplace`); the work directory is recorded only once
        // placed.
        if let Some(w) = &workdir {
            let _ = std::fs::remove_dir_all(w);
        }
        return Err(e);
    }
    Ok(Placed {
        rootfs: format!("{rel}/rootfs"),
        mounts,
        workdir,
    })
}

/// Creates the mount points on the host, then, in the sandbox monitor's mount namespace,
/// attaches the trees and mounts the overlay rootfs if there is one.
fn attach_all(
    sandbox_dir: &Path,
    share: &OwnedFd,
    trees: &[(Detached, Vec<String>, Last)],
    overlay: Option<&RemountedOverlay>,
    rootfs_at: &[String],
    id: &str,
    ns: &SandboxNamespaces,
) -> Result<(), MemberError> {
    let share_dir = sandbox_dir.join("share");
    let mount_points = trees
        .iter()
        .map(|(_, names, last)| (names.as_slice(), *last))
        .chain(overlay.map(|_| (rootfs_at, Last::Dir)));
    for (names, last) in mount_points {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        walk(share, &names, last, true).map_err(|source| MemberError::Io {
            what: "creating a mount point in",
            path: share_dir.join(names.join("/")),
            source,
        })?;
    }
    in_mount_namespace(&ns.mnt, || {
        let share = open_dir(sandbox_dir)
            .and_then(|d| walk(&d, &["share"], Last::Dir, false))
            .map_err(|e| format!("opening {}: {e}", share_dir.display()))?;
        for (tree, names, last) in trees {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let at = || share_dir.join(names.join("/"));
            let target = walk(&share, &names, *last, false)
                .map_err(|e| format!("opening {}: {e}", at().display()))?;
            tree.attach(&target)
                .map_err(|e| format!("attaching at {}: {e}", at().display()))?;
        }
        if let Some(o) = overlay {
            let names: Vec<&str> = rootfs_at.iter().map(String::as_str).collect();
            let target = walk(&share, &names, Last::Dir, false)
                .map_err(|e| format!("opening {}/{}: {e}", share_dir.display(), names.join("/")))?;
            o.mount(sandbox_dir, id, &target)?;
        }
        Ok(())
    })
    .map_err(MemberError::Attach)
}

/// Detaches what [`place`] attached for container `id` in the sandbox monitor's mount
/// namespace (if it still runs) and removes its directory from the share. Safe whatever
/// happened before, and whatever the guest did to the share: the walks follow no link, and
/// the host's own namespace never had these mounts, so the removal there only sees the mount
/// points. Must be called while the process has one thread.
pub(crate) fn unplace(id: &str, sandbox_dir: &Path, sandbox_pid: Option<i32>) {
    let Ok(sandbox) = open_dir(sandbox_dir) else {
        return;
    };
    // The bind mounts' mount points, listed here (the monitor's /proc may not show the
    // helper that enters its namespace).
    let mount_points = entry_names(&sandbox, &["share", "pod", id, "mounts"]);
    let layer_points = entry_names(&sandbox, &[LAYERS_DIR, id]);
    if let Some(pid) = sandbox_pid
        && let Ok(ns) = SandboxNamespaces::of(pid)
    {
        let result = in_mount_namespace(&ns.mnt, || {
            let Ok(dir) = open_dir(sandbox_dir)
                .and_then(|d| walk(&d, &["share", "pod", id], Last::Dir, false))
            else {
                return Ok(());
            };
            // Not mounted (any more): nothing to detach.
            let _ = detach(&dir, "rootfs");
            if let Ok(layers) =
                open_dir(sandbox_dir).and_then(|d| walk(&d, &[LAYERS_DIR, id], Last::Dir, false))
            {
                for name in &layer_points {
                    let _ = detach(&layers, name);
                }
            }
            if let Ok(mounts) = walk(&dir, &["mounts"], Last::Dir, false) {
                for name in &mount_points {
                    let _ = detach(&mounts, name);
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            eprintln!("husk: detaching {id}'s files from its pod: {e}");
        }
    }
    for parent in [&["share", "pod"][..], &[LAYERS_DIR]] {
        if let Ok(dir) = walk(&sandbox, parent, Last::Dir, false) {
            // Through the descriptor: the last component is not followed, the rest is ours.
            let _ = std::fs::remove_dir_all(format!("/proc/self/fd/{}/{id}", dir.as_raw_fd()));
        }
    }
}

/// The names in the directory `path` below `sandbox` (walked without following links), or
/// none if it is not there.
fn entry_names(sandbox: &OwnedFd, path: &[&str]) -> Vec<String> {
    walk(sandbox, path, Last::Dir, false)
        .and_then(|d| std::fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd())))
        .map(|list| {
            list.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
