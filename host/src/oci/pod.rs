//! Pods: which containers share one VM, and the records that say so.
//!
//! A container is either the owner of a VM (the only container in it, or a pod's sandbox: its
//! monitor boots or restores the VM) or a *member* of the VM of another container of the same
//! `--root` (a pod's later container: created inside the sandbox's VM, see
//! `monitor::member`). What decides it, first match:
//!
//! 1. The annotations CRI implementations put on every container: containerd's
//!    `io.kubernetes.cri.container-type` (`sandbox` or `container`) with
//!    `io.kubernetes.cri.sandbox-id`, CRI-O's `io.kubernetes.cri-o.ContainerType` with
//!    `io.kubernetes.cri-o.SandboxID`. A `container` names its sandbox, which must be running
//!    here; a `sandbox` owns its VM.
//! 2. Without them (podman's pods, `ctr run --with-ns network:...`): a container whose spec
//!    names, by path, the network namespace that a running container of this root took over
//!    for its VM joins that VM; the namespaces are compared by device and inode, as recorded
//!    by the owner ([`NETNS_FILE`]).
//! 3. Otherwise it owns its VM.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::bundle::Bundle;
use super::state::{self, Status};

/// containerd's CRI annotations.
pub const CONTAINERD_TYPE: &str = "io.kubernetes.cri.container-type";
/// See [`CONTAINERD_TYPE`].
pub const CONTAINERD_SANDBOX: &str = "io.kubernetes.cri.sandbox-id";
/// CRI-O's.
pub const CRIO_TYPE: &str = "io.kubernetes.cri-o.ContainerType";
/// See [`CRIO_TYPE`].
pub const CRIO_SANDBOX: &str = "io.kubernetes.cri-o.SandboxID";

/// In a VM owner's state directory: the network namespace (device and inode) its VM's network
/// came from. Written by its monitor before it confines itself, pinned.
pub const NETNS_FILE: &str = "netns.json";

/// In a member's state directory: the sandbox whose VM it is in, and its number there.
pub const POD_FILE: &str = "pod.json";

/// What a container is to VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// It has a VM of its own (the only container in it, or a pod's sandbox).
    Owner,
    /// It is created in the VM of the container `sandbox` (same root).
    Member {
        /// The sandbox's id.
        sandbox: String,
        /// What made it one (for messages and the docs' rule).
        because: &'static str,
    },
}

/// Why a container's pod could not be found.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The annotations say it is a pod's container but name no sandbox.
    #[error("config.json: annotation {0} says this is a pod's container, but {1} is missing")]
    NoSandboxId(&'static str, &'static str),
    /// The sandbox named is not there or not running.
    #[error(
        "the pod's sandbox {id} (from {because}) is not a running husk container in this root: {why}"
    )]
    SandboxNotRunning {
        /// The sandbox's id.
        id: String,
        /// What named it.
        because: &'static str,
        /// Its status, or why it could not be read.
        why: String,
    },
    /// A record could not be read or written.
    #[error("{what} {path}")]
    Record {
        /// What was done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A network namespace's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsId {
    /// The nsfs device.
    pub dev: u64,
    /// The namespace's inode.
    pub ino: u64,
}

impl NetnsId {
    /// The identity of the namespace at `path` (a bind-mounted `/run/netns/...` or a
    /// `/proc/<pid>/ns/net`).
    pub fn of(path: &Path) -> std::io::Result<NetnsId> {
        let m = std::fs::metadata(path)?;
        Ok(NetnsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// A member's record ([`POD_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The sandbox's id.
    pub sandbox: String,
    /// The member's number in the VM (`ContainerRef`); 0 until the VM took it.
    pub container: u32,
    /// The work directory husk made for its overlay rootfs, if it mounted one anew (see
    /// `monitor::member`), which `delete` removes.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
}

fn annotation<'a>(bundle: &'a Bundle, key: &str) -> Option<&'a str> {
    bundle
        .spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// What the container of `bundle` is, among the containers of `root` (see the module docs).
pub fn role(bundle: &Bundle, root: &Path) -> Result<Role, PodError> {
    for (typ, sandbox) in [
        (CONTAINERD_TYPE, CONTAINERD_SANDBOX),
        (CRIO_TYPE, CRIO_SANDBOX),
    ] {
        match annotation(bundle, typ) {
            Some("container") => {
                let id = annotation(bundle, sandbox)
                    .filter(|s| !s.is_empty())
                    .ok_or(PodError::NoSandboxId(typ, sandbox))?;
                check_running(root, id, typ)?;
                return Ok(Role::Member {
                    sandbox: id.to_owned(),
                    because: typ,
                });
            }
            Some(_) => return Ok(Role::Owner),
            None => {}
        }
    }
    let netns = match crate::monitor::network::requested(&bundle.spec) {
        crate::monitor::network::Requested::Path(p) => p,
        _ => return Ok(Role::Owner),
    };
    let Ok(wanted) = NetnsId::of(&netns) else {
        return Ok(Role::Owner);
    };
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(Role::Owner);
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(record) = read_json::<NetnsId>(&dir.join(NETNS_FILE)) else {
            continue;
        };
        let id = entry.file_name().to_string_lossy().into_owned();
        if record == wanted && check_running(root, &id, "its network namespace").is_ok() {
            return Ok(Role::Member {
                sandbox: id,
                because: "its network namespace",
            });
        }
    }
    Ok(Role::Owner)
}

