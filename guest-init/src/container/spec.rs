//! From config.json to a checked plan: everything that can be refused is refused here,
//! before anything is forked or mounted.
//!
//! What husk-init does with each part of the OCI runtime spec:
//!
//! * **Honoured**: `process` (args, env, cwd, user uid/gid/additionalGids/umask, terminal,
//!   consoleSize, capabilities — all five sets, rlimits, noNewPrivileges, oomScoreAdj),
//!   `root.readonly`, `hostname`, `domainname`, `mounts` (bind mounts from the host through
//!   the share, every other type made in the guest, in spec order, with their options and
//!   propagation), `linux.namespaces` pid/mount/uts/ipc/user/cgroup (new ones; for a pod's
//!   container, pid/uts/ipc given by `path` are the pod sandbox's in the VM),
//!   `linux.uidMappings` / `gidMappings`, `linux.devices`, `linux.sysctl`, `linux.resources`
//!   memory limit/swap/reservation, cpu shares/quota/period/cpus/mems, pids limit, blockIO
//!   weight and `unified` (cgroup v2 in the guest), `linux.rootfsPropagation`,
//!   `linux.maskedPaths`, `linux.readonlyPaths`, `linux.seccomp` (see [`super::seccomp`]).
//! * **Refused with an error**: a namespace with a `path` other than network, except the
//!   pid, uts and ipc namespaces of a pod's container (a container with a VM of its own has
//!   nothing to join), the time namespace, seccomp notify/flags,
//!   an unknown capability, bind mounts the host did not provide, `hostname`/`domainname`
//!   without a uts namespace (as runc), id-mapped mounts (`mounts[].uidMappings`), and
//!   anything malformed (named in the message).
//! * **Ignored, by design**: the network namespace (the VM is the network boundary; the host
//!   side wires the engine's namespace to the VM's NIC), `cgroupsPath` (a host cgroup: the
//!   monitor lives there; the guest uses its own `/container` cgroup, `/container-<n>` for
//!   a pod's n-th container), `root.path`
//!   (the host names the rootfs in the request), `linux.resources.devices` (the guest has
//!   only the VM's virtual devices), `apparmorProfile`, `selinuxLabel`, `mountLabel` (no LSM
//!   in the guest kernel; the VM replaces them as the isolation layer), `ioPriority`,
//!   `scheduler`, `execCPUAffinity`, `personality`, `intelRdt`, `linux.netDevices`,
//!   `linux.memoryPolicy`, `annotations`, `hooks` (run by the host side).
//! * **Ignored, not yet mapped** (no cgroup v2 file is written for them): `linux.resources`
//!   memory kernel/kernelTCP/swappiness/disableOOMKiller, cpu realtime/idle/burst, blockIO
//!   leafWeight/weightDevice/throttle*, hugepageLimits, network, rdma. `unified` reaches
//!   every cgroup v2 file meanwhile.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use husk_proto::{CreateRequest, ErrorCode, FsSource};
use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::stat::SFlag;
use oci_spec::runtime::{LinuxDeviceType, LinuxIdMapping, LinuxNamespaceType, Spec};

use super::mounts::{self, DevicePlan, MountKind, MountPlan, RootfsPlan};
use super::process::ProcessPlan;
use super::seccomp::{self, SeccompPlan};
use super::sync::ChildError;

/// A validated container.
#[derive(Debug)]
pub struct Plan {
    /// The process.
    pub process: ProcessPlan,
    /// The filesystem view.
    pub rootfs: RootfsPlan,
    /// `CLONE_NEW*` flags for the clone (not cgroup: that one is unshared after the cgroup
    /// move, so the namespace is rooted at the container's cgroup).
    pub clone_flags: libc::c_int,
    /// Whether to unshare a cgroup namespace.
    pub cgroup_ns: bool,
    /// Namespaces (pid, uts, ipc) the spec names by path: joined from the container the
    /// request says to join ([`CreateRequest::join`]) instead of made.
    pub joined: Vec<CloneFlags>,
    /// uid_map and gid_map contents when a user namespace is made.
    pub id_maps: Option<(String, String)>,
    /// `hostname`.
    pub hostname: Option<String>,
    /// `domainname`.
    pub domainname: Option<String>,
    /// `linux.sysctl`.
    pub sysctls: Vec<(String, String)>,
    /// The seccomp profile.
    pub seccomp: Option<SeccompPlan>,
    /// The whole spec (for resources).
    pub spec: Spec,
}

