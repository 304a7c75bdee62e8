//! The spec's `linux.resources` on the host: which files of the container's host cgroup get
//! which values, and writing them (undoably, for `husk update`).
//!
//! The host's cgroup holds the whole VM (every thread of the monitor: the vCPUs, the VMM's
//! device emulation, the virtio-fs server, the relays), not only the container's processes,
//! so some limits carry what the VM costs beyond the container ([`VmCost`]):
//!
//! - **memory**: a spec with a memory limit bounds the monitor to the VM's RAM plus the VMM's
//!   own overhead ([`VMM_OVERHEAD_MIB`]). The VM's RAM is the limit plus what the guest kernel
//!   needs (`crate::oci::bundle::GUEST_OVERHEAD_MIB`) unless an annotation sized it, so the host
//!   limit is the spec's limit + 64 MiB + the VMM's overhead. A VM never gives memory back (no
//!   balloon), so this bound is the VM's and does not follow `update`: a lower host limit than
//!   what the guest may have touched would have the host kill the VM. `update` changes the
//!   container's limit in the guest. The swap limit (memory+swap) keeps the spec's swap on top
//!   of that bound (cgroup v1 `memory.memsw.limit_in_bytes`, v2 `memory.swap.max`).
//!   `reservation` holds in the guest only.
//! - **pids**: the spec's limit plus the monitor's own threads ([`VmCost::tasks`]).
//! - **cpu**: `shares` (v2: weight, runc's conversion), `quota` and `period` as the spec gives
//!   them: the vCPUs and the VMM's threads share the quota, as the container's processes share
//!   it under runc. `cpus` and `mems` are host CPU and node ids: they pin every thread of the
//!   VM, vCPUs included, to them (the guest numbers its own CPUs, see husk-init's cgroup).
//!
//! A limit the spec asks for whose file no hierarchy has (its controller is not mounted, or on
//! v2 not enabled for the cgroup) is an error naming the file; swap files are the exception
//! (a host without swap accounting has nothing to swap into the limit).

use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

use super::error::CgroupError;
use crate::oci::bundle::VmSize;

/// What the monitor needs in host memory beyond the guest's RAM, measured (docs/performance.md,
/// "Host memory of a VM"): its heap and thread stacks, the VMM's device buffers, the virtio-fs
/// server's state, the page tables of the guest's memory, and the kernel memory KVM charges to
/// the cgroup for the VM (vCPU state, the shadow page tables of `kvm_pvm`).
pub const VMM_OVERHEAD_MIB: u64 = 64;

/// The monitor's own tasks without vCPUs: the main thread, the VMM's event loop, the VM waiter,
/// husk-init's reader, the command acceptor, the container's stdio relays; plus room for the
/// short-lived ones (a reader per command connection, the relays of exec terminals), which
/// the monitor may not fail to start (it would end the container).
pub const MONITOR_TASKS: u64 = 64;

/// What the VM costs on the host beyond the container's own use (see the module docs),
/// recorded at create so that `update` adds the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCost {
    /// The host memory limit when the spec sets one: the VM's RAM plus [`VMM_OVERHEAD_MIB`].
    pub memory_bytes: u64,
    /// Added to the spec's pids limit: [`MONITOR_TASKS`] and a thread per vCPU.
    pub tasks: u64,
}

impl VmCost {
    /// The cost of a VM of `size`.
    pub fn of(size: VmSize) -> VmCost {
        VmCost {
            memory_bytes: (size.memory_mib + VMM_OVERHEAD_MIB) << 20,
            tasks: MONITOR_TASKS + u64::from(size.vcpus),
        }
    }
}

/// The cgroup version of a hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// A v1 hierarchy: each controller's files in its own.
    V1,
    /// The v2 (unified) hierarchy.
    V2,
}

impl Version {
    /// The version of the cgroup filesystem `dir` is on.
    pub fn of(dir: &Path) -> Version {
        match nix::sys::statfs::statfs(dir) {
            Ok(s) if s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => Version::V2,
            _ => Version::V1,
        }
    }
}

/// One file of the cgroup and its new value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The file (`memory.limit_in_bytes`).
    pub file: &'static str,
    /// What to write.
    pub value: String,
    /// The spec field it comes from, for messages.
    pub field: &'static str,
}

/// Which limits to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Creating: all of them.
    Create,
    /// `update`: all but memory, which stays the VM's (see the module docs).
    Update,
}

