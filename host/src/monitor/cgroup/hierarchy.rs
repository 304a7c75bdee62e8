//! The cgroup hierarchies of this host that a container's cgroup goes into, read from
//! `/proc/self/cgroup`, pid 1's and `/proc/self/mountinfo`: which are mounted where, and
//! where this process (and pid 1, for systemd's slices) is in each. Text in, hierarchies
//! out, so that the tests feed it v1, v2 and hybrid hosts.

use std::path::{Path, PathBuf};

/// Where a hierarchy is mounted and which cgroups of it this process and pid 1 are in.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Hierarchy {
    /// The mount point (the cgroup directory of the mount's root).
    pub(super) mount_point: PathBuf,
    /// This process's cgroup, relative to the mount point.
    pub(super) current: PathBuf,
    /// Pid 1's cgroup, relative to the mount point (empty when it is outside of it).
    pub(super) init: PathBuf,
    /// Whether it is the v1 cpuset hierarchy (a new cpuset starts with no CPUs and memory
    /// nodes, and a process cannot join it until it has some).
    pub(super) cpuset: bool,
    /// Whether it is the v2 hierarchy.
    pub(super) v2: bool,
}

/// The hierarchies to join, from `/proc/self/cgroup` (and pid 1's, `proc_1_cgroup`) and
/// `/proc/self/mountinfo`: every v1 hierarchy with controllers (named ones like
/// `name=systemd` belong to their manager), and the v2 hierarchy only when there is no v1
/// controller (on a hybrid host v2 is systemd's).
pub(super) fn hierarchies(
    proc_cgroup: &str,
    proc_1_cgroup: &str,
    mountinfo: &str,
) -> Vec<Hierarchy> {
    let init_of = |controllers: &str| {
        proc_1_cgroup.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, c, p) = (parts.next()?, parts.next()?, parts.next()?);
            (c == controllers).then(|| p.to_owned())
        })
    };
    let mut v1 = Vec::new();
    let mut v2 = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let init = init_of(controllers).unwrap_or_default();
        if controllers.is_empty() {
            v2 = mount_of(mountinfo, "cgroup2", &[], path, &init);
            continue;
        }
        let wanted: Vec<&str> = controllers.split(',').collect();
        if wanted.iter().any(|c| c.starts_with("name=")) {
            continue;
        }
        if let Some(mut h) = mount_of(mountinfo, "cgroup", &wanted, path, &init) {
            h.cpuset = wanted.contains(&"cpuset");
            v1.push(h);
        }
    }
    if v1.is_empty() {
        v2.into_iter().collect()
    } else {
        v1
    }
}

/// The mount of a hierarchy (`fstype`, with exactly the `controllers` among its options for
/// v1) under which this process's cgroup `path` is visible; `init` is pid 1's.
fn mount_of(
    mountinfo: &str,
    fstype: &str,
    controllers: &[&str],
    path: &str,
    init: &str,
) -> Option<Hierarchy> {
    for m in crate::monitor::mountinfo::parse(mountinfo) {
        if m.kind != fstype {
            continue;
        }
        let super_options: Vec<&str> = m.super_options.split(',').collect();
        if fstype == "cgroup" && !controllers.iter().all(|c| super_options.contains(c)) {
            continue;
        }
        let Ok(rel) = Path::new(path).strip_prefix(&m.root) else {
            continue;
        };
        let init = Path::new(init)
            .strip_prefix(&m.root)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        return Some(Hierarchy {
            mount_point: m.at,
            current: rel.to_path_buf(),
            init,
            cpuset: false,
            v2: fstype == "cgroup2",
        });
    }
    None
}