fn invalid(msg: impl Into<String>) -> ChildError {
    ChildError {
        code: ErrorCode::InvalidSpec,
        message: msg.into(),
    }
}

fn unsupported(msg: impl Into<String>) -> ChildError {
    ChildError {
        code: ErrorCode::Unsupported,
        message: msg.into(),
    }
}

/// Where guest-side sources live: shares are mounted under `share_root/<tag>`.
pub fn source_path(src: &FsSource, share_root: &Path) -> Result<PathBuf, ChildError> {
    match src {
        FsSource::Share { tag, path } => {
            if !mounts::is_clean_relative(path) || !mounts::is_clean_relative(tag) {
                return Err(ChildError {
                    code: ErrorCode::Protocol,
                    message: format!("share path {tag}:{path} is not a clean relative path"),
                });
            }
            Ok(share_root.join(tag).join(path))
        }
        FsSource::Guest(p) if Path::new(p).is_absolute() => Ok(PathBuf::from(p)),
        FsSource::Guest(p) => Err(ChildError {
            code: ErrorCode::Protocol,
            message: format!("guest path {p:?} is not absolute"),
        }),
    }
}

fn id_map(maps: &Option<Vec<LinuxIdMapping>>) -> String {
    maps.iter()
        .flatten()
        .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
        .collect()
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        Path::new("/").join(p)
    }
}

