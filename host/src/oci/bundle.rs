//! Loading and validating an OCI bundle, and sizing its VM.
//!
//! The VM is sized from the spec: guest RAM is the container's memory limit plus what the
//! guest kernel and husk-init need themselves ([`GUEST_OVERHEAD_MIB`]); vCPUs are as many as
//! the `cpus` set lists (host CPU ids; the guest numbers its own 0..n-1), else the CPU quota
//! rounded up. Without limits a VM gets [`DEFAULT_MEMORY_MIB`] and one vCPU.
//!
//! A pod's VM is its sandbox's (see `super::pod`): sized the same way from the sandbox's spec,
//! except that the pod's own limits, where CRI gives them as annotations on the sandbox
//! (containerd 1.7 and later: [`CRI_SANDBOX_MEMORY`], [`CRI_SANDBOX_CPU_QUOTA`] /
//! [`CRI_SANDBOX_CPU_PERIOD`]; containerd 1.6 gives none), replace the sandbox's. A pod's later
//! container must fit in it: its limits are checked against the VM when it is created.
//!
//! The annotations `io.husk.vm.memory_mib` and `io.husk.vm.vcpus` override all of it.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// Guest RAM when the spec sets no memory limit.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// What the guest kernel, page cache and husk-init need on top of the container's limit.
pub const GUEST_OVERHEAD_MIB: u64 = 64;
/// Annotation overriding the guest RAM (MiB).
pub const ANNOTATION_MEMORY: &str = "io.husk.vm.memory_mib";
/// Annotation overriding the vCPU count.
pub const ANNOTATION_VCPUS: &str = "io.husk.vm.vcpus";
/// What containerd (1.7 and later) puts on a pod's sandbox: the pod's memory limit (bytes).
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// The pod's CPU quota, with [`CRI_SANDBOX_CPU_PERIOD`].
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// The period of [`CRI_SANDBOX_CPU_QUOTA`].
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// What is wrong with a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle directory or its config.json cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// config.json is not valid JSON or not a valid runtime spec.
    #[error("{path}: invalid config.json at line {line} column {column}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where.
        line: usize,
        /// Where.
        column: usize,
        /// What serde said.
        msg: String,
    },
    /// A field has a value husk cannot use.
    #[error("{path}: {field}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The JSON path of the field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A hook husk cannot run, or one the spec does not allow.
    #[error("{path}: {field}: {why}")]
    InvalidHook {
        /// The file.
        path: PathBuf,
        /// The JSON path of the hook's field (`hooks.prestart[0].path`).
        field: String,
        /// What is wrong.
        why: String,
    },
}

/// How big the VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    /// Guest RAM.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
}

/// A loaded bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The bundle directory, absolute.
    pub dir: PathBuf,
    /// config.json as read (sent to the guest byte for byte).
    pub config_json: Vec<u8>,
    /// The parsed spec.
    pub spec: Spec,
    /// The root filesystem, absolute.
    pub rootfs: PathBuf,
    /// The VM's size.
    pub vm: VmSize,
}

