//! The host cgroup of a container's monitor (the whole VM: every thread, vCPUs included), or
//! of the process that stands for a pod's later container (`super::member`).
//!
//! **Without `cgroupsPath`** the monitor gets `husk/<id>` below the cgroup it was started in,
//! in every cgroup v1 hierarchy that has controllers (or in the v2 hierarchy on a v2-only
//! host), and nothing is applied there: the engine's accounting and limits for the process that
//! ran `husk create` still apply (it is a child of that cgroup), and the monitor's own directory
//! lets an administrator see and limit each VM. A hierarchy the monitor cannot write is skipped.
//!
//! **With `cgroupsPath`** (read as runc reads it, see [`path`]) the monitor lives there, in
//! every such hierarchy, and the spec's `linux.resources` are applied there with what the VM
//! costs beyond the container ([`limits`]) before the VM starts: that is the cgroup the engine
//! reads for its stats and sets limits on. Any failure there fails `create`. A pod's later
//! container's process joins its own `cgroupsPath` without limits: its processes are in the
//! pod's VM, whose threads (and usage) are in the sandbox's cgroup, as Kata accounts a pod.
//!
//! Either way the directories are recorded in `<state dir>/cgroups` (JSON, [`Record`]) before
//! they are made, so that `husk delete` removes them once the process is gone (a process
//! cannot remove the cgroup it is in); the record also says what the VM costs, for `husk
//! update`. It is one of the records the monitor's jail pins: what `delete` and `update` act on
//! as root comes only from it (see `crate::oci::state`).
//!
//! The files: this one places a process ([`Placement`], [`join`]) and carries `husk update`
//! to the host ([`update`]); `path` reads `cgroupsPath`, `hierarchy` finds the hierarchies
//! in `/proc`, `dirs` makes, enters and removes the directories, `limits` turns
//! `linux.resources` into their files, `record` is the state directory's record of them and
//! `error` what fails.

mod dirs;
mod error;
mod hierarchy;
pub mod limits;
pub mod path;
mod record;

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxResources, Spec};

pub use self::dirs::remove;
use self::dirs::{enter, make};
pub use self::error::CgroupError;
use self::hierarchy::{Hierarchy, hierarchies};
use self::limits::{Version, VmCost, When};
pub use self::path::CgroupsPath;
pub use self::record::{RECORD_FILE, Record};
use crate::oci::bundle::VmSize;

/// Where a process's cgroup is and what is applied to it (see the module docs).
#[derive(Debug, Clone)]
pub enum Placement {
    /// `husk/<id>` below the current cgroup; nothing applied, unwritable hierarchies skipped.
    Own {
        /// The container id.
        id: String,
    },
    /// The spec's `cgroupsPath`.
    Spec {
        /// The path.
        path: CgroupsPath,
        /// The spec's resources and what the VM costs, for a monitor; `None` for a pod's
        /// later container, whose processes are in the sandbox's VM. (Boxed: a spec's
        /// resources are large, the other placements small.)
        limits: Option<(Box<LinuxResources>, VmCost)>,
    },
}

impl Placement {
    /// The spec's `cgroupsPath`, read with `--systemd-cgroup` or without (`None` when the
    /// spec has none, or an empty one); the error says what is wrong with it.
    pub fn spec_path(spec: &Spec, systemd: bool) -> Result<Option<CgroupsPath>, String> {
        let raw = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| !p.is_empty());
        raw.map(|raw| CgroupsPath::parse(&raw, systemd)).transpose()
    }

    /// A monitor's placement: the spec's `cgroupsPath` with its resources and the cost of a VM
    /// of `vm`, else `husk/<id>`; the error says what is wrong with `cgroupsPath`.
    pub fn monitor(spec: &Spec, id: &str, systemd: bool, vm: VmSize) -> Result<Placement, String> {
        Ok(match Self::spec_path(spec, systemd)? {
            Some(path) => {
                let resources = spec
                    .linux()
                    .as_ref()
                    .and_then(|l| l.resources().clone())
                    .unwrap_or_default();
                Placement::Spec {
                    path,
                    limits: Some((Box::new(resources), VmCost::of(vm))),
                }
            }
            None => Placement::Own { id: id.to_owned() },
        })
    }

    /// The directory in hierarchy `h`.
    fn dir_in(&self, h: &Hierarchy) -> PathBuf {
        match self {
            Placement::Own { id } => h.mount_point.join(&h.current).join("husk").join(id),
            Placement::Spec { path, .. } => path.dir(path::Place {
                mount_point: &h.mount_point,
                current: &h.current,
                init: &h.init,
                v2: h.v2,
            }),
        }
    }
}

