//! The container's cgroup v2 in the guest: limits from `linux.resources`, membership, stats.
//!
//! Inside the VM husk-init owns the whole hierarchy, so the container's cgroup is always
//! `<root>/container` whatever `cgroupsPath` says (that path names a host cgroup, which the
//! monitor process itself lives in). With a cgroup namespace the container sees it as `/`.
//!
//! `cpu.cpus` and `cpu.mems` name *host* CPUs and memory nodes. The host sizes the VM from the
//! number of CPUs listed (and pins the vCPUs to them); in the guest the container gets as many
//! of the guest's own CPUs, by position: the n-th CPU of the spec's list is the guest's n-th
//! online CPU, so `"2-3"` and `"0,2"` both become `"0-1"` in a VM with two vCPUs. A list longer
//! than the guest has CPUs (a VM sized by the `io.husk.vm.vcpus` annotation) gets them all.
//! Memory nodes map the same way (the VM has one node, 0).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use husk_proto::ContainerStats;
use oci_spec::runtime::LinuxResources;

/// The name of the container's cgroup under the hierarchy root.
const NAME: &str = "container";

/// The swap limit, which exists only where the kernel has swap.
const SWAP_MAX: &str = "memory.swap.max";

/// One limit file and the value to write into it.
type Setting = (&'static str, String);

/// The container's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

/// Whether `root` is a mounted cgroup v2 hierarchy.
pub fn is_cgroup2(root: &Path) -> bool {
    nix::sys::statfs::statfs(root)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// The CPUs and memory nodes this kernel has online, in its own numbering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Online CPU ids, ascending.
    pub cpus: Vec<u32>,
    /// Online memory node ids, ascending.
    pub mems: Vec<u32>,
}

impl Topology {
    /// Read from sysfs. A kernel without NUMA has no node directory: one node, 0.
    pub fn current() -> Self {
        let read = |path: &str, default: &str| {
            let text = fs::read_to_string(path).unwrap_or_else(|_| default.to_string());
            expand_id_list(text.trim()).unwrap_or_else(|| vec![0])
        };
        Self {
            cpus: read("/sys/devices/system/cpu/online", "0"),
            mems: read("/sys/devices/system/node/online", "0"),
        }
    }
}

/// The number of ids in a list like `0-3,5` (`None`: malformed, or a count over `u64`).
fn count_ids(list: &str) -> Option<u64> {
    let mut n: u64 = 0;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let count = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                b.checked_sub(a)?.checked_add(1)?
            }
            None => {
                part.parse::<u64>().ok()?;
                1
            }
        };
        n = n.checked_add(count)?;
    }
    (n > 0).then_some(n)
}

/// The ids of a short list the kernel wrote (sysfs' `online` files).
fn expand_id_list(list: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<u32>().ok()?..=b.parse::<u32>().ok()?),
            None => out.push(part.parse().ok()?),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// `ids` (ascending) as a list with ranges: `[0, 1, 2, 5]` → `"0-2,5"`.
