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
//! namespace. An overlay rootfs cannot be idmapped: under `--monitor-uid` a pod's containers
//! need rootfs on filesystems that can (the sandbox's own overlay is handled by
//! `monitor::overlay`; a pod's later ones are not yet).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use husk_proto::{FsSource, MountSource, SHARE_TAG};

use super::MemberError;
use super::mounts::{Detached, Last, detach, in_mount_namespace, walk};
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
}

/// The sandbox monitor's namespaces, opened from its pid.
pub(super) struct SandboxNamespaces {
    /// Its mount namespace.
    pub(super) mnt: OwnedFd,
    /// Its user namespace, when it is not ours (`--monitor-uid`).
    pub(super) user: Option<OwnedFd>,
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
        Ok(SandboxNamespaces {
            mnt: open("mnt")?,
            user: if same_user { None } else { Some(open("user")?) },
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
        if let Some(userns) = &ns.user {
            tree.idmap(userns).map_err(|e| MemberError::NotIdmappable {
                path: source.to_owned(),
                error: e,
            })?;
        }
        Ok::<_, MemberError>(tree)
    };

    // (tree, where below the share, what the mount point is)
    let mut trees: Vec<(Detached, Vec<String>, Last)> = Vec::new();
    // Writable even for `root.readonly`: husk-init makes the root read-only in the guest
    // after it created the mount points (as for the VM's own container).
    trees.push((
        clone(&bundle.rootfs, true, false)?,
        vec!["pod".into(), id.into(), "rootfs".into()],
        Last::Dir,
    ));
    let mut mounts = Vec::new();
    for (index, m) in (0u32..).zip(bundle.spec.mounts().as_deref().unwrap_or_default()) {
        let options = m.options().as_deref().unwrap_or_default();
        let is_bind = m.typ().as_deref() == Some("bind")
            || options.iter().any(|o| o == "bind" || o == "rbind");
        if !is_bind {
            continue;
        }
        let Some(source) = m.source() else {
            return Err(MemberError::NoSource {
                index,
                destination: m.destination().clone(),
            });
        };
        let source = if source.is_absolute() {
            source.clone()
        } else {
            bundle.dir.join(source)
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
    for (_, names, last) in &trees {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        walk(&share, &names, *last, true).map_err(io(
            "creating a mount point in",
            share_dir.join(names.join("/")),
        ))?;
    }
    in_mount_namespace(&ns.mnt, || {
        let share = open_dir(sandbox_dir)
            .and_then(|d| walk(&d, &["share"], Last::Dir, false))
            .map_err(|e| format!("opening {}: {e}", share_dir.display()))?;
        for (tree, names, last) in &trees {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let at = || share_dir.join(names.join("/"));
            let target = walk(&share, &names, *last, false)
                .map_err(|e| format!("opening {}: {e}", at().display()))?;
            tree.attach(&target)
                .map_err(|e| format!("attaching at {}: {e}", at().display()))?;
        }
        Ok(())
    })
    .map_err(MemberError::Attach)?;
    Ok(Placed {
        rootfs: format!("{rel}/rootfs"),
        mounts,
    })
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
    let mount_points: Vec<String> =
        walk(&sandbox, &["share", "pod", id, "mounts"], Last::Dir, false)
            .and_then(|d| std::fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd())))
            .map(|list| {
                list.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
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
    if let Ok(pod) = walk(&sandbox, &["share", "pod"], Last::Dir, false) {
        // Through the descriptor: the last component is not followed, the rest is ours.
        let _ = std::fs::remove_dir_all(format!("/proc/self/fd/{}/{id}", pod.as_raw_fd()));
    }
}