/// Checks the spec of a create request and turns it into a plan.
pub fn plan(req: &CreateRequest, share_root: &Path) -> Result<Plan, ChildError> {
    let spec: Spec = serde_json::from_slice(&req.config_json)
        .map_err(|e| invalid(format!("config.json: {e}")))?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid("config.json has no process"))?;
    let mut process_plan = ProcessPlan::from_spec(process)?;
    if process_plan.terminal != req.stdio.is_terminal() {
        process_plan.terminal = req.stdio.is_terminal();
    }
    // No "linux" object means no namespaces at all (oci-spec's Default would add some).
    let linux = match spec.linux() {
        Some(l) => l.clone(),
        None => serde_json::from_str("{}").map_err(|e| invalid(format!("linux: {e}")))?,
    };

    let mut clone_flags = libc::CLONE_NEWNS; // always: the VM's own mounts stay out of reach
    let mut joined = Vec::new();
    let mut cgroup_ns = false;
    let mut userns = false;
    for ns in linux.namespaces().iter().flatten() {
        let flag = match ns.typ() {
            LinuxNamespaceType::Network => continue,
            LinuxNamespaceType::Time => {
                return Err(unsupported("the time namespace is not supported"));
            }
            LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
            LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::User => {
                userns = true;
                libc::CLONE_NEWUSER
            }
            LinuxNamespaceType::Cgroup => {
                cgroup_ns = true;
                0
            }
        };
        if let Some(path) = ns.path() {
            // A pod's container names its sandbox's namespaces by their host paths: they mean
            // the namespaces of the container the host says to join (see `Plan::joined`).
            let join = match ns.typ() {
                LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
                LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
                LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
                _ => {
                    return Err(unsupported(format!(
                        "joining the existing {} namespace {} (only a pod's pid, uts and ipc \
                         namespaces can be shared inside its VM)",
                        ns.typ(),
                        path.display()
                    )));
                }
            };
            if req.join.is_none() {
                return Err(unsupported(format!(
                    "joining the existing {} namespace {} (this container is not part of a \
                     pod: it has a VM of its own)",
                    ns.typ(),
                    path.display()
                )));
            }
            joined.push(join);
            continue;
        }
        clone_flags |= flag;
    }
    // As runc: without its own UTS namespace the container would rename the VM (or, for
    // husk-init on a host, the host), which outlives it.
    for (field, value) in [
        ("hostname", spec.hostname()),
        ("domainname", spec.domainname()),
    ] {
        let own_uts =
            clone_flags & libc::CLONE_NEWUTS != 0 || joined.contains(&CloneFlags::CLONE_NEWUTS);
        if value.as_ref().is_some_and(|v| !v.is_empty()) && !own_uts {
            return Err(invalid(format!(
                "{field} is set but linux.namespaces has no uts namespace"
            )));
        }
    }
    let id_maps = if userns {
        if linux.uid_mappings().as_ref().is_none_or(|m| m.is_empty())
            || linux.gid_mappings().as_ref().is_none_or(|m| m.is_empty())
        {
            return Err(invalid(
                "a user namespace needs linux.uidMappings and linux.gidMappings",
            ));
        }
        Some((id_map(linux.uid_mappings()), id_map(linux.gid_mappings())))
    } else {
        None
    };

    let rootfs = source_path(&req.rootfs, share_root)?;
    let sources: HashMap<u32, &FsSource> =
        req.mounts.iter().map(|m| (m.index, &m.source)).collect();
    let mut mount_plans = Vec::new();
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        // Skipping the mapping would leave every file with the wrong owner, silently.
        if m.uid_mappings().is_some() || m.gid_mappings().is_some() {
            return Err(unsupported(format!(
                "mount {i} ({}): id-mapped mounts (uidMappings/gidMappings) are not supported",
                m.destination().display()
            )));
        }
        let options = mounts::parse_options(m.options().as_deref().unwrap_or_default());
        let typ = m.typ().clone().unwrap_or_default();
        let is_bind = typ == "bind" || options.is_bind();
        let kind = if is_bind {
            let idx = u32::try_from(i).map_err(|_| invalid("too many mounts"))?;
            let src = sources.get(&idx).ok_or_else(|| {
                invalid(format!(
                    "mount {i} ({}): the bind source {} was not shared with the VM",
                    m.destination().display(),
                    m.source().as_deref().unwrap_or(Path::new("?")).display()
                ))
            })?;
            MountKind::Bind {
                source: source_path(src, share_root)?,
            }
        } else {
            if typ.is_empty() {
                return Err(invalid(format!(
                    "mount {i} ({}) has neither a type nor bind options",
                    m.destination().display()
                )));
            }
            MountKind::Fs {
                source: m
                    .source()
                    .as_ref()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| typ.clone()),
                fstype: typ,
            }
        };
        let mut options = options;
        if is_bind {
            options.flags.insert(MsFlags::MS_BIND);
        }
        mount_plans.push(MountPlan {
            index: i,
            destination: absolute(m.destination()),
            kind,
            options,
        });
    }

    let mut devices = DevicePlan::defaults();
    for (i, d) in linux.devices().iter().flatten().enumerate() {
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            LinuxDeviceType::A => {
                return Err(invalid(format!(
                    "linux.devices[{i}]: type \"a\" is not a node type"
                )));
            }
        };
        let path = d.path().clone();
        if !path.is_absolute() {
            return Err(invalid(format!(
                "linux.devices[{i}]: path {} is not absolute",
                path.display()
            )));
        }
        let plan = DevicePlan {
            kind,
            major: u64::try_from(d.major()).unwrap_or(0),
            minor: u64::try_from(d.minor()).unwrap_or(0),
            mode: d.file_mode().unwrap_or(0o666) & 0o7777,
            uid: d.uid().unwrap_or(0),
            gid: d.gid().unwrap_or(0),
            path,
        };
        devices.retain(|x| x.path != plan.path);
        devices.push(plan);
    }

    let propagation = match linux.rootfs_propagation() {
        Some(p) => mounts::propagation_flags(p).ok_or_else(|| {
            invalid(format!(
                "linux.rootfsPropagation {p:?} is not a propagation mode"
            ))
        })?,
        None => MsFlags::MS_SLAVE | MsFlags::MS_REC,
    };
    let rootfs_plan = RootfsPlan {
        rootfs,
        readonly: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
        propagation,
        mounts: mount_plans,
        devices,
        masked_paths: linux
            .masked_paths()
            .iter()
            .flatten()
            .map(|p| absolute(Path::new(p)))
            .collect(),
        readonly_paths: linux
            .readonly_paths()
            .iter()
            .flatten()
            .map(|p| absolute(Path::new(p)))
            .collect(),
        cwd: process_plan.cwd.clone(),
    };
    let seccomp = linux
        .seccomp()
        .as_ref()
        .map(seccomp::compile)
        .transpose()
        .map_err(unsupported)?;
    let mut sysctls: Vec<(String, String)> = linux
        .sysctl()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    sysctls.sort();
    for (k, _) in &sysctls {
        if k.contains('/') || k.contains("..") || k.is_empty() {
            return Err(invalid(format!(
                "linux.sysctl key {k:?} is not a sysctl name"
            )));
        }
    }
    if let Some(res) = linux.resources() {
        super::cgroup::settings(res, &super::cgroup::Topology::current()).map_err(invalid)?;
    }
    Ok(Plan {
        process: process_plan,
        rootfs: rootfs_plan,
        clone_flags,
        cgroup_ns,
        joined,
        id_maps,
        hostname: spec.hostname().clone(),
        domainname: spec.domainname().clone(),
        sysctls,
        seccomp,
        spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::{ContainerId, ContainerRef, MountSource, Stdio};

    fn req(config: &str, mounts: Vec<MountSource>) -> CreateRequest {
        CreateRequest {
            container: ContainerRef::FIRST,
            join: None,
            container_id: ContainerId::new("t").unwrap(),
            config_json: config.as_bytes().to_vec(),
            rootfs: FsSource::Guest("/rootfs".into()),
            mounts,
            stdio: Stdio::NULL,
        }
    }

    const BASE: &str = r#""ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"rootfs"}"#;

    #[test]
    fn a_minimal_spec_plans() {
        let p = plan(
            &req(&format!("{{{BASE}}}"), vec![]),
            Path::new("/run/husk/fs"),
        )
        .unwrap();
        assert_eq!(p.clone_flags, libc::CLONE_NEWNS);
        assert_eq!(p.rootfs.rootfs, Path::new("/rootfs"));
        assert_eq!(p.rootfs.devices.len(), 6);
    }

    #[test]
    fn namespaces_map_to_clone_flags_and_paths_are_refused() {
        let cfg = format!(
            r#"{{{BASE},"linux":{{"namespaces":[{{"type":"pid"}},{{"type":"uts"}},{{"type":"network","path":"/run/netns/x"}},{{"type":"cgroup"}}]}}}}"#
        );
        let p = plan(&req(&cfg, vec![]), Path::new("/s")).unwrap();
        assert_eq!(
            p.clone_flags,
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS
        );
        assert!(p.cgroup_ns);
        let cfg = format!(
            r#"{{{BASE},"linux":{{"namespaces":[{{"type":"ipc","path":"/proc/1/ns/ipc"}}]}}}}"#
        );
        let e = plan(&req(&cfg, vec![]), Path::new("/s")).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unsupported);
        assert!(e.message.contains("/proc/1/ns/ipc"), "{e}");
    }

    #[test]
    fn a_pods_container_joins_by_path_what_a_pod_shares_only() {
        let pod = |namespaces: &str| {
            let cfg = format!(r#"{{{BASE},"linux":{{"namespaces":[{namespaces}]}}}}"#);
            let mut r = req(&cfg, vec![]);
            r.container = ContainerRef(1);
            r.join = Some(ContainerRef::FIRST);
            plan(&r, Path::new("/s"))
        };
        let p = pod(
            r#"{"type":"pid","path":"/proc/77/ns/pid"},{"type":"ipc","path":"/proc/77/ns/ipc"},
               {"type":"uts","path":"/proc/77/ns/uts"},{"type":"mount"},{"type":"cgroup"}"#,
        )
        .unwrap();
        assert_eq!(p.clone_flags, libc::CLONE_NEWNS, "joined, not made");
        assert_eq!(
            p.joined,
            vec![
                CloneFlags::CLONE_NEWPID,
                CloneFlags::CLONE_NEWIPC,
                CloneFlags::CLONE_NEWUTS
            ]
        );
        // A hostname in a joined uts namespace is the pod's (as runc).
        let cfg = format!(
            r#"{{{BASE},"hostname":"pod","linux":{{"namespaces":[{{"type":"uts","path":"/x"}}]}}}}"#
        );
        let mut r = req(&cfg, vec![]);
        r.join = Some(ContainerRef::FIRST);
        assert!(plan(&r, Path::new("/s")).is_ok());
        for other in ["mount", "user", "cgroup"] {
            let e = pod(&format!(r#"{{"type":"{other}","path":"/proc/77/ns/x"}}"#)).unwrap_err();
            assert_eq!(e.code, ErrorCode::Unsupported, "{other}");
            assert!(e.message.contains("pid, uts and ipc"), "{e}");
        }
    }

    #[test]
    fn bind_mounts_need_a_shared_source() {
        let cfg = format!(
            r#"{{{BASE},"mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
                {{"destination":"/data","type":"bind","source":"/srv/data","options":["rbind","ro"]}}]}}"#
        );
        let e = plan(&req(&cfg, vec![]), Path::new("/s")).unwrap_err();
        assert!(
            e.message.contains("mount 1 (/data)") && e.message.contains("/srv/data"),
            "{e}"
        );
        let ok = plan(
            &req(
                &cfg,
                vec![MountSource {
                    index: 1,
                    source: FsSource::Share {
                        tag: "husk".into(),
                        path: "mounts/1".into(),
                    },
                }],
            ),
            Path::new("/s"),
        )
        .unwrap();
        let MountKind::Bind { source } = &ok.rootfs.mounts[1].kind else {
            panic!("not a bind")
        };
        assert_eq!(source, Path::new("/s/husk/mounts/1"));
        assert!(
            ok.rootfs.mounts[1]
                .options
                .flags
                .contains(MsFlags::MS_RDONLY)
        );
    }

    #[test]
    fn id_mapped_mounts_are_refused() {
        let cfg = format!(
            r#"{{{BASE},"mounts":[{{"destination":"/data","type":"tmpfs","source":"tmpfs",
                "uidMappings":[{{"containerID":0,"hostID":1000,"size":1}}]}}]}}"#
        );
        let e = plan(&req(&cfg, vec![]), Path::new("/s")).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unsupported);
        assert!(e.message.contains("mount 0 (/data)"), "{e}");
    }

    #[test]
    fn share_paths_cannot_climb() {
        let e = source_path(
            &FsSource::Share {
                tag: "husk".into(),
                path: "../../etc".into(),
            },
            Path::new("/s"),
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::Protocol);
    }

    #[test]
    fn user_namespaces_need_maps() {
        let cfg = format!(r#"{{{BASE},"linux":{{"namespaces":[{{"type":"user"}}]}}}}"#);
        assert!(plan(&req(&cfg, vec![]), Path::new("/s")).is_err());
        let cfg = format!(
            r#"{{{BASE},"linux":{{"namespaces":[{{"type":"user"}}],
               "uidMappings":[{{"containerID":0,"hostID":1000,"size":65536}}],
               "gidMappings":[{{"containerID":0,"hostID":1000,"size":65536}}]}}}}"#
        );
        let p = plan(&req(&cfg, vec![]), Path::new("/s")).unwrap();
        assert_eq!(p.id_maps.unwrap().0, "0 1000 65536\n");
    }

    #[test]
    fn a_hostname_needs_a_uts_namespace() {
        let cfg = format!(r#"{{{BASE},"hostname":"box"}}"#);
        let e = plan(&req(&cfg, vec![]), Path::new("/s")).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidSpec);
        assert!(e.message.contains("hostname"), "{e}");
        let cfg =
            format!(r#"{{{BASE},"hostname":"box","linux":{{"namespaces":[{{"type":"uts"}}]}}}}"#);
        assert!(plan(&req(&cfg, vec![]), Path::new("/s")).is_ok());
    }

    #[test]
    fn malformed_json_is_invalid_spec() {
        let e = plan(&req("{not json", vec![]), Path::new("/s")).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidSpec);
        assert!(e.message.starts_with("config.json"), "{e}");
    }
}
