//! The monitor's own cgroup: `husk/<id>` below the cgroup it was started in, in every cgroup v1
//! hierarchy that has controllers (or in the v2 hierarchy on a v2-only host). The engine's
//! accounting and limits for the process that ran `husk create` still apply (it is a child of
//! that cgroup); the monitor's own directory lets an administrator see and limit each VM, and
//! tells them apart from the engine. The directories are listed in `<state dir>/cgroups`, so
//! that `husk delete` removes them once the monitor is gone (a process cannot remove the
//! cgroup it is in).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The file in the state directory that lists the monitor's cgroup directories.
pub const RECORD_FILE: &str = "cgroups";

/// Why the monitor's cgroups could not be made, joined or removed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A file of `/proc` or of a cgroup, or the record, could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The record, or a cpuset's CPUs or memory nodes, could not be written.
    #[error("writing {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A cgroup directory could not be made (a read-only hierarchy, say).
    #[error("creating the cgroup {dir}")]
    Create {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The monitor could not be moved into its cgroup.
    #[error("moving the monitor into {dir}")]
    Join {
        /// The cgroup.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Some recorded cgroups could not be removed (each with why, in the message).
    #[error("removing the cgroups {0}")]
    Remove(String),
}

/// Where a hierarchy is mounted and which cgroup of it this process is in.
#[derive(Debug, PartialEq, Eq)]
struct Hierarchy {
    /// The mount point (the cgroup directory of the mount's root).
    mount_point: PathBuf,
    /// This process's cgroup, relative to the mount point.
    current: PathBuf,
    /// Whether it is the v1 cpuset hierarchy (a new cpuset starts with no CPUs and memory
    /// nodes, and a process cannot join it until it has some).
    cpuset: bool,
}

/// The hierarchies to join, from `/proc/self/cgroup` and `/proc/self/mountinfo`: every v1
/// hierarchy with controllers (named ones like `name=systemd` belong to their manager), and
/// the v2 hierarchy only when there is no v1 controller (on a hybrid host v2 is systemd's).
fn hierarchies(proc_cgroup: &str, mountinfo: &str) -> Vec<Hierarchy> {
    let mut v1 = Vec::new();
    let mut v2 = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            v2 = mount_of(mountinfo, "cgroup2", &[], path);
            continue;
        }
        let wanted: Vec<&str> = controllers.split(',').collect();
        if wanted.iter().any(|c| c.starts_with("name=")) {
            continue;
        }
        if let Some(mut h) = mount_of(mountinfo, "cgroup", &wanted, path) {
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
/// v1) under which this process's cgroup `path` is visible.
fn mount_of(mountinfo: &str, fstype: &str, controllers: &[&str], path: &str) -> Option<Hierarchy> {
    for m in super::mountinfo::parse(mountinfo) {
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
        return Some(Hierarchy {
            mount_point: m.at,
            current: rel.to_path_buf(),
            cpuset: false,
        });
    }
    None
}

/// Creates `husk/<id>` in each hierarchy, records them in the state directory and moves this
/// process (all of its threads) there. Returns the directories it joined. A host without a
/// cgroup hierarchy gives none; a hierarchy the monitor cannot write (mounted read-only, as in
/// some containers) is skipped with a log line: the cgroup is an administrator's handle, not
/// what confines the monitor.
pub fn join(id: &str, state_dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let read = |p: &str| {
        std::fs::read_to_string(p).map_err(|source| CgroupError::Read {
            path: p.into(),
            source,
        })
    };
    let found = hierarchies(&read("/proc/self/cgroup")?, &read(super::mountinfo::PATH)?);
    let dirs: Vec<(PathBuf, &Hierarchy)> = found
        .iter()
        .map(|h| (h.mount_point.join(&h.current).join("husk").join(id), h))
        .collect();
    // Recorded first: whatever gets created below is removed by `delete`, even if joining fails.
    let record: String = dirs
        .iter()
        .map(|(d, _)| format!("{}\n", d.display()))
        .collect();
    let record_path = state_dir.join(RECORD_FILE);
    std::fs::write(&record_path, record).map_err(|source| CgroupError::Write {
        path: record_path,
        source,
    })?;
    let mut joined = Vec::new();
    for (dir, h) in &dirs {
        match enter(dir, h.cpuset) {
            Ok(()) => joined.push(dir.clone()),
            Err(e) => eprintln!(
                "husk monitor: no cgroup of its own: {}",
                crate::error_chain(&e)
            ),
        }
    }
    Ok(joined)
}

/// Creates `dir` (and its parent `husk`) and moves this process into it.
fn enter(dir: &Path, cpuset: bool) -> Result<(), CgroupError> {
    for level in [dir.parent().unwrap_or(dir), dir] {
        match std::fs::create_dir(level) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(CgroupError::Create {
                    dir: level.to_owned(),
                    source,
                });
            }
        }
        if cpuset {
            inherit_cpuset(level)?;
        }
    }
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string()).map_err(|source| CgroupError::Join {
        dir: dir.to_owned(),
        source,
    })
}

