//! An overlay rootfs under `--monitor-uid` (see [`super::userns`]): the rootfs podman, Docker
//! and containerd's overlayfs snapshotter give is an overlay mount, and an overlay mount
//! cannot be idmapped (overlayfs does not support it); its layers can. So the monitor, in its
//! private mount namespace, takes each overlay off the share and mounts a new one at the same
//! place on idmapped views of the same layers (overlayfs accepts idmapped layers since Linux
//! 5.19). The guest's writes land in the engine's upper directory, owned on disk by the ids
//! the guest gave, as with a bind mount.
//!
//! How, for an overlay at P under the share (all in the monitor's mount namespace, as root,
//! before the jail):
//! - its layers are read from its line in `/proc/self/mountinfo` (`lowerdir`, `upperdir`,
//!   `workdir`; the other options are passed on). Each lower layer, and the directory
//!   holding the upper and work directories (they must be on one mount), is covered by an
//!   idmapped view of itself ([`super::userns::UserNs::idmap`]; not of the mounts below
//!   it, which overlayfs does not see in a layer either, and among which may be the engine's
//!   own overlay): in this mount namespace only, so the engine's paths name the idmapped
//!   views;
//! - the new overlay gets a work directory of its own, `husk-<id>` inside the engine's: the
//!   engine's overlay is still mounted and owns its work directory (a second overlay on it
//!   would empty it under the engine's feet). Its path is recorded ([`RECORD_FILE`], pinned)
//!   and `husk delete` removes it;
//! - the new overlay is mounted with `index=off`: the engine's overlay holds the upper
//!   directory, and overlayfs refuses a second mount on it only with the index on. Both
//!   overlays then share the upper directory, which overlayfs documents as undefined for
//!   files changed through both at once; the engine's is not written while the container runs
//!   (its files are the VM's), but `podman cp` into a running container (or the like) would
//!   not be seen by the container until its files are looked up anew;
//! - it is mounted with the filesystem ids of the namespace's root (host uid and gid BASE,
//!   root's capabilities kept): overlayfs creates its work files and copies up with the
//!   mounter's credentials, and through the idmapped upper layer only ids of the range can
//!   create files (host root would get EOVERFLOW).
//!
//! Layers given one by one (`lowerdir+=`, as fsconfig(2) mounts show) are read as well. Not
//! supported, refused by name: relative layer paths (what podman and containerd fall back to
//! when the absolute ones exceed a page of mount options, i.e. dozens of layers), data-only
//! layers (`::`, `datadir+`), paths with `,`, `:` or `\`, and mounts below an overlay (taking
//! the overlay off would take them too).

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::mountinfo::{self, MountLine};
use super::userns::{IdMap, UserNs};

/// The record of the work directories the new overlays were given (their paths, one per
/// line; empty without an overlay), pinned: `husk delete` removes them.
pub const RECORD_FILE: &str = "overlay-workdir";