fn format_id_list(ids: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            ids[i].to_string()
        } else {
            format!("{}-{}", ids[i], ids[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// The guest's share of a host id list (see the module doc): as many of `online` as the list
/// names, from the first.
fn to_guest_ids(field: &str, list: &str, online: &[u32]) -> Result<String, String> {
    let n = count_ids(list).ok_or_else(|| {
        format!("linux.resources.cpu.{field} {list:?} is not a list like \"0-3,5\"")
    })?;
    let take = usize::try_from(n).unwrap_or(usize::MAX).min(online.len());
    Ok(format_id_list(&online[..take]))
}

/// Turns `linux.resources` into cgroup v2 file writes (runc's conversions), with CPU and
/// memory node lists in the numbering of `topology`.
pub fn settings(res: &LinuxResources, topology: &Topology) -> Result<Vec<Setting>, String> {
    let mut out: Vec<Setting> = Vec::new();
    if let Some(mem) = res.memory() {
        if let Some(limit) = mem.limit() {
            out.push(("memory.max", max_or(limit)));
            if let Some(swap) = mem.swap() {
                // OCI swap is memory+swap; v2 counts swap alone.
                let v = if swap < 0 || limit < 0 {
                    "max".to_string()
                } else if swap < limit {
                    return Err(format!(
                        "linux.resources.memory.swap ({swap}) is below memory.limit ({limit})"
                    ));
                } else {
                    (swap - limit).to_string()
                };
                out.push((SWAP_MAX, v));
            }
        }
        if let Some(r) = mem.reservation() {
            out.push(("memory.low", max_or(r)));
        }
    }
    if let Some(cpu) = res.cpu() {
        if let Some(shares) = cpu.shares()
            && shares > 0
        {
            // runc's shares→weight mapping: [2, 262144] → [1, 10000].
            let weight = 1 + ((shares.saturating_sub(2)) * 9999) / 262_142;
            out.push(("cpu.weight", weight.min(10_000).to_string()));
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            let period = cpu.period().unwrap_or(100_000);
            out.push(("cpu.max", format!("{quota} {period}")));
        }
        if let Some(cpus) = cpu.cpus().as_ref().filter(|s| !s.trim().is_empty()) {
            out.push(("cpuset.cpus", to_guest_ids("cpus", cpus, &topology.cpus)?));
        }
        if let Some(mems) = cpu.mems().as_ref().filter(|s| !s.trim().is_empty()) {
            out.push(("cpuset.mems", to_guest_ids("mems", mems, &topology.mems)?));
        }
    }
    // A pids limit of 0 is "not set" in runc (it would otherwise forbid every fork).
    if let Some(pids) = res.pids().filter(|p| p.limit() != 0) {
        out.push(("pids.max", max_or(pids.limit())));
    }
    // Weight 0 is "not set" (Docker always sends blockIO.weight, 0 by default), as in runc.
    if let Some(weight) = res
        .block_io()
        .as_ref()
        .and_then(|b| b.weight())
        .filter(|w| *w != 0)
    {
        // blkio weight [10, 1000] → io.weight [1, 10000].
        let w = 1 + (u64::from(weight).saturating_sub(10) * 9999) / 990;
        out.push(("io.weight", format!("default {w}")));
    }
    Ok(out)
}

fn max_or(v: i64) -> String {
    if v < 0 { "max".into() } else { v.to_string() }
}

impl Cgroup {
    /// The cgroup directory of the VM's container number `n`: `container` for the first (the
    /// only one, or a pod's sandbox), `container-<n>` for a pod's others.
    pub fn name(n: u32) -> String {
        match n {
            0 => NAME.to_owned(),
            n => format!("{NAME}-{n}"),
        }
    }

    /// Creates the cgroup `name` under `root` and applies `resources`.
    pub fn create(
        root: &Path,
        name: &str,
        resources: Option<&LinuxResources>,
    ) -> Result<Self, String> {
        // Delegate the controllers the limits need; a controller the kernel lacks is skipped
        // (the limit that needs it then fails with a message naming the file).
        let wanted = ["cpu", "cpuset", "memory", "pids", "io"];
        let available = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let enable: Vec<String> = wanted
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if !enable.is_empty() {
            write(&root.join("cgroup.subtree_control"), &enable.join(" "))
                .map_err(|e| format!("enabling cgroup controllers {enable:?}: {e}"))?;
        }
        let path = root.join(name);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("creating cgroup {}: {e}", path.display())),
        }
        let cg = Self { path };
        match cg.apply(resources) {
            Ok(()) => Ok(cg),
            Err(e) => {
                // A half-configured cgroup must not be left for the next create to reuse.
                cg.destroy();
                Err(e)
            }
        }
    }

    /// Writes the limits of `resources`; a value the kernel refuses puts back what was written
    /// before it, and is the error.
    fn apply(&self, resources: Option<&LinuxResources>) -> Result<(), String> {
        let mut written = Vec::new();
        let result = self.write_limits(resources, &mut written);
        if result.is_err() {
            for (path, old) in written.into_iter().rev() {
                let _ = write(&path, &old);
            }
        }
        result
    }

    /// Changes the limits (`husk update`): `resources` is the container's whole
    /// `linux.resources` after the update, applied as at create; refused, the previous values
    /// stay.
    pub fn update(&self, resources: &LinuxResources) -> Result<(), String> {
        self.apply(Some(resources))
    }

    fn write_limits(
        &self,
        resources: Option<&LinuxResources>,
        written: &mut Vec<(PathBuf, String)>,
    ) -> Result<(), String> {
        let all = match resources {
            Some(r) => settings(r, &Topology::current())?,
            None => Vec::new(),
        };
        if let Some(unified) = resources.and_then(|r| r.unified().as_ref()) {
            for (k, v) in unified {
                if k.contains('/') || k.starts_with('.') {
                    return Err(format!(
                        "linux.resources.unified key {k:?} is not a cgroup file name"
                    ));
                }
                self.write_file(k, v, written)?;
            }
        }
        for (file, value) in all {
            // A guest kernel without swap (husk's has none: CONFIG_SWAP is off) has no
            // memory.swap.max: nothing can be swapped, so every swap limit is already met.
            // Engines set one whenever the *host* accounts swap (podman: twice the limit).
            if file == SWAP_MAX && !self.path.join(file).exists() {
                continue;
            }
            self.write_file(file, &value, written)?;
        }
        Ok(())
    }

    /// Writes `value` into `file`, remembering in `written` what it held.
    fn write_file(
        &self,
        file: &str,
        value: &str,
        written: &mut Vec<(PathBuf, String)>,
    ) -> Result<(), String> {
        let path = self.path.join(file);
        let old = fs::read_to_string(&path).unwrap_or_default();
        write(&path, value).map_err(|e| {
            format!("setting cgroup {file} to {value:?} (from linux.resources): {e}")
        })?;
        written.push((path, old.trim().to_owned()));
        Ok(())
    }

    /// Moves a process into the cgroup.
    pub fn add(&self, pid: i32) -> io::Result<()> {
        write(&self.path.join("cgroup.procs"), &pid.to_string())
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pids of every process in the cgroup and its descendants.
    pub fn pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        collect_pids(&self.path, &mut out);
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Resource usage. A limit whose file is missing (its controller is not enabled) is
    /// "none", `u64::MAX`, as the protocol says, never 0; the process count then comes from
    /// the membership, which every cgroup has.
    pub fn stats(&self) -> ContainerStats {
        let read = |f: &str| fs::read_to_string(self.path.join(f)).unwrap_or_default();
        let value = |f: &str| -> Option<u64> {
            let s = fs::read_to_string(self.path.join(f)).ok()?;
            match s.trim() {
                "max" => Some(u64::MAX),
                v => v.parse().ok(),
            }
        };
        let mut stats = ContainerStats {
            memory_usage: value("memory.current").unwrap_or(0),
            memory_limit: value("memory.max").unwrap_or(u64::MAX),
            pids_current: value("pids.current")
                .unwrap_or_else(|| u64::try_from(self.pids().len()).unwrap_or(u64::MAX)),
            pids_limit: value("pids.max").unwrap_or(u64::MAX),
            ..ContainerStats::default()
        };
        for line in read("cpu.stat").lines() {
            let mut it = line.split_whitespace();
            let (Some(k), Some(v)) = (it.next(), it.next().and_then(|v| v.parse::<u64>().ok()))
            else {
                continue;
            };
            match k {
                "usage_usec" => stats.cpu_usage_ns = v * 1000,
                "user_usec" => stats.cpu_user_ns = v * 1000,
                "system_usec" => stats.cpu_system_ns = v * 1000,
                _ => {}
            }
        }
        stats
    }

    /// Freezes (or thaws) every process in the cgroup (`cgroup.freeze`), waiting until the
    /// kernel reports it done (`frozen 1` in `cgroup.events`).
    pub fn freeze(&self, frozen: bool) -> Result<(), String> {
        let value = if frozen { "1" } else { "0" };
        write(&self.path.join("cgroup.freeze"), value)
            .map_err(|e| format!("writing cgroup.freeze: {e}"))?;
        let want = format!("frozen {value}");
        for _ in 0..1000 {
            let events = fs::read_to_string(self.path.join("cgroup.events")).unwrap_or_default();
            if events.lines().any(|l| l == want) {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Err(format!("the cgroup did not report {want:?} within 2 s"))
    }

    /// Kills everything in the cgroup (cgroup.kill) and removes it.
    pub fn destroy(&self) {
        let _ = write(&self.path.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if remove_tree(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_pids(&e.path(), out);
            }
        }
    }
}

fn remove_tree(dir: &Path) -> io::Result<()> {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path())?;
            }
        }
    }
    fs::remove_dir(dir)
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with two vCPUs and one memory node.
    fn two_cpus() -> Topology {
        Topology {
            cpus: vec![0, 1],
            mems: vec![0],
        }
    }

    #[test]
    fn host_cpu_and_node_lists_become_the_guest_ones_by_position() {
        let cpuset = |cpus: &str, mems: &str, topology: &Topology| {
            let res: LinuxResources =
                serde_json::from_value(serde_json::json!({"cpu": {"cpus": cpus, "mems": mems}}))
                    .unwrap();
            let s = settings(&res, topology).unwrap();
            let get = |k: &str| s.iter().find(|(f, _)| *f == k).map(|(_, v)| v.clone());
            (get("cpuset.cpus"), get("cpuset.mems"))
        };
        let two = two_cpus();
        let want = |c: &str, m: &str| (Some(c.to_string()), Some(m.to_string()));
        // Host ids beyond the guest's: as many guest CPUs, from 0.
        assert_eq!(cpuset("2-3", "1", &two), want("0-1", "0"));
        assert_eq!(cpuset("0,2", "0", &two), want("0-1", "0"));
        assert_eq!(cpuset("5", "0", &two), want("0", "0"));
        // More than the VM has (an annotation sized it): all of them.
        assert_eq!(cpuset("0-7", "0-1", &two), want("0-1", "0"));
        // A VM with CPUs offline in the middle keeps its own ids.
        let odd = Topology {
            cpus: vec![0, 2, 3, 7],
            mems: vec![0],
        };
        assert_eq!(cpuset("10-12", "0", &odd), want("0,2-3", "0"));
        // Empty lists are "not set", as in runc.
        assert_eq!(cpuset("", " ", &two), (None, None));
    }

    #[test]
    fn malformed_cpu_lists_are_refused_naming_the_field() {
        for (cpus, mems, field) in [
            ("3-1", "0", "cpu.cpus"),
            ("x", "0", "cpu.cpus"),
            ("0-18446744073709551615,1", "0", "cpu.cpus"),
            ("0", "0-", "cpu.mems"),
        ] {
            let res: LinuxResources =
                serde_json::from_value(serde_json::json!({"cpu": {"cpus": cpus, "mems": mems}}))
                    .unwrap();
            let e = settings(&res, &two_cpus()).unwrap_err();
            assert!(e.contains(field), "{cpus:?}/{mems:?}: {e}");
        }
        assert_eq!(expand_id_list("0-2,5"), Some(vec![0, 1, 2, 5]));
        assert_eq!(format_id_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
    }

    #[test]
    fn resources_convert_like_runc() {
        let res: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":134217728,"swap":268435456,"reservation":-1},
                "cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0-1"},
                "pids":{"limit":64},
                "blockIO":{"weight":500}}"#,
        )
        .unwrap();
        let s = settings(&res, &two_cpus()).unwrap();
        let get = |k: &str| s.iter().find(|(f, _)| *f == k).map(|(_, v)| v.as_str());
        assert_eq!(get("memory.max"), Some("134217728"));
        assert_eq!(get("memory.swap.max"), Some("134217728"));
        assert_eq!(get("memory.low"), Some("max"));
        assert_eq!(get("cpu.weight"), Some("39"));
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("cpuset.cpus"), Some("0-1"));
        assert_eq!(get("pids.max"), Some("64"));
        assert_eq!(get("io.weight"), Some("default 4950"));
    }

    /// A cgroup directory as a kernel without swap shows it: memory.max, no memory.swap.max.
    fn fake_cgroup_without_swap(root: &Path) {
        let dir = root.join(NAME);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("memory.max"), "max\n").unwrap();
    }

    #[test]
    fn swap_limit_is_skipped_where_the_kernel_has_no_swap() {
        let root = std::env::temp_dir().join(format!("husk-cg-noswap-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fake_cgroup_without_swap(&root);
        let res: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":314572800,"swap":629145600}}"#).unwrap();
        let cg = Cgroup::create(&root, NAME, Some(&res)).expect("a swap limit without swap is met");
        assert_eq!(
            fs::read_to_string(cg.path().join("memory.max")).unwrap(),
            "314572800"
        );
        assert!(
            !cg.path().join(SWAP_MAX).exists(),
            "no swap file may be invented"
        );
        // Where the kernel has swap, the limit is written.
        fs::write(cg.path().join(SWAP_MAX), "max\n").unwrap();
        Cgroup::create(&root, NAME, Some(&res)).unwrap();
        assert_eq!(
            fs::read_to_string(cg.path().join(SWAP_MAX)).unwrap(),
            "314572800"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_update_the_kernel_refuses_puts_the_previous_limits_back() {
        let root = std::env::temp_dir().join(format!("husk-cg-update-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fake_cgroup_without_swap(&root);
        let dir = root.join(NAME);
        fs::write(dir.join("cpu.max"), "max 100000\n").unwrap();
        let cg = Cgroup { path: dir.clone() };
        let res: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":1048576},"cpu":{"quota":50000}}"#).unwrap();
        cg.update(&res).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).unwrap(),
            "1048576"
        );
        assert_eq!(
            fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "50000 100000"
        );
        // pids.max cannot be written (a directory here): what came before it goes back.
        fs::create_dir(dir.join("pids.max")).unwrap();
        let res: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":2097152},"cpu":{"quota":80000},"pids":{"limit":9}}"#,
        )
        .unwrap();
        let e = cg.update(&res).unwrap_err();
        assert!(e.contains("pids.max"), "{e}");
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).unwrap(),
            "1048576"
        );
        assert_eq!(
            fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "50000 100000"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn zero_weights_and_pids_limit_are_unset_as_in_runc() {
        let res: LinuxResources = serde_json::from_str(
            r#"{"blockIO":{"weight":0},"cpu":{"shares":0},"pids":{"limit":0}}"#,
        )
        .unwrap();
        let s = settings(&res, &two_cpus()).unwrap();
        assert!(s.is_empty(), "{s:?}");
    }

    #[test]
    fn swap_below_limit_is_an_error_naming_both() {
        let res: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":200,"swap":100}}"#).unwrap();
        let e = settings(&res, &two_cpus()).unwrap_err();
        assert!(e.contains("swap (100)") && e.contains("(200)"), "{e}");
    }
}