/// Gives an empty v1 cpuset its parent's CPUs and memory nodes.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(file);
        let current = std::fs::read_to_string(&own).unwrap_or_default();
        if !current.trim().is_empty() {
            continue;
        }
        let from =
            std::fs::read_to_string(parent.join(file)).map_err(|source| CgroupError::Read {
                path: parent.join(file),
                source,
            })?;
        std::fs::write(&own, from.trim())
            .map_err(|source| CgroupError::Write { path: own, source })?;
    }
    Ok(())
}

/// Removes the cgroups the record in `state_dir` lists (the monitor must be gone). A cgroup
/// whose last task is still exiting is busy for a moment: retried for up to a second.
pub fn remove(state_dir: &Path) -> Result<(), CgroupError> {
    let record_path = state_dir.join(RECORD_FILE);
    let record = match std::fs::read_to_string(&record_path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CgroupError::Read {
                path: record_path,
                source,
            });
        }
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut failed = Vec::new();
    for dir in record.lines().filter(|l| !l.is_empty()).map(Path::new) {
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    failed.push(format!("{}: {e}", dir.display()));
                    break;
                }
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CgroupError::Remove(failed.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
24 29 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
36 31 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
37 31 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
38 31 0:33 /outer /sys/fs/cgroup/cpuset rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,cpuset
";

    #[test]
    fn v1_hierarchies_with_controllers_are_joined_below_the_current_cgroup() {
        let cgroup = "\
5:cpuset:/outer/inner
4:memory:/process_api/abc
3:cpu,cpuacct:/
1:name=systemd:/user.slice
0::/user.slice
";
        let h = hierarchies(cgroup, MOUNTINFO_V1);
        assert_eq!(
            h,
            vec![
                Hierarchy {
                    mount_point: "/sys/fs/cgroup/cpuset".into(),
                    current: "inner".into(),
                    cpuset: true,
                },
                Hierarchy {
                    mount_point: "/sys/fs/cgroup/memory".into(),
                    current: "process_api/abc".into(),
                    cpuset: false,
                },
                Hierarchy {
                    mount_point: "/sys/fs/cgroup/cpu,cpuacct".into(),
                    current: "".into(),
                    cpuset: false,
                },
            ]
        );
    }

    #[test]
    fn a_v2_only_host_uses_the_unified_hierarchy() {
        let mountinfo = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let h = hierarchies("0::/system.slice/x.service\n", mountinfo);
        assert_eq!(
            h,
            vec![Hierarchy {
                mount_point: "/sys/fs/cgroup".into(),
                current: "system.slice/x.service".into(),
                cpuset: false,
            }]
        );
    }

    #[test]
    fn no_cgroup_mounts_means_no_cgroups() {
        assert!(
            hierarchies(
                "4:memory:/\n0::/\n",
                "24 29 0:22 / /sys rw - sysfs sysfs rw\n"
            )
            .is_empty()
        );
    }

    #[test]
    fn remove_without_a_record_does_nothing_and_removes_listed_directories() {
        let dir = std::env::temp_dir().join(format!("husk-cgroup-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        remove(&dir).unwrap();
        let fake = dir.join("fake-cgroup");
        std::fs::create_dir(&fake).unwrap();
        std::fs::write(dir.join(RECORD_FILE), format!("{}\n", fake.display())).unwrap();
        remove(&dir).unwrap();
        assert!(!fake.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