impl Bundle {
    /// The spec's bind mounts (type `bind`, or a `bind` or `rbind` option), each with its
    /// index among all the spec's mounts and its source made absolute against the bundle
    /// directory (`None`: the mount names no source, which the caller refuses).
    pub fn bind_mounts(
        &self,
    ) -> impl Iterator<Item = (u32, &oci_spec::runtime::Mount, Option<PathBuf>)> + '_ {
        let mounts = self.spec.mounts().as_deref().unwrap_or_default();
        (0u32..).zip(mounts).filter_map(|(index, m)| {
            let options = m.options().as_deref().unwrap_or_default();
            let is_bind = m.typ().as_deref() == Some("bind")
                || options.iter().any(|o| o == "bind" || o == "rbind");
            let source = m.source().as_ref().map(|s| {
                if s.is_absolute() {
                    s.clone()
                } else {
                    self.dir.join(s)
                }
            });
            is_bind.then_some((index, m, source))
        })
    }

    /// Whether the container's process gets a terminal (`process.terminal`).
    pub fn terminal(&self) -> bool {
        self.spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false)
    }

    /// Loads `dir/config.json` and checks what husk needs from it.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let dir = std::path::absolute(dir).map_err(|source| BundleError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("config.json");
        let config_json = std::fs::read(&path).map_err(|source| BundleError::Read {
            path: path.clone(),
            source,
        })?;
        let spec: Spec = serde_json::from_slice(&config_json).map_err(|e| BundleError::Parse {
            path: path.clone(),
            line: e.line(),
            column: e.column(),
            msg: e.to_string(),
        })?;
        let invalid = |field, why: String| BundleError::Invalid {
            path: path.clone(),
            field,
            why,
        };
        let version = spec.version();
        if !version.starts_with("1.") {
            return Err(invalid(
                "ociVersion",
                format!("{version:?} is not a 1.x runtime spec version"),
            ));
        }
        let root = spec.root().as_ref().ok_or_else(|| {
            invalid(
                "root",
                "missing: a container needs a root filesystem".into(),
            )
        })?;
        let rootfs = if root.path().is_absolute() {
            root.path().clone()
        } else {
            dir.join(root.path())
        };
        if !rootfs.is_dir() {
            return Err(invalid(
                "root.path",
                format!("{} is not a directory", rootfs.display()),
            ));
        }
        if spec.process().is_none() {
            return Err(invalid("process", "missing: nothing to run".into()));
        }
        let vm = vm_size(&spec).map_err(|(field, why)| invalid(field, why))?;
        super::hooks::spec::check(&spec).map_err(|(field, why)| BundleError::InvalidHook {
            path: path.clone(),
            field,
            why,
        })?;
        Ok(Bundle {
            dir,
            config_json,
            spec,
            rootfs,
            vm,
        })
    }
}

/// What a spec's own resources limit its processes to ([`limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory, in bytes; `None` where the spec sets no limit.
    pub memory: Option<u64>,
    /// CPUs: the `cpus` set's size, else the quota rounded up; `None` where it sets neither.
    pub cpus: Option<u64>,
}

/// What a spec's own resources limit its processes to (see [`Limits`]); the error names the
/// field and what is wrong with it.
pub fn limits(spec: &Spec) -> Result<Limits, (&'static str, String)> {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let memory = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
        .map(|l| u64::try_from(l).unwrap_or(0));
    let mut cpus = None;
    if let Some(cpu) = resources.and_then(|r| r.cpu().as_ref()) {
        // A set first: in the guest the container gets as many CPUs as it lists (husk-init
        // renumbers them 0..n-1), and the quota, if any, limits it there as it would on the
        // host.
        if let Some(set) = cpu.cpus().as_ref().filter(|c| !c.trim().is_empty()) {
            cpus = Some(count_cpus(set).ok_or((
                "linux.resources.cpu.cpus",
                format!("{set:?} is not a CPU list like \"0-3,5\""),
            ))?);
        } else if let (Some(quota), Some(period)) = (cpu.quota(), cpu.period())
            && quota > 0
            && period > 0
        {
            cpus = Some(u64::try_from(quota).unwrap_or(1).div_ceil(period));
        }
    }
    Ok(Limits { memory, cpus })
}

