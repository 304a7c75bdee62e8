//! What the harness reads of the host to tell what a pod left behind: processes, mounts,
//! cgroups.

use std::path::{Path, PathBuf};

/// The start time of process `pid` (clock ticks after boot), `None` when it is gone.
pub(super) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command (in parentheses, which may hold spaces): state is field 3, so the
    // start time (field 22) is the 20th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Process `pid`'s command line, spaces between the arguments.
pub(super) fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

/// The mount points at or under `dir`.
pub(super) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// `name` in each of this process's cgroups (one per hierarchy: every v1 controller's and
/// the unified one), whether it exists or not.
pub(super) fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mounts: Vec<Vec<&str>> = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 3 && (f[2] == "cgroup" || f[2] == "cgroup2"))
        .collect();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    own.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let mount = mounts.iter().find(|f| {
                if controllers.is_empty() {
                    f[2] == "cgroup2"
                } else {
                    f[2] == "cgroup"
                        && controllers
                            .split(',')
                            .all(|c| f[3].split(',').any(|o| o == c))
                }
            })?;
            Some(
                PathBuf::from(mount[1])
                    .join(path.trim_start_matches('/'))
                    .join(name),
            )
        })
        .collect()
}

/// What kubelet does before RunPodSandbox: makes the pod's cgroup `name` (relative to this
/// process's cgroups) and bounds its memory at `memory` bytes, its pod-level limit. Only the
/// v1 memory hierarchy: the one whose limit the tests read (kubelet also sets cpu and pids).
pub(super) fn make_pod_cgroup(name: &str, memory: u64) {
    if !crate::cgroups::is_v1() {
        return;
    }
    let Some(own) = crate::cgroups::cgroup_of(std::process::id(), "memory") else {
        return;
    };
    let dir = own.join(name);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("making the pod's cgroup {}: {e}", dir.display()));
    std::fs::write(dir.join("memory.limit_in_bytes"), memory.to_string())
        .unwrap_or_else(|e| panic!("bounding the pod's cgroup {}: {e}", dir.display()));
}

/// The directories in `dir`.
pub(super) fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Removes the cgroup `dir` and every cgroup below it, deepest first (a cgroup's files go
/// with it: rmdir, not unlink).
pub(super) fn remove_cgroup_tree(dir: &Path) {
    for sub in subdirs(dir) {
        remove_cgroup_tree(&sub);
    }
    let _ = std::fs::remove_dir(dir);
}
