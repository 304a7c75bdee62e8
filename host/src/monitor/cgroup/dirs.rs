//! The cgroup directories themselves: made level by level (a v1 cpuset gets CPUs and memory
//! nodes, v2 levels hand their controllers down), entered by this process, and removed by
//! `husk delete` once the processes in them are gone.

use std::path::Path;
use std::time::{Duration, Instant};

use super::error::CgroupError;
use super::hierarchy::Hierarchy;
use super::record::Record;

/// Creates `dir` and the levels above it that are missing, from the hierarchy's mount point
/// down; a v1 cpuset level gets its parent's CPUs and memory nodes when it has none, and on v2
/// (`controllers`) each level above `dir` hands its controllers down so that `dir` has their
/// files (a level that cannot, having processes of its own, is left: a limit whose file is then
/// missing fails naming it).
pub(super) fn make(dir: &Path, h: &Hierarchy, controllers: bool) -> Result<(), CgroupError> {
    let rel = dir.strip_prefix(&h.mount_point).unwrap_or(dir);
    let mut level = h.mount_point.clone();
    for component in rel.components() {
        if h.v2 && controllers {
            enable_controllers(&level);
        }
        level.push(component);
        match std::fs::create_dir(&level) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(CgroupError::Create { dir: level, source });
            }
        }
        if h.cpuset {
            inherit_cpuset(&level)?;
        }
    }
    Ok(())
}

/// Enables, for the children of the v2 cgroup `dir`, the controllers husk's limits use that
/// `dir` has (best effort, see [`make`]).
fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let wanted: Vec<String> = ["cpu", "cpuset", "memory", "pids"]
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .filter(|c| !enabled.split_whitespace().any(|a| a == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if !wanted.is_empty() {
        let _ = std::fs::write(dir.join("cgroup.subtree_control"), wanted.join(" "));
    }
}

/// Moves this process (all its threads) into the cgroup `dir`.
pub(super) fn enter(dir: &Path) -> Result<(), CgroupError> {
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

/// Removes the cgroups the record in `state_dir` lists (their processes must be gone). A
/// cgroup whose last task is still exiting is busy for a moment: retried for up to a second.
pub fn remove(state_dir: &Path) -> Result<(), CgroupError> {
    let record = Record::load(state_dir)?;
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut failed = Vec::new();
    for dir in &record.dirs {
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