/// The VM size a spec asks for (see the module docs).
pub fn vm_size(spec: &Spec) -> Result<VmSize, (&'static str, String)> {
    let Limits { memory, cpus } = limits(spec)?;
    let mut memory_mib = memory.map_or(DEFAULT_MEMORY_MIB, |limit| {
        limit.div_ceil(1 << 20) + GUEST_OVERHEAD_MIB
    });
    let mut vcpus: u64 = cpus.unwrap_or(1);
    let annotations = spec.annotations().as_ref();
    let number = |key: &str| {
        annotations
            .and_then(|a| a.get(key))
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|v| *v > 0)
    };
    // A pod's sandbox: the pod's own limits, where CRI gives them.
    if let Some(bytes) = number(CRI_SANDBOX_MEMORY) {
        memory_mib = bytes.div_ceil(1 << 20) + GUEST_OVERHEAD_MIB;
    }
    if let (Some(quota), Some(period)) = (
        number(CRI_SANDBOX_CPU_QUOTA),
        number(CRI_SANDBOX_CPU_PERIOD),
    ) {
        vcpus = quota.div_ceil(period);
    }
    let annotations = spec.annotations().as_ref();
    if let Some(v) = annotations.and_then(|a| a.get(ANNOTATION_MEMORY)) {
        memory_mib = v.parse().map_err(|_| {
            (
                "annotations",
                format!("{ANNOTATION_MEMORY}={v:?} is not a number of MiB"),
            )
        })?;
    }
    if let Some(v) = annotations.and_then(|a| a.get(ANNOTATION_VCPUS)) {
        vcpus = v.parse().map_err(|_| {
            (
                "annotations",
                format!("{ANNOTATION_VCPUS}={v:?} is not a number"),
            )
        })?;
    }
    let max = u64::from(crate::vmm::MAX_VCPUS);
    if vcpus == 0 || vcpus > max {
        return Err((
            "linux.resources.cpu",
            format!("asks for {vcpus} vCPUs; a husk VM has 1 to {max}"),
        ));
    }
    if !(64..=64 * 1024).contains(&memory_mib) {
        return Err((
            "linux.resources.memory",
            format!("asks for a {memory_mib} MiB VM; 64 MiB to 64 GiB are supported"),
        ));
    }
    Ok(VmSize {
        memory_mib,
        vcpus: u8::try_from(vcpus).unwrap_or(1),
    })
}

