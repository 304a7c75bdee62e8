//! The host's cgroups as an engine reads them: where a process is in each hierarchy, and the
//! files of a cgroup. Also the numbers husk adds to a spec's limits on the host (its
//! `monitor::cgroup::limits`), which a test checks the files against.

use std::path::{Path, PathBuf};

/// What the guest kernel needs beyond the container's memory limit (husk's
/// `GUEST_OVERHEAD_MIB`): a VM is the limit plus this.
pub const GUEST_OVERHEAD_MIB: u64 = 64;

/// What the VMM needs beyond the guest's RAM (husk's `VMM_OVERHEAD_MIB`).
pub const VMM_OVERHEAD_MIB: u64 = 64;

/// The monitor's own tasks besides its vCPUs (husk's `MONITOR_TASKS`).
pub const MONITOR_TASKS: u64 = 64;

/// The host memory limit husk sets for a container with memory limit `limit` bytes (its VM
/// sized by that limit).
pub fn host_memory_limit(limit: u64) -> u64 {
    limit.div_ceil(1 << 20) * (1 << 20) + ((GUEST_OVERHEAD_MIB + VMM_OVERHEAD_MIB) << 20)
}

/// The directory of `pid`'s cgroup in the hierarchy of `controller` (a v1 controller, or ""
/// for the v2 hierarchy), found as engines find it: `/proc/PID/cgroup` and this process's
/// mount table.
pub fn cgroup_of(pid: u32, controller: &str) -> Option<PathBuf> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_owned())
    })?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (root, at) = (*left.get(3)?, *left.get(4)?);
        let (fstype, options) = (*right.first()?, *right.get(2)?);
        let matches = if controller.is_empty() {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup" && options.split(',').any(|o| o == controller)
        };
        let rel = Path::new(&path).strip_prefix(root).ok()?;
        matches.then(|| Path::new(at).join(rel))
    })
}

/// The mount point of the v1 hierarchy of `controller` (or of v2 for "").
pub fn mount_point(controller: &str) -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let at = left.split(' ').nth(4)?;
        let right: Vec<&str> = right.split(' ').collect();
        let matches = if controller.is_empty() {
            *right.first()? == "cgroup2"
        } else {
            *right.first()? == "cgroup" && right.get(2)?.split(',').any(|o| o == controller)
        };
        matches.then(|| PathBuf::from(at))
    })
}

/// Whether the host has v1 hierarchies (a hybrid or legacy host), the setup these helpers and
/// the tests that use them check in detail.
pub fn is_v1() -> bool {
    mount_point("memory").is_some()
}

/// The trimmed content of `dir/file`, or a panic naming it.
pub fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.join(file).display()))
        .trim()
        .to_owned()
}

/// The threads (host tids) of process `pid`.
pub fn threads_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// The threads in the v1 cgroup `dir` (its `tasks` file).
pub fn tasks_in(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("tasks"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The threads in the v1 cgroup `dir` and every cgroup below it.
pub fn tasks_below(dir: &Path) -> Vec<u32> {
    let mut tasks = tasks_in(dir);
    for sub in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if sub.file_type().is_ok_and(|t| t.is_dir()) {
            tasks.extend(tasks_below(&sub.path()));
        }
    }
    tasks
}

/// The threads of `pid` named `vcpu<N>`: the VM's vCPUs in a monitor.
pub fn vcpu_threads(pid: u32) -> Vec<u32> {
    threads_of(pid)
        .into_iter()
        .filter(|t| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{t}/comm"))
                .is_ok_and(|c| c.starts_with("vcpu"))
        })
        .collect()
}

/// The CPUs thread `tid` of `pid` may run on (`Cpus_allowed_list`).
pub fn cpus_allowed(pid: u32, tid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// Removes the cgroup `name` (relative to each hierarchy's root, or to this process's cgroup
/// with `relative`) and its children in every hierarchy, deepest first: what a test made as a
/// parent of its containers' cgroups.
pub fn remove_tree(name: &str, relative: bool) {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in own.lines() {
        let Some(controllers) = line.split(':').nth(1) else {
            continue;
        };
        if controllers.starts_with("name=") {
            continue;
        }
        let controller = controllers.split(',').next().unwrap_or("");
        let base = if relative {
            cgroup_of(std::process::id(), controller)
        } else {
            mount_point(controller)
        };
        if let Some(base) = base {
            remove_dir_tree(&base.join(name));
        }
    }
}

fn remove_dir_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_dir_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Checks an engine's view of a husk container with memory limit `limit`: `stats` (what
/// `what`, e.g. `docker stats`, printed as the memory use, "12.3MiB / 428MiB") shows memory
/// in use; where the host has v1 hierarchies, the VM's monitor `pid` is in the engine's cgroup
/// of container `id` (its name holds the id) in the memory, pids and cpu hierarchies, bounded
/// there at what the VM needs ([`host_memory_limit`]). Returns those directories; `None` on a
/// v2 host, where only the stats are checked.
pub fn check_engine_cgroup(
    what: &str,
    stats: &str,
    pid: u32,
    id: &str,
    limit: u64,
) -> Option<[PathBuf; 3]> {
    let used: f64 = stats
        .trim()
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|w| !w.is_empty())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("{what}: {stats}"));
    assert!(used > 0.0, "{what}: {stats}");
    if !is_v1() {
        return None;
    }
    let dirs = ["memory", "pids", "cpu"].map(|c| cgroup_of(pid, c).unwrap());
    for dir in &dirs {
        assert!(
            dir.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(id)),
            "the monitor is in {}, not the engine's cgroup of {id}",
            dir.display(),
        );
    }
    assert_eq!(
        read(&dirs[0], "memory.limit_in_bytes"),
        host_memory_limit(limit).to_string()
    );
    Some(dirs)
}