/// Makes the cgroup of `placement` in each hierarchy, records it in the state directory,
/// applies its limits and moves this process (all of its threads) there (see the module docs).
/// Returns the directories it joined. A host without a cgroup hierarchy gives none.
pub fn join(placement: &Placement, state_dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let read = |p: &str| {
        std::fs::read_to_string(p).map_err(|source| CgroupError::Read {
            path: p.into(),
            source,
        })
    };
    // Pid 1's is for systemd's slices only, and may be out of reach: then the root.
    let init = std::fs::read_to_string("/proc/1/cgroup").unwrap_or_default();
    let found = hierarchies(
        &read("/proc/self/cgroup")?,
        &init,
        &read(super::mountinfo::PATH)?,
    );
    let dirs: Vec<(PathBuf, &Hierarchy)> = found.iter().map(|h| (placement.dir_in(h), h)).collect();
    // Recorded first: whatever gets created below is removed by `delete`, even if joining fails.
    let limits = match placement {
        Placement::Spec { limits, .. } => limits.as_ref(),
        Placement::Own { .. } => None,
    };
    Record {
        dirs: dirs.iter().map(|(d, _)| d.clone()).collect(),
        cost: limits.map(|(_, cost)| *cost),
    }
    .save(state_dir)?;
    if let Placement::Own { .. } = placement {
        let mut joined = Vec::new();
        for (dir, h) in &dirs {
            match make(dir, h, false).and_then(|()| enter(dir)) {
                Ok(()) => joined.push(dir.clone()),
                Err(e) => eprintln!(
                    "husk monitor: no cgroup of its own: {}",
                    crate::error_chain(&e)
                ),
            }
        }
        return Ok(joined);
    }
    for (dir, h) in &dirs {
        make(dir, h, limits.is_some())?;
    }
    let all: Vec<PathBuf> = dirs.iter().map(|(d, _)| d.clone()).collect();
    if let Some((resources, cost)) = limits {
        // Kept: the directories go with `delete`.
        let _kept = apply_limits(&all, resources, cost, When::Create)?;
    }
    for dir in &all {
        enter(dir)?;
    }
    Ok(all)
}

/// Writes the settings of `resources` with the VM's `cost` into `dirs` (see [`limits`]); the
/// version is the first directory's (a host has v1 hierarchies or the v2 one, see
/// [`hierarchies`]).
fn apply_limits(
    dirs: &[PathBuf],
    resources: &LinuxResources,
    cost: &VmCost,
    when: When,
) -> Result<limits::Applied, CgroupError> {
    let Some(first) = dirs.first() else {
        return Ok(limits::Applied::default());
    };
    let current = |file: &str| {
        limits::holding(dirs, file).and_then(|d| std::fs::read_to_string(d.join(file)).ok())
    };
    let settings = limits::settings(resources, cost, Version::of(first), when, &current)?;
    limits::apply(dirs, &settings)
}