/// The number of CPUs in a list like `0-3,5`; `None` for a malformed list or one whose count
/// does not fit a `u64` (the caller refuses any count above the vCPU maximum anyway).
pub(crate) fn count_cpus(list: &str) -> Option<u64> {
    let mut n: u64 = 0;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let count = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn sizes_from_limits_and_annotations() {
        let s = spec(r#"{"ociVersion":"1.0.2"}"#);
        assert_eq!(
            vm_size(&s).unwrap(),
            VmSize {
                memory_mib: 256,
                vcpus: 1
            }
        );
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":536870912},"cpu":{"quota":150000,"period":100000}}}}"#,
        );
        assert_eq!(
            vm_size(&s).unwrap(),
            VmSize {
                memory_mib: 512 + 64,
                vcpus: 2
            }
        );
        let s = spec(r#"{"ociVersion":"1.0.2","linux":{"resources":{"cpu":{"cpus":"0-2,7"}}}}"#);
        assert_eq!(vm_size(&s).unwrap().vcpus, 4);
        let s = spec(
            r#"{"ociVersion":"1.0.2","annotations":{"io.husk.vm.memory_mib":"128","io.husk.vm.vcpus":"3"}}"#,
        );
        assert_eq!(
            vm_size(&s).unwrap(),
            VmSize {
                memory_mib: 128,
                vcpus: 3
            }
        );
    }

    #[test]
    fn a_pods_limits_size_its_sandboxs_vm() {
        // containerd 1.7+: the pod's memory (bytes) and CPU quota on the pause container.
        let s = spec(
            r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-memory":"536870912","io.kubernetes.cri.sandbox-cpu-quota":"150000","io.kubernetes.cri.sandbox-cpu-period":"100000"}}"#,
        );
        assert_eq!(
            vm_size(&s).unwrap(),
            VmSize {
                memory_mib: 512 + GUEST_OVERHEAD_MIB,
                vcpus: 2
            }
        );
        // Zero (no limit) leaves the sandbox's own size; husk's annotations win.
        let s = spec(
            r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.sandbox-memory":"0","io.husk.vm.vcpus":"3","io.kubernetes.cri.sandbox-cpu-quota":"150000","io.kubernetes.cri.sandbox-cpu-period":"100000"}}"#,
        );
        assert_eq!(
            vm_size(&s).unwrap(),
            VmSize {
                memory_mib: DEFAULT_MEMORY_MIB,
                vcpus: 3
            }
        );
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":1073741824},"cpu":{"cpus":"0-1"}}}}"#,
        );
        assert_eq!(
            limits(&s).unwrap(),
            Limits {
                memory: Some(1 << 30),
                cpus: Some(2)
            }
        );
        assert_eq!(
            limits(&spec(r#"{"ociVersion":"1.0.2"}"#)).unwrap(),
            Limits {
                memory: None,
                cpus: None
            }
        );
    }

    #[test]
    fn a_cpuset_sizes_the_vm_whatever_the_quota() {
        // The guest numbers the container's CPUs 0..n-1 (husk-init), so the VM needs as
        // many vCPUs as the set has CPUs, host ids notwithstanding.
        let vcpus = |cpu: &str| {
            let s = spec(&format!(
                r#"{{"ociVersion":"1.0.2","linux":{{"resources":{{"cpu":{cpu}}}}}}}"#
            ));
            vm_size(&s).unwrap().vcpus
        };
        assert_eq!(vcpus(r#"{"cpus":"0-1","quota":50000,"period":100000}"#), 2);
        assert_eq!(vcpus(r#"{"cpus":"2-3","quota":400000,"period":100000}"#), 2);
        assert_eq!(vcpus(r#"{"cpus":"0,2"}"#), 2);
        // An empty set is no set (engines send one): the quota decides.
        assert_eq!(vcpus(r#"{"cpus":"","quota":150000,"period":100000}"#), 2);
        assert_eq!(vcpus(r#"{"cpus":""}"#), 1);
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let s = spec(r#"{"ociVersion":"1.0.2","annotations":{"io.husk.vm.vcpus":"99"}}"#);
        assert!(vm_size(&s).unwrap_err().1.contains("99 vCPUs"));
        let s = spec(r#"{"ociVersion":"1.0.2","annotations":{"io.husk.vm.memory_mib":"lots"}}"#);
        assert!(vm_size(&s).unwrap_err().1.contains("lots"));
        let s = spec(r#"{"ociVersion":"1.0.2","linux":{"resources":{"cpu":{"cpus":"3-1"}}}}"#);
        assert!(vm_size(&s).is_err());
    }

    /// Ranges spanning the whole of u64 overflowed the count: a panic in debug builds, a
    /// wrapped (wrong) count in release builds, where `0-18446744073709551615,0` was 1 CPU.
    #[test]
    fn huge_cpu_ranges_are_refused_not_overflowed() {
        for cpus in [
            "0-18446744073709551615",
            "1-18446744073709551615,0",
            "0-18446744073709551614,0-5",
        ] {
            let s = spec(&format!(
                r#"{{"ociVersion":"1.0.2","linux":{{"resources":{{"cpu":{{"cpus":"{cpus}"}}}}}}}}"#
            ));
            let err = vm_size(&s).unwrap_err();
            assert!(
                err.1.contains("vCPUs") || err.1.contains("CPU list"),
                "{cpus}: {err:?}"
            );
        }
        assert_eq!(count_cpus("0-18446744073709551615"), None);
        assert_eq!(count_cpus("5-5,9"), Some(2));
    }

    #[test]
    fn bad_bundles_name_the_problem() {
        let dir = std::env::temp_dir().join(format!("husk-bundle-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        let err = Bundle::load(&dir).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::write(
            dir.join("config.json"),
            "{\"ociVersion\": \"1.0.2\",\n \"root\": 7}",
        )
        .unwrap();
        let err = Bundle::load(&dir).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        std::fs::write(dir.join("config.json"), r#"{"ociVersion":"2.0.0"}"#).unwrap();
        let err = Bundle::load(&dir).unwrap_err().to_string();
        assert!(err.contains("ociVersion"), "{err}");
        std::fs::write(
            dir.join("config.json"),
            r#"{"ociVersion":"1.0.2","root":{"path":"nope"},"process":{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0}}}"#,
        )
        .unwrap();
        let err = Bundle::load(&dir).unwrap_err().to_string();
        assert!(err.contains("root.path") && err.contains("nope"), "{err}");
        std::fs::write(
            dir.join("config.json"),
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0}}}"#,
        )
        .unwrap();
        let b = Bundle::load(&dir).unwrap();
        assert_eq!(b.rootfs, dir.join("rootfs"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
