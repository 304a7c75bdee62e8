//! The spec's `linux.cgroupsPath`, read the way runc reads it (its `libcontainer/specconv`,
//! `cgroups/fs` and `cgroups/systemd`):
//!
//! - **cgroupfs** (the default): a path. Absolute (`/libpod_parent/libpod-ID`): below the root of
//!   each hierarchy, i.e. its mount point. Relative (`kubepods/pod1/ID`): below the cgroup the
//!   runtime itself runs in (on cgroup v2 below that cgroup's parent, which has no processes of
//!   its own, as runc does). Either is cleaned lexically first, so `..` never climbs above the
//!   hierarchy's root or the runtime's cgroup.
//! - **systemd** (`--systemd-cgroup`): `slice:prefix:name`, e.g. `system.slice:docker:ID`. The
//!   slice (default `system.slice`) is expanded the way systemd nests slices
//!   (`a-b.slice` is `a.slice/a-b.slice`), the unit is `prefix-name.scope` (or `name` itself
//!   when it is a `.slice`), and the cgroup is `<slice>/<unit>` below pid 1's cgroup (cgroup
//!   v1, without its `init.scope`) or below the root (v2). husk does not ask systemd to make the
//!   scope over D-Bus as runc does: it makes the directories on the cgroup filesystem itself,
//!   where runc's scope would be (see docs/conformance.md).

use std::path::{Component, Path, PathBuf};

/// A spec's `cgroupsPath`, parsed (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupsPath {
    /// cgroupfs, absolute: this path (made relative) below each hierarchy's root.
    Absolute(PathBuf),
    /// cgroupfs, relative: this path below the runtime's own cgroup.
    Relative(PathBuf),
    /// systemd: the expanded slice (relative) and the unit, below pid 1's cgroup.
    Systemd {
        /// The slice's cgroup, e.g. `system.slice` or `a.slice/a-b.slice`.
        slice: PathBuf,
        /// The unit, e.g. `docker-ID.scope`.
        unit: String,
    },
}

/// Where a hierarchy is and where the runtime and pid 1 are in it, relative to its mount point.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// The hierarchy's mount point.
    pub mount_point: &'a Path,
    /// The runtime's (this process's) cgroup.
    pub current: &'a Path,
    /// Pid 1's cgroup (systemd's slices are below it on v1).
    pub init: &'a Path,
    /// Whether it is the cgroup v2 hierarchy.
    pub v2: bool,
}

impl CgroupsPath {
    /// Parses `raw` as runc does, with `--systemd-cgroup` or without. The error says what is
    /// wrong with it, for a message that names the field.
    pub fn parse(raw: &str, systemd: bool) -> Result<CgroupsPath, String> {
        if systemd {
            return parse_systemd(raw);
        }
        let absolute = raw.starts_with('/');
        let inner = clean(raw);
        if inner.as_os_str().is_empty() {
            return Err(format!(
                "{raw:?} names the {} itself; the container needs a cgroup of its own",
                if absolute {
                    "root cgroup"
                } else {
                    "runtime's own cgroup"
                }
            ));
        }
        Ok(if absolute {
            CgroupsPath::Absolute(inner)
        } else {
            CgroupsPath::Relative(inner)
        })
    }

    /// The directory this path names in the hierarchy at `place`.
    pub fn dir(&self, place: Place<'_>) -> PathBuf {
        // Relative to the mount point, whatever the caller passed.
        let rel = |p: &'_ Path| p.strip_prefix("/").unwrap_or(p).to_path_buf();
        let (current, init) = (rel(place.current), rel(place.init));
        match self {
            CgroupsPath::Absolute(inner) => place.mount_point.join(inner),
            CgroupsPath::Relative(inner) => {
                let base = if place.v2 {
                    current.parent().unwrap_or(Path::new(""))
                } else {
                    &current
                };
                place.mount_point.join(base).join(inner)
            }
            CgroupsPath::Systemd { slice, unit } => {
                let mut dir = place.mount_point.to_path_buf();
                if !place.v2 {
                    let init = if init.file_name().is_some_and(|n| n == "init.scope") {
                        init.parent().unwrap_or(Path::new(""))
                    } else {
                        &init
                    };
                    dir.push(init);
                }
                dir.join(slice).join(unit)
            }
        }
    }
}

/// `slice:prefix:name` (see the module docs).
fn parse_systemd(raw: &str) -> Result<CgroupsPath, String> {
    let parts: Vec<&str> = raw.split(':').collect();
    let [slice, prefix, name] = parts[..] else {
        return Err(format!(
            "{raw:?} is not \"slice:prefix:name\", the form --systemd-cgroup reads"
        ));
    };
    for (what, part) in [("prefix", prefix), ("name", name)] {
        if part.contains('/') || part == "." || part == ".." {
            return Err(format!("{raw:?}: the {what} {part:?} is not a unit name"));
        }
    }
    if name.is_empty() {
        return Err(format!("{raw:?}: the name is empty"));
    }
    let slice = expand_slice(if slice.is_empty() {
        "system.slice"
    } else {
        slice
    })
    .map_err(|why| format!("{raw:?}: {why}"))?;
    let unit = if name.ends_with(".slice") {
        // A slice of its own, validated like the parent.
        expand_slice(name).map_err(|why| format!("{raw:?}: {why}"))?;
        name.to_owned()
    } else {
        format!("{prefix}-{name}.scope")
    };
    Ok(CgroupsPath::Systemd { slice, unit })
}