/// `husk update`'s part on the host: writes what `resources` changes (all but memory, see
/// [`limits`]) into the cgroups recorded in `state_dir`, if husk keeps limits there. Returns
/// what to undo if the guest then refuses the update (`None`: nothing was written).
pub fn update(
    state_dir: &Path,
    resources: &LinuxResources,
) -> Result<Option<limits::Applied>, CgroupError> {
    let record = Record::load(state_dir)?;
    let Some(cost) = record.cost else {
        return Ok(None);
    };
    apply_limits(&record.dirs, resources, &cost, When::Update).map(Some)
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

    const CGROUP_V1: &str = "\
5:cpuset:/outer/inner
4:memory:/process_api/abc
3:cpu,cpuacct:/
1:name=systemd:/user.slice
0::/user.slice
";

    fn v1(mount_point: &str, current: &str, init: &str, cpuset: bool) -> Hierarchy {
        Hierarchy {
            mount_point: mount_point.into(),
            current: current.into(),
            init: init.into(),
            cpuset,
            v2: false,
        }
    }

    #[test]
    fn v1_hierarchies_with_controllers_are_joined_below_the_current_cgroup() {
        let init = "5:cpuset:/outer\n4:memory:/init.scope\n3:cpu,cpuacct:/\n";
        let h = hierarchies(CGROUP_V1, init, MOUNTINFO_V1);
        assert_eq!(
            h,
            vec![
                v1("/sys/fs/cgroup/cpuset", "inner", "", true),
                v1(
                    "/sys/fs/cgroup/memory",
                    "process_api/abc",
                    "init.scope",
                    false
                ),
                v1("/sys/fs/cgroup/cpu,cpuacct", "", "", false),
            ]
        );
    }

    #[test]
    fn a_v2_only_host_uses_the_unified_hierarchy() {
        let mountinfo = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let h = hierarchies(
            "0::/system.slice/x.service\n",
            "0::/init.scope\n",
            mountinfo,
        );
        assert_eq!(
            h,
            vec![Hierarchy {
                mount_point: "/sys/fs/cgroup".into(),
                current: "system.slice/x.service".into(),
                init: "init.scope".into(),
                cpuset: false,
                v2: true,
            }]
        );
    }

    #[test]
    fn no_cgroup_mounts_means_no_cgroups() {
        assert!(
            hierarchies(
                "4:memory:/\n0::/\n",
                "",
                "24 29 0:22 / /sys rw - sysfs sysfs rw\n"
            )
            .is_empty()
        );
    }

    #[test]
    fn placements_name_a_directory_in_each_hierarchy() {
        let h = hierarchies(CGROUP_V1, "", MOUNTINFO_V1);
        let own = Placement::Own { id: "c1".into() };
        let spec = |raw: &str, systemd| Placement::Spec {
            path: CgroupsPath::parse(raw, systemd).unwrap(),
            limits: None,
        };
        let dirs = |p: &Placement| -> Vec<PathBuf> { h.iter().map(|h| p.dir_in(h)).collect() };
        assert_eq!(
            dirs(&own),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpuset/inner/husk/c1"),
                "/sys/fs/cgroup/memory/process_api/abc/husk/c1".into(),
                "/sys/fs/cgroup/cpu,cpuacct/husk/c1".into(),
            ]
        );
        assert_eq!(
            dirs(&spec("/libpod_parent/libpod-c1", false)),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpuset/libpod_parent/libpod-c1"),
                "/sys/fs/cgroup/memory/libpod_parent/libpod-c1".into(),
                "/sys/fs/cgroup/cpu,cpuacct/libpod_parent/libpod-c1".into(),
            ]
        );
        assert_eq!(
            dirs(&spec("pod1/c1", false))[1],
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/pod1/c1")
        );
        assert_eq!(
            dirs(&spec("system.slice:docker:c1", true))[2],
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/system.slice/docker-c1.scope")
        );
    }

    #[test]
    fn the_spec_path_is_read_as_the_flag_says_and_bad_ones_name_the_field() {
        let spec = |path: &str| -> Spec {
            serde_json::from_value(
                serde_json::json!({"ociVersion": "1.0.2", "linux": {"cgroupsPath": path}}),
            )
            .unwrap()
        };
        assert_eq!(
            Placement::spec_path(&spec("/a/b"), false).unwrap(),
            Some(CgroupsPath::Absolute("a/b".into()))
        );
        assert_eq!(Placement::spec_path(&spec(""), false).unwrap(), None);
        let e = Placement::spec_path(&spec("/a/b"), true).unwrap_err();
        assert!(
            e.starts_with("\"/a/b\" is not \"slice:prefix:name\""),
            "{e}"
        );
        let size = VmSize {
            memory_mib: 256,
            vcpus: 1,
        };
        let none: Spec = serde_json::from_str(r#"{"ociVersion":"1.0.2"}"#).unwrap();
        assert!(matches!(
            Placement::monitor(&none, "c1", false, size).unwrap(),
            Placement::Own { id } if id == "c1"
        ));
        assert!(matches!(
            Placement::monitor(&spec("x"), "c1", false, size).unwrap(),
            Placement::Spec { limits: Some((_, cost)), .. } if cost == VmCost::of(size)
        ));
    }

    #[test]
    fn remove_without_a_record_does_nothing_and_removes_recorded_directories() {
        let dir = std::env::temp_dir().join(format!("husk-cgroup-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        remove(&dir).unwrap();
        // Pinned empty by the jail when it was never written.
        std::fs::write(dir.join(RECORD_FILE), "").unwrap();
        remove(&dir).unwrap();
        let fake = dir.join("fake-cgroup");
        std::fs::create_dir(&fake).unwrap();
        Record {
            dirs: vec![fake.clone()],
            cost: None,
        }
        .save(&dir)
        .unwrap();
        assert_eq!(Record::load(&dir).unwrap().dirs, vec![fake.clone()]);
        remove(&dir).unwrap();
        assert!(!fake.exists());
        // Not a record: an error naming the file, not a guess.
        std::fs::write(dir.join(RECORD_FILE), "/some/dir\n").unwrap();
        let e = remove(&dir).unwrap_err();
        assert!(e.to_string().contains("not a cgroup record"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