/// The state directory of the VM the container of state directory `dir` is in: `dir` itself,
/// or its sandbox's for a pod's later container (its [`POD_FILE`] says which).
pub fn vm_dir(dir: &Path) -> Result<PathBuf, PodError> {
    let root = dir.parent().unwrap_or(Path::new("."));
    Ok(membership(dir)?.map_or_else(|| dir.to_owned(), |pod| root.join(pod.sandbox)))
}

/// The membership of the container of state directory `dir`: none for a VM's owner (no
/// [`POD_FILE`], or the empty one its monitor's jail pins).
pub fn membership(dir: &Path) -> Result<Option<Membership>, PodError> {
    let record = dir.join(POD_FILE);
    match std::fs::symlink_metadata(&record) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Ok(m) if m.is_file() && m.len() == 0 => return Ok(None),
        _ => {}
    }
    let pod: Membership = read_json(&record)?;
    // A file name in the root, nothing else.
    husk_proto::ContainerId::new(pod.sandbox.clone()).map_err(|e| PodError::Record {
        what: "reading",
        path: record,
        source: std::io::Error::other(e),
    })?;
    Ok(Some(pod))
}

/// Whether container `id` of `root` is created or running (its monitor alive).
fn check_running(root: &Path, id: &str, because: &'static str) -> Result<(), PodError> {
    let not = |why: String| PodError::SandboxNotRunning {
        id: id.to_owned(),
        because,
        why,
    };
    let cid = husk_proto::ContainerId::new(id).map_err(|e| not(e.to_string()))?;
    let st = state::read_state(&root.join(id), &cid).map_err(|e| not(e.to_string()))?;
    if !state::monitor_alive(&st) {
        return Err(not("its monitor is gone".into()));
    }
    match st.status {
        Status::Created | Status::Running => Ok(()),
        other => Err(not(format!("it is {other}"))),
    }
}

/// Writes a record (JSON) atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), PodError> {
    let err = |what| {
        let path = path.to_owned();
        move |source| PodError::Record { what, path, source }
    };
    let json = serde_json::to_vec(value).map_err(|e| err("encoding")(std::io::Error::other(e)))?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, json).map_err(err("writing"))?;
    std::fs::rename(&tmp, path).map_err(err("writing"))
}

/// Reads a record (JSON, at most 64 KiB, not through a symlink).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, PodError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |what| {
        let path = path.to_owned();
        move |source| PodError::Record { what, path, source }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(err("reading"))?;
    let mut data = Vec::new();
    file.take(64 << 10)
        .read_to_end(&mut data)
        .map_err(err("reading"))?;
    serde_json::from_slice(&data).map_err(|e| err("parsing")(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(dir: &Path, annotations: &str, netns: &str) -> Bundle {
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        let ns = if netns.is_empty() {
            String::new()
        } else {
            format!(r#","linux":{{"namespaces":[{{"type":"network","path":"{netns}"}}]}}"#)
        };
        std::fs::write(
            dir.join("config.json"),
            format!(
                r#"{{"ociVersion":"1.0.2","process":{{"args":["true"],"cwd":"/","user":{{"uid":0,"gid":0}}}},"root":{{"path":"rootfs"}},"annotations":{{{annotations}}}{ns}}}"#
            ),
        )
        .unwrap();
        Bundle::load(dir).unwrap()
    }

    #[test]
    fn annotations_name_the_sandbox_which_must_run_here() {
        let tmp = husk_e2e::TempDir::new("pod-role");
        let root = tmp.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let b = bundle(
            &tmp.path().join("b1"),
            r#""io.kubernetes.cri.container-type":"sandbox""#,
            "",
        );
        assert_eq!(role(&b, &root).unwrap(), Role::Owner);
        let b = bundle(
            &tmp.path().join("b2"),
            r#""io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"pause1""#,
            "",
        );
        let e = role(&b, &root).unwrap_err().to_string();
        assert!(
            e.contains("pause1") && e.contains("io.kubernetes.cri.container-type"),
            "{e}"
        );
        let b = bundle(
            &tmp.path().join("b3"),
            r#""io.kubernetes.cri-o.ContainerType":"container""#,
            "",
        );
        let e = role(&b, &root).unwrap_err().to_string();
        assert!(e.contains("io.kubernetes.cri-o.SandboxID"), "{e}");
        // A sandbox that is there and whose monitor runs (this test process stands for it).
        let dir = root.join("pause1");
        std::fs::create_dir_all(&dir).unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        let st = state::State {
            oci_version: state::OCI_VERSION.into(),
            id: "pause1".into(),
            status: Status::Running,
            pid: Some(me),
            bundle: tmp.path().to_path_buf(),
            annotations: Default::default(),
            created: state::now_rfc3339(),
            monitor_start_time: state::process_start_time(me).unwrap_or(0),
            exit_status: None,
        };
        state::write_state(&dir, &st).unwrap();
        let b = bundle(
            &tmp.path().join("b4"),
            r#""io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"pause1""#,
            "",
        );
        assert_eq!(
            role(&b, &root).unwrap(),
            Role::Member {
                sandbox: "pause1".into(),
                because: CONTAINERD_TYPE
            }
        );
        // Without annotations: the network namespace the sandbox's VM took.
        let netns = tmp.path().join("netns");
        std::fs::write(&netns, "").unwrap();
        let b = bundle(&tmp.path().join("b5"), "", netns.to_str().unwrap());
        assert_eq!(role(&b, &root).unwrap(), Role::Owner, "no record yet");
        write_json(&dir.join(NETNS_FILE), &NetnsId::of(&netns).unwrap()).unwrap();
        assert!(
            matches!(role(&b, &root).unwrap(), Role::Member { sandbox, .. } if sandbox == "pause1")
        );
    }
}