/// systemd's nesting of slices: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`, `-.slice`
/// is the root.
fn expand_slice(slice: &str) -> Result<PathBuf, String> {
    let invalid = || format!("{slice:?} is not a slice name (like \"system.slice\")");
    let name = slice.strip_suffix(".slice").ok_or_else(invalid)?;
    if name.is_empty() || slice.contains('/') {
        return Err(invalid());
    }
    if name == "-" {
        return Ok(PathBuf::new());
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for component in name.split('-') {
        if component.is_empty() {
            return Err(invalid());
        }
        path.push(format!("{prefix}{component}.slice"));
        prefix.push_str(component);
        prefix.push('-');
    }
    Ok(path)
}

/// `path` cleaned lexically and made relative: `.` dropped, `..` taking away the component
/// before it and nothing at the top (runc's `CleanPath`, which keeps a path from climbing out).
fn clean(path: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place<'a>(current: &'a str, init: &'a str, v2: bool) -> Place<'a> {
        Place {
            mount_point: Path::new(if v2 {
                "/sys/fs/cgroup"
            } else {
                "/sys/fs/cgroup/memory"
            }),
            current: Path::new(current),
            init: Path::new(init),
            v2,
        }
    }

    #[test]
    fn cgroupfs_paths_absolute_and_relative() {
        let abs = CgroupsPath::parse("/libpod_parent/libpod-abc", false).unwrap();
        assert_eq!(
            abs,
            CgroupsPath::Absolute("libpod_parent/libpod-abc".into())
        );
        assert_eq!(
            abs.dir(place("process_api/x", "", false)),
            Path::new("/sys/fs/cgroup/memory/libpod_parent/libpod-abc")
        );
        let rel = CgroupsPath::parse("kubepods/pod1/c1", false).unwrap();
        // v1: below the runtime's own cgroup.
        assert_eq!(
            rel.dir(place("process_api/x", "", false)),
            Path::new("/sys/fs/cgroup/memory/process_api/x/kubepods/pod1/c1")
        );
        // v2: below its parent (the runtime's own has processes, as runc reasons).
        assert_eq!(
            rel.dir(place("user.slice/session-1.scope", "", true)),
            Path::new("/sys/fs/cgroup/user.slice/kubepods/pod1/c1")
        );
    }

    #[test]
    fn dot_dot_never_climbs_out() {
        assert_eq!(
            CgroupsPath::parse("/../../etc/x", false).unwrap(),
            CgroupsPath::Absolute("etc/x".into())
        );
        assert_eq!(
            CgroupsPath::parse("../../a/./b/../c", false).unwrap(),
            CgroupsPath::Relative("a/c".into())
        );
        for raw in ["/", "..", "/a/..", ".", ""] {
            let e = CgroupsPath::parse(raw, false).unwrap_err();
            assert!(e.contains("of its own"), "{raw:?}: {e}");
        }
    }

    #[test]
    fn a_colon_path_without_systemd_is_a_relative_cgroupfs_path_as_in_runc() {
        assert_eq!(
            CgroupsPath::parse("system.slice:docker:abc", false).unwrap(),
            CgroupsPath::Relative("system.slice:docker:abc".into())
        );
    }

    #[test]
    fn systemd_paths_expand_their_slices() {
        let p = CgroupsPath::parse("system.slice:docker:abc", true).unwrap();
        assert_eq!(
            p,
            CgroupsPath::Systemd {
                slice: "system.slice".into(),
                unit: "docker-abc.scope".into()
            }
        );
        // v1: below pid 1's cgroup, without its init.scope; v2: below the root.
        assert_eq!(
            p.dir(place("x", "/init.scope", false)),
            Path::new("/sys/fs/cgroup/memory/system.slice/docker-abc.scope")
        );
        assert_eq!(
            p.dir(place("x", "outer", false)),
            Path::new("/sys/fs/cgroup/memory/outer/system.slice/docker-abc.scope")
        );
        assert_eq!(
            p.dir(place("x", "outer", true)),
            Path::new("/sys/fs/cgroup/system.slice/docker-abc.scope")
        );
        let nested =
            CgroupsPath::parse("kubepods-burstable-pod1.slice:cri-containerd:c1", true).unwrap();
        assert_eq!(
            nested,
            CgroupsPath::Systemd {
                slice: "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice"
                    .into(),
                unit: "cri-containerd-c1.scope".into()
            }
        );
        // The default slice, and a slice as the unit.
        assert_eq!(
            CgroupsPath::parse(":runc:c1", true).unwrap(),
            CgroupsPath::Systemd {
                slice: "system.slice".into(),
                unit: "runc-c1.scope".into()
            }
        );
        assert_eq!(
            CgroupsPath::parse("-.slice:x:my.slice", true).unwrap(),
            CgroupsPath::Systemd {
                slice: "".into(),
                unit: "my.slice".into()
            }
        );
    }

    #[test]
    fn bad_systemd_paths_are_refused_saying_why() {
        for (raw, why) in [
            ("/libpod_parent/x", "slice:prefix:name"),
            ("a:b", "slice:prefix:name"),
            ("a.slice:b:c:d", "slice:prefix:name"),
            ("system:docker:abc", "not a slice name"),
            ("a--b.slice:docker:abc", "not a slice name"),
            ("system.slice:docker:", "name is empty"),
            ("system.slice:docker:../../x", "not a unit name"),
            ("system.slice:../x:abc", "not a unit name"),
            ("system.slice:p:bad-.slice", "not a slice name"),
        ] {
            let e = CgroupsPath::parse(raw, true).unwrap_err();
            assert!(e.contains(why), "{raw:?}: {e}");
        }
    }
}