/// The settings for `res` with the VM's `cost`, for a hierarchy of `version`; `current`
/// reads a file's present value where a setting depends on it (v1's memory and swap limits
/// are written in the order the kernel accepts, v2's `cpu.max` holds quota and period).
pub fn settings(
    res: &LinuxResources,
    cost: &VmCost,
    version: Version,
    when: When,
    current: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Setting>, CgroupError> {
    let mut out = Vec::new();
    let mut set = |file: &'static str, value: String, field: &'static str| {
        out.push(Setting { file, value, field });
    };
    if let Some(mem) = res.memory().as_ref().filter(|_| when == When::Create) {
        memory(mem, cost, version, current, &mut set)?;
    }
    if let Some(cpu) = res.cpu() {
        if let Some(shares) = cpu.shares().filter(|s| *s > 0) {
            match version {
                Version::V1 => set("cpu.shares", shares.to_string(), "cpu.shares"),
                Version::V2 => {
                    // runc's shares→weight mapping: [2, 262144] → [1, 10000].
                    let weight = 1 + (shares.saturating_sub(2) * 9999) / 262_142;
                    set("cpu.weight", weight.min(10_000).to_string(), "cpu.shares");
                }
            }
        }
        let quota = cpu.quota().filter(|q| *q != 0);
        let period = cpu.period().filter(|p| *p != 0);
        match version {
            Version::V1 => {
                if let Some(p) = period {
                    set("cpu.cfs_period_us", p.to_string(), "cpu.period");
                }
                if let Some(q) = quota {
                    set("cpu.cfs_quota_us", q.max(-1).to_string(), "cpu.quota");
                }
            }
            Version::V2 if quota.is_some() || period.is_some() => {
                let now = current("cpu.max").unwrap_or_default();
                let mut now = now.split_whitespace();
                let (now_quota, now_period) = (now.next(), now.next());
                let quota = match quota {
                    Some(q) if q > 0 => q.to_string(),
                    Some(_) => "max".into(),
                    None => now_quota.unwrap_or("max").to_owned(),
                };
                let period = period.map_or_else(
                    || now_period.unwrap_or("100000").to_owned(),
                    |p| p.to_string(),
                );
                set("cpu.max", format!("{quota} {period}"), "cpu.quota");
            }
            Version::V2 => {}
        }
        if let Some(cpus) = cpu.cpus().as_ref().filter(|c| !c.trim().is_empty()) {
            set("cpuset.cpus", cpus.trim().to_owned(), "cpu.cpus");
        }
        if let Some(mems) = cpu.mems().as_ref().filter(|m| !m.trim().is_empty()) {
            set("cpuset.mems", mems.trim().to_owned(), "cpu.mems");
        }
    }
    // 0 is "not set", as in runc.
    if let Some(pids) = res.pids().as_ref().filter(|p| p.limit() != 0) {
        let value = if pids.limit() < 0 {
            "max".to_owned()
        } else {
            pids.limit()
                .unsigned_abs()
                .saturating_add(cost.tasks)
                .to_string()
        };
        set("pids.max", value, "pids.limit");
    }
    Ok(out)
}

/// The memory settings at create (see the module docs).
fn memory(
    mem: &oci_spec::runtime::LinuxMemory,
    cost: &VmCost,
    version: Version,
    current: &dyn Fn(&str) -> Option<String>,
    set: &mut impl FnMut(&'static str, String, &'static str),
) -> Result<(), CgroupError> {
    let Some(limit) = mem.limit().filter(|l| *l != 0) else {
        return Ok(());
    };
    let unlimited = limit < 0;
    // memory+swap beyond memory: what the spec allows to swap, on top of the VM's bound.
    let swap = match mem.swap().filter(|s| *s != 0) {
        None => None,
        Some(s) if s < 0 || unlimited => Some(None),
        Some(s) if s < limit => {
            return Err(CgroupError::Invalid {
                field: "memory.swap",
                why: format!("{s} is below memory.limit ({limit}); swap is memory+swap"),
            });
        }
        Some(s) => Some(Some((s - limit).unsigned_abs())),
    };
    match version {
        Version::V1 => {
            let bound = if unlimited {
                "-1".to_owned()
            } else {
                cost.memory_bytes.to_string()
            };
            let Some(swap) = swap else {
                set("memory.limit_in_bytes", bound, "memory.limit");
                return Ok(());
            };
            let memsw = match swap {
                None => "-1".to_owned(),
                Some(extra) => cost.memory_bytes.saturating_add(extra).to_string(),
            };
            // The kernel keeps memory ≤ memory+swap at every step: raise memory+swap first
            // when it grows past the present memory limit (as runc orders them).
            let now: Option<u64> = current("memory.limit_in_bytes").and_then(|v| v.parse().ok());
            let swap_first =
                swap.is_none() || now.is_some_and(|n| memsw.parse::<u64>().is_ok_and(|m| n < m));
            let pair = [
                ("memory.limit_in_bytes", bound, "memory.limit"),
                ("memory.memsw.limit_in_bytes", memsw, "memory.swap"),
            ];
            let [first, second] = if swap_first {
                let [a, b] = pair;
                [b, a]
            } else {
                pair
            };
            for (file, value, field) in [first, second] {
                set(file, value, field);
            }
        }
        Version::V2 => {
            let bound = if unlimited {
                "max".to_owned()
            } else {
                cost.memory_bytes.to_string()
            };
            set("memory.max", bound, "memory.limit");
            if let Some(swap) = swap {
                let v = swap.map_or_else(|| "max".to_owned(), |extra| extra.to_string());
                set("memory.swap.max", v, "memory.swap");
            }
        }
    }
    Ok(())
}

/// Files a host may lack without failing the limit: swap accounting may be off, and without
/// it nothing is swapped.
fn optional(file: &str) -> bool {
    matches!(file, "memory.memsw.limit_in_bytes" | "memory.swap.max")
}

/// The settings written, with the values they replaced, to undo them.
#[derive(Debug, Default)]
#[must_use = "undo() puts the old values back; dropping keeps the new ones"]
pub struct Applied {
    done: Vec<(PathBuf, String)>,
}

impl Applied {
    /// Puts back the values the settings replaced, the last written first (so that pairs the
    /// kernel orders, like memory and memory+swap, go back in an order it accepts).
    pub fn undo(self) {
        for (path, old) in self.done.into_iter().rev() {
            if let Err(e) = std::fs::write(&path, &old) {
                eprintln!(
                    "husk: putting {} back to {}: {e}",
                    path.display(),
                    old.trim()
                );
            }
        }
    }
}

/// The directory among `dirs` (one per hierarchy) that has `file`.
pub fn holding<'a>(dirs: &'a [PathBuf], file: &str) -> Option<&'a Path> {
    dirs.iter()
        .map(PathBuf::as_path)
        .find(|d| d.join(file).exists())
}