/// Why an overlay could not be remounted on idmapped layers, or its work directory removed.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The mount table could not be read.
    #[error("reading {}", super::mountinfo::PATH)]
    Mountinfo(#[source] std::io::Error),
    /// An overlay whose options husk cannot mount anew (see the module docs for which).
    #[error(
        "the overlay at {at}: {why}; a monitor with a uid of its own (the default, or \
         --monitor-uid UID) cannot remount it on idmapped layers (--monitor-uid root serves it \
         as it is, a weaker confinement)"
    )]
    Unsupported {
        /// Where it is mounted.
        at: PathBuf,
        /// What husk does not support.
        why: String,
    },
    /// Another mount below an overlay, which taking the overlay off would take too.
    #[error(
        "the overlay at {at} has a mount below it ({kind} at {below}); --monitor-uid cannot \
         remount it on idmapped layers"
    )]
    MountBelow {
        /// Where the overlay is mounted.
        at: PathBuf,
        /// The type of the mount below it.
        kind: String,
        /// Where that one is mounted.
        below: PathBuf,
    },
    /// A layer is gone (or not reachable).
    #[error("overlay layer {dir}")]
    Layer {
        /// The layer.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A layer could not be idmapped.
    #[error(transparent)]
    Idmap(#[from] super::userns::UserNsError),
    /// The capabilities the mount needs could not be raised for the namespace's root.
    #[error("keeping capabilities for the overlay's mount")]
    Capabilities(#[source] caps::errors::CapsError),
    /// The kernel refused the new overlay.
    #[error("mounting the overlay at {at} on idmapped layers ({data})")]
    Mount {
        /// Where.
        at: PathBuf,
        /// Its options.
        data: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The engine's overlay could not be taken off the share.
    #[error("unmounting the overlay at {at}")]
    Unmount {
        /// Where.
        at: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The record of the work directories could not be written or read.
    #[error("{what} {path}")]
    Record {
        /// `writing` or `reading`.
        what: &'static str,
        /// The record.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The new overlay's work directory could not be made.
    #[error("making the overlay's work directory {dir}")]
    Workdir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The record names a directory that is not one husk made for this container: it is left.
    #[error("{record}: {line:?} is not a work directory of container {id}")]
    NotAWorkdir {
        /// The record.
        record: PathBuf,
        /// Its line.
        line: String,
        /// The container.
        id: String,
    },
    /// A work directory could not be removed.
    #[error("removing the overlay work directory {line}")]
    RemoveWorkdir {
        /// The directory, as recorded.
        line: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An overlay under the share, to be mounted anew on idmapped layers.
#[derive(Debug, PartialEq)]
pub struct Overlay {
    at: PathBuf,
    /// Its read-only, nosuid, nodev and noexec flags.
    flags: MsFlags,
    lower: Vec<PathBuf>,
    /// The upper directory and the engine's work directory, for a writable overlay.
    upper: Option<(PathBuf, PathBuf)>,
    /// The rest of its options, passed on.
    options: Vec<String>,
}

impl Overlay {
    /// Reads an overlay's layers and options from its mountinfo line.
    fn parse(m: &MountLine) -> Result<Overlay, OverlayError> {
        let bad = |why: String| OverlayError::Unsupported {
            at: m.at.clone(),
            why,
        };
        let mut flags = MsFlags::empty();
        for o in m.mount_options.split(',') {
            flags |= match o {
                "ro" => MsFlags::MS_RDONLY,
                "nosuid" => MsFlags::MS_NOSUID,
                "nodev" => MsFlags::MS_NODEV,
                "noexec" => MsFlags::MS_NOEXEC,
                _ => MsFlags::empty(),
            };
        }
        let (mut lower, mut upper, mut work, mut options) = (Vec::new(), None, None, Vec::new());
        for o in m.super_options.split(',') {
            let (key, value) = o.split_once('=').unwrap_or((o, ""));
            let value = String::from_utf8(mountinfo::unescape(value))
                .map_err(|_| bad(format!("{key}: not UTF-8")))?;
            let path = |p: &str| -> Result<PathBuf, OverlayError> {
                if p.is_empty() || p.contains([',', ':', '\\']) {
                    return Err(bad(format!("{key} {p:?}: empty, or with `,`, `:` or `\\`")));
                }
                let p = PathBuf::from(p);
                if p.is_relative() {
                    return Err(bad(format!(
                        "{key} {}: a relative path (an engine gives those when the absolute \
                         ones are too long for the mount options, with dozens of layers), \
                         relative to a directory the mount does not record",
                        p.display()
                    )));
                }
                Ok(p)
            };
            match key {
                "lowerdir" => {
                    if value.contains("::") {
                        return Err(bad("data-only lower layers (`::`)".into()));
                    }
                    lower = value.split(':').map(path).collect::<Result<_, _>>()?;
                }
                // One layer each, in order (mounted with fsconfig(2), as `lowerdir+=`).
                "lowerdir+" => lower.push(path(&value)?),
                "upperdir" => upper = Some(path(&value)?),
                "workdir" => work = Some(path(&value)?),
                "datadir+" => return Err(bad("data-only lower layers (`datadir+`)".into())),
                // Its sharing of the upper directory (the module docs), and what needs the
                // index.
                "index" | "nfs_export" => {}
                "ro" => flags |= MsFlags::MS_RDONLY,
                "rw" => {}
                _ => options.push(o.to_owned()),
            }
        }
        if lower.is_empty() {
            return Err(bad("no lowerdir".into()));
        }
        let upper = match (upper, work) {
            (Some(u), Some(w)) => Some((u, w)),
            (None, None) => None,
            _ => return Err(bad("an upperdir without a workdir, or the reverse".into())),
        };
        Ok(Overlay {
            at: m.at.clone(),
            flags,
            lower,
            upper,
            options,
        })
    }

    /// The work directory husk gives the new overlay for container `id`, inside the engine's.
    pub(crate) fn workdir(&self, id: &str) -> Option<PathBuf> {
        self.upper
            .as_ref()
            .map(|(_, work)| work.join(workdir_name(id)))
    }

    /// Its read-only, nosuid, nodev and noexec flags.
    pub(crate) fn flags(&self) -> MsFlags {
        self.flags
    }

    /// The directories whose idmapped views the new overlay needs, canonical, none below
    /// another: each lower layer, and the one directory holding the upper and work
    /// directories (overlayfs wants those on one mount).
    pub(crate) fn layer_dirs(&self) -> Result<Vec<PathBuf>, OverlayError> {
        let canonical = |dir: &Path| {
            dir.canonicalize().map_err(|source| OverlayError::Layer {
                dir: dir.to_owned(),
                source,
            })
        };
        let mut dirs = self
            .lower
            .iter()
            .map(|d| canonical(d))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some((upper, work)) = &self.upper {
            let (upper, work) = (canonical(upper)?, canonical(work)?);
            dirs.push(
                upper
                    .ancestors()
                    .find(|a| work.starts_with(a))
                    .unwrap_or(Path::new("/"))
                    .to_path_buf(),
            );
        }
        dirs.sort();
        dirs.dedup();
        // An ancestor's idmapped view covers what is below it (and a view cannot be idmapped
        // twice).
        let mut covering: Vec<PathBuf> = Vec::new();
        for dir in dirs {
            if !covering.iter().any(|c| dir.starts_with(c)) {
                covering.push(dir);
            }
        }
        Ok(covering)
    }

    /// The new overlay's mount options for container `id`: its layers, each path as `place`
    /// makes it (where the caller has the layer's idmapped view), husk's work directory, the
    /// index off, and the engine's other options.
    pub(crate) fn data(
        &self,
        id: &str,
        place: &dyn Fn(&Path) -> Result<PathBuf, OverlayError>,
    ) -> Result<String, OverlayError> {
        let canonical = |dir: &Path| {
            dir.canonicalize()
                .map_err(|source| OverlayError::Layer {
                    dir: dir.to_owned(),
                    source,
                })
                .and_then(|d| place(&d))
        };
        let mut data = self.options.clone();
        let lower = self
            .lower
            .iter()
            .map(|p| canonical(p).map(|p| p.display().to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        data.push(format!("lowerdir={}", lower.join(":")));
        if let (Some((upper, _)), Some(work)) = (&self.upper, self.workdir(id)) {
            data.push(format!("upperdir={}", canonical(upper)?.display()));
            // Made by now: canonical, it is where `place` puts it.
            data.push(format!("workdir={}", canonical(&work)?.display()));
        }
        data.push("index=off".into());
        Ok(data.join(","))
    }

    /// Mounts the new overlay at the place of the old (taken off by [`take_off`]), on
    /// idmapped views of its layers.
    pub fn mount_idmapped(&self, ns: &UserNs, map: IdMap, id: &str) -> Result<(), OverlayError> {
        for dir in self.layer_dirs()? {
            // Not its submounts (the engine's own mount point may be one): overlayfs does
            // not see a layer's submounts either.
            ns.idmap(&dir, false)?;
        }
        // The views cover the layers' own paths here.
        let data = self.data(id, &|p| Ok(p.to_owned()))?;
        as_namespace_root(map.base(), || {
            mount(
                Some("overlay"),
                &self.at,
                Some("overlay"),
                self.flags,
                Some(data.as_str()),
            )
        })?
        .map_err(|source| OverlayError::Mount {
            at: self.at.clone(),
            data,
            source,
        })
    }
}

pub(crate) fn workdir_name(id: &str) -> String {
    format!("husk-{id}")
}

/// The overlays at and below `share`: parsed, their work directories made and recorded in
/// `state_dir` (before the records are pinned). Fails, naming it, on an overlay that cannot be
/// remounted, or one with mounts below it.
pub fn find(share: &Path, state_dir: &Path, id: &str) -> Result<Vec<Overlay>, OverlayError> {
    let mounts = mountinfo::under(share).map_err(OverlayError::Mountinfo)?;
    let mut found = Vec::new();
    for m in mounts.iter().filter(|m| m.kind == "overlay") {
        if let Some(below) = mounts
            .iter()
            .find(|b| b.at != m.at && b.at.starts_with(&m.at))
        {
            return Err(OverlayError::MountBelow {
                at: m.at.clone(),
                kind: below.kind.clone(),
                below: below.at.clone(),
            });
        }
        found.push(Overlay::parse(m)?);
    }
    let workdirs: Vec<PathBuf> = found.iter().filter_map(|o| o.workdir(id)).collect();
    let record = workdirs
        .iter()
        .map(|w| format!("{}\n", w.display()))
        .collect::<String>();
    std::fs::write(state_dir.join(RECORD_FILE), record).map_err(|source| OverlayError::Record {
        what: "writing",
        path: state_dir.join(RECORD_FILE),
        source,
    })?;
    for w in &workdirs {
        match std::fs::create_dir(w) {
            Err(source) if source.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(OverlayError::Workdir {
                    dir: w.clone(),
                    source,
                });
            }
            _ => {}
        }
    }
    Ok(found)
}

/// The overlay mounted at `dir` itself, if any (the engine's rootfs, for a pod's later
/// container: see `super::member`). Fails, naming it, on one that cannot be mounted anew, or
/// one with mounts below it.
pub(crate) fn at(dir: &Path) -> Result<Option<Overlay>, OverlayError> {
    let dir = dir.canonicalize().map_err(|source| OverlayError::Layer {
        dir: dir.to_owned(),
        source,
    })?;
    let mounts = mountinfo::under(&dir).map_err(OverlayError::Mountinfo)?;
    // The last mount at `dir` is the one seen there.
    let Some(m) = mounts.iter().rev().find(|m| m.at == dir) else {
        return Ok(None);
    };
    if m.kind != "overlay" {
        return Ok(None);
    }
    if let Some(below) = mounts.iter().find(|b| b.at != dir) {
        return Err(OverlayError::MountBelow {
            at: dir.clone(),
            kind: below.kind.clone(),
            below: below.at.clone(),
        });
    }
    Overlay::parse(m).map(Some)
}

/// Takes the overlays off the share (they are mounted anew after the share is idmapped).
pub fn take_off(overlays: &[Overlay]) -> Result<(), OverlayError> {
    for o in overlays {
        umount2(&o.at, MntFlags::MNT_DETACH).map_err(|source| OverlayError::Unmount {
            at: o.at.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Runs `f` with the filesystem uid and gid of the namespace's root (host `base`) and the
/// capabilities kept, then goes back to root's.
pub(crate) fn as_namespace_root<T>(base: u32, f: impl FnOnce() -> T) -> Result<T, OverlayError> {
    use caps::CapSet;
    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(base));
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(base));
    // Leaving fsuid 0 clears the effective filesystem capabilities; they are still permitted.
    let raised = caps::read(None, CapSet::Permitted)
        .and_then(|permitted| caps::set(None, CapSet::Effective, &permitted))
        .map_err(OverlayError::Capabilities);
    let out = raised.map(|()| f());
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(0));
    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(0));
    out
}

/// Removes the work directories recorded in `state_dir` (`husk delete`, after the monitor and
/// its overlays are gone). Only directories named for this container are removed.
pub fn remove_workdirs(state_dir: &Path, id: &str) -> Result<(), OverlayError> {
    let record = state_dir.join(RECORD_FILE);
    let text = match std::fs::read_to_string(&record) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(OverlayError::Record {
                what: "reading",
                path: record,
                source,
            });
        }
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        let dir = Path::new(line);
        if dir.file_name() != Some(std::ffi::OsStr::new(&workdir_name(id))) || dir.is_relative() {
            return Err(OverlayError::NotAWorkdir {
                record,
                line: line.to_owned(),
                id: id.to_owned(),
            });
        }
        match std::fs::remove_dir_all(dir) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                return Err(OverlayError::RemoveWorkdir {
                    line: line.to_owned(),
                    source,
                });
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODMAN: &str = "1181 1170 0:121 / /run/husk/c1/share/rootfs rw,nodev,relatime - \
        overlay overlay rw,lowerdir=/var/lib/containers/storage/overlay/l/AB:/var/lib/\
        containers/storage/overlay/l/CD,upperdir=/var/lib/containers/storage/overlay/\
        e1/diff,workdir=/var/lib/containers/storage/overlay/e1/work,redirect_dir=nofollow,\
        index=on,uuid=on\n\
        1182 1170 8:1 /vol\\040a /run/husk/c1/share/mounts/0 ro,relatime - ext4 /dev/sda1 rw\n";

    #[test]
    fn an_overlay_is_read_from_its_mountinfo_line() {
        let mounts = mountinfo::parse(PODMAN);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[1].at, Path::new("/run/husk/c1/share/mounts/0"));
        assert_eq!(mounts[1].kind, "ext4");
        let o = Overlay::parse(&mounts[0]).unwrap();
        let storage = Path::new("/var/lib/containers/storage/overlay");
        assert_eq!(
            o,
            Overlay {
                at: "/run/husk/c1/share/rootfs".into(),
                flags: MsFlags::MS_NODEV,
                lower: vec![storage.join("l/AB"), storage.join("l/CD")],
                upper: Some((storage.join("e1/diff"), storage.join("e1/work"))),
                options: vec!["redirect_dir=nofollow".into(), "uuid=on".into()],
            }
        );
        assert_eq!(o.workdir("c1"), Some(storage.join("e1/work/husk-c1")));
    }

    #[test]
    fn an_overlay_that_cannot_be_remounted_is_refused_by_name() {
        let line = |opts: &str| format!("1 2 0:1 / /s/rootfs rw - overlay overlay {opts}\n");
        for (opts, says) in [
            ("rw,lowerdir=l/AB,upperdir=/u,workdir=/w", "relative path"),
            ("rw,lowerdir=/a::/b", "data-only"),
            ("rw,lowerdir+=/a,datadir+=/b", "data-only"),
            ("rw,lowerdir=/a\\054b", "`,`"),
            ("rw,upperdir=/u,workdir=/w", "no lowerdir"),
            ("rw,lowerdir=/a,upperdir=/u", "without a workdir"),
        ] {
            let mounts = mountinfo::parse(&line(opts));
            let err = Overlay::parse(&mounts[0]).unwrap_err().to_string();
            assert!(
                err.contains("/s/rootfs") && err.contains(says),
                "{opts}: {err}"
            );
        }
        // Layers given one by one (fsconfig), as this kernel shows them.
        let mounts = mountinfo::parse(&line(
            "rw,lowerdir+=/a,lowerdir+=/b,upperdir=/u,workdir=/w,uuid=on",
        ));
        let o = Overlay::parse(&mounts[0]).unwrap();
        assert_eq!(o.lower, [Path::new("/a"), Path::new("/b")]);
        assert_eq!(o.workdir("x"), Some(PathBuf::from("/w/husk-x")));
        // A lower-only overlay is read-only and needs no work directory.
        let mounts = mountinfo::parse(&line("ro,lowerdir=/a:/b"));
        let o = Overlay::parse(&mounts[0]).unwrap();
        assert_eq!((o.flags, o.workdir("x")), (MsFlags::MS_RDONLY, None));
    }

    #[test]
    fn only_a_recorded_work_directory_of_the_container_is_removed() {
        let tmp = std::env::temp_dir().join(format!("husk-ovl-rec-{}", std::process::id()));
        let state = tmp.join("state");
        let ours = tmp.join("work/husk-c1");
        std::fs::create_dir_all(ours.join("work")).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let keep = tmp.join("work/other");
        std::fs::create_dir_all(&keep).unwrap();
        remove_workdirs(&state, "c1").unwrap();
        std::fs::write(state.join(RECORD_FILE), format!("{}\n", keep.display())).unwrap();
        let err = remove_workdirs(&state, "c1").unwrap_err().to_string();
        assert!(
            err.contains("not a work directory of container c1"),
            "{err}"
        );
        assert!(keep.exists());
        std::fs::write(state.join(RECORD_FILE), format!("{}\n", ours.display())).unwrap();
        remove_workdirs(&state, "c1").unwrap();
        assert!(!ours.exists() && keep.exists());
        // Gone already: nothing to do.
        remove_workdirs(&state, "c1").unwrap();
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