/// Writes `settings` into the directories of `dirs` that hold their files, in order. A write
/// that fails undoes the ones before it and is the error (naming file, value and field).
pub fn apply(dirs: &[PathBuf], settings: &[Setting]) -> Result<Applied, CgroupError> {
    let mut applied = Applied::default();
    for s in settings {
        let Some(dir) = holding(dirs, s.file) else {
            if optional(s.file) {
                continue;
            }
            applied.undo();
            return Err(CgroupError::NoController {
                file: s.file,
                field: s.field,
            });
        };
        let path = dir.join(s.file);
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        if let Err(source) = std::fs::write(&path, &s.value) {
            applied.undo();
            return Err(CgroupError::Limit {
                path,
                value: s.value.clone(),
                field: s.field,
                context: context(dir, s.file),
                source,
            });
        }
        applied.done.push((path, old.trim().to_owned()));
    }
    Ok(applied)
}

/// What explains a refused value: the CPUs or memory nodes the parent cgroup has, which a
/// cpuset must stay within.
fn context(dir: &Path, file: &str) -> String {
    if !file.starts_with("cpuset.") {
        return String::new();
    }
    let parent = dir.parent().map(|p| p.join(file));
    match parent.and_then(|p| std::fs::read_to_string(p).ok()) {
        Some(v) => format!(
            " (the host cgroup's parent has {} {})",
            &file[7..],
            v.trim()
        ),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    const COST: VmCost = VmCost {
        memory_bytes: 428 << 20,
        tasks: 66,
    };

    fn none(_: &str) -> Option<String> {
        None
    }

    fn files(s: &[Setting]) -> Vec<(&str, &str)> {
        s.iter().map(|s| (s.file, s.value.as_str())).collect()
    }

    #[test]
    fn the_vm_cost_is_its_ram_and_the_vmms_overhead() {
        let cost = VmCost::of(VmSize {
            memory_mib: 300 + 64,
            vcpus: 2,
        });
        assert_eq!(cost.memory_bytes, (300 + 64 + VMM_OVERHEAD_MIB) << 20);
        assert_eq!(cost.tasks, MONITOR_TASKS + 2);
    }

    #[test]
    fn v1_at_create_bounds_the_vm_and_keeps_the_rest() {
        let r = res(
            r#"{"memory":{"limit":314572800,"swap":629145600,"reservation":1000},
            "cpu":{"shares":512,"quota":150000,"period":100000,"cpus":"0-1","mems":"0"},
            "pids":{"limit":100}}"#,
        );
        let s = settings(&r, &COST, Version::V1, When::Create, &none).unwrap();
        assert_eq!(
            files(&s),
            vec![
                ("memory.limit_in_bytes", "448790528"),
                ("memory.memsw.limit_in_bytes", "763363328"),
                ("cpu.shares", "512"),
                ("cpu.cfs_period_us", "100000"),
                ("cpu.cfs_quota_us", "150000"),
                ("cpuset.cpus", "0-1"),
                ("cpuset.mems", "0"),
                ("pids.max", "166"),
            ]
        );
    }

    #[test]
    fn v1_memory_and_swap_go_in_the_order_the_kernel_takes() {
        let r = res(r#"{"memory":{"limit":100,"swap":300}}"#);
        // A limit now below the new memory+swap: memory+swap first.
        let low = |_: &str| Some("1000".to_owned());
        let s = settings(&r, &COST, Version::V1, When::Create, &low).unwrap();
        assert_eq!(s[0].file, "memory.memsw.limit_in_bytes");
        // A fresh cgroup (no limit yet, the kernel's huge number): memory first.
        let fresh = |_: &str| Some("9223372036854771712".to_owned());
        let s = settings(&r, &COST, Version::V1, When::Create, &fresh).unwrap();
        assert_eq!(s[0].file, "memory.limit_in_bytes");
        // Unlimited swap: memory+swap first.
        let r = res(r#"{"memory":{"limit":100,"swap":-1}}"#);
        let s = settings(&r, &COST, Version::V1, When::Create, &fresh).unwrap();
        assert_eq!(
            files(&s),
            vec![
                ("memory.memsw.limit_in_bytes", "-1"),
                ("memory.limit_in_bytes", "448790528")
            ]
        );
    }

    #[test]
    fn v2_converts_like_runc() {
        let r = res(r#"{"memory":{"limit":100,"swap":300},
            "cpu":{"shares":1024,"quota":50000},"pids":{"limit":-1}}"#);
        let s = settings(&r, &COST, Version::V2, When::Create, &|f| {
            (f == "cpu.max").then(|| "max 200000".to_owned())
        })
        .unwrap();
        assert_eq!(
            files(&s),
            vec![
                ("memory.max", "448790528"),
                ("memory.swap.max", "200"),
                ("cpu.weight", "39"),
                ("cpu.max", "50000 200000"),
                ("pids.max", "max"),
            ]
        );
        // A period alone keeps the quota there is.
        let r = res(r#"{"cpu":{"period":50000}}"#);
        let s = settings(&r, &COST, Version::V2, When::Update, &|_| {
            Some("20000 100000".to_owned())
        })
        .unwrap();
        assert_eq!(files(&s), vec![("cpu.max", "20000 50000")]);
    }

    #[test]
    fn update_leaves_the_vms_memory_bound_alone() {
        let r = res(r#"{"memory":{"limit":100},"cpu":{"cpus":"1"},"pids":{"limit":5}}"#);
        let s = settings(&r, &COST, Version::V1, When::Update, &none).unwrap();
        assert_eq!(files(&s), vec![("cpuset.cpus", "1"), ("pids.max", "71")]);
    }

    #[test]
    fn unset_values_write_nothing_and_bad_swap_is_refused() {
        let r = res(r#"{"memory":{"limit":0},"cpu":{"shares":0,"cpus":""},"pids":{"limit":0}}"#);
        assert!(
            settings(&r, &COST, Version::V1, When::Create, &none)
                .unwrap()
                .is_empty()
        );
        let r = res(r#"{"memory":{"limit":200,"swap":100}}"#);
        let e = settings(&r, &COST, Version::V1, When::Create, &none).unwrap_err();
        assert!(e.to_string().contains("memory.swap"), "{e}");
    }

    #[test]
    fn apply_writes_where_the_file_is_and_undoes_on_failure() {
        let base = std::env::temp_dir().join(format!("husk-limits-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (cpu, pids) = (base.join("cpu"), base.join("pids"));
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::create_dir_all(&pids).unwrap();
        std::fs::write(cpu.join("cpu.shares"), "1024\n").unwrap();
        std::fs::write(pids.join("pids.max"), "max\n").unwrap();
        let dirs = vec![cpu.clone(), pids.clone()];
        let setting = |file, value: &str| Setting {
            file,
            value: value.into(),
            field: "f",
        };
        let applied = apply(
            &dirs,
            &[setting("cpu.shares", "2"), setting("pids.max", "10")],
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.shares")).unwrap(),
            "2"
        );
        applied.undo();
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.shares")).unwrap(),
            "1024"
        );
        assert_eq!(
            std::fs::read_to_string(pids.join("pids.max")).unwrap(),
            "max"
        );
        // A file no hierarchy has: an error naming it, and what was written is undone.
        let e = apply(
            &dirs,
            &[setting("cpu.shares", "3"), setting("cpuset.cpus", "0")],
        )
        .unwrap_err();
        assert!(e.to_string().contains("cpuset.cpus"), "{e}");
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.shares")).unwrap(),
            "1024"
        );
        // A missing swap file is no error.
        let none = apply(&dirs, &[setting("memory.memsw.limit_in_bytes", "1")]).unwrap();
        assert!(none.done.is_empty());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
