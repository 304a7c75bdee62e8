//! The state store under `--root` (default `/run/husk`): one directory per container.
//!
//! ```text
//! <root>/<id>/state.json     the runtime-spec state, kept current by the monitor (atomically)
//! <root>/<id>/container.json the same, as the monitor wrote it before it confined itself: the
//!                            container's fixed facts (bundle, annotations, the monitor's pid)
//! <root>/<id>/lock           flock(2)ed by every command on this id, so they serialise
//! <root>/<id>/monitor.sock   the monitor's control socket
//! <root>/<id>/vsock.sock     the VM's vsock device (host side), `vsock.sock_<port>` listeners
//! ```
//!
//! Commands on different ids never contend: each id has its own lock. The monitor's liveness
//! decides between "what state.json says" and `stopped`: a monitor that is gone (or whose pid
//! now belongs to another process, told apart by its start time) means the container stopped.
//!
//! **What husk trusts.** Once the monitor has confined itself (`monitor::jail`) it serves a
//! guest that may be hostile, so it is treated as possibly taken over: it can write to the
//! directory (its sockets, `state.json`), and husk commands run as root act on what is there.
//! What they act on as root (which process to SIGKILL, which hooks to run, which network
//! changes and cgroups to undo, which file to lock, which socket to talk to) therefore comes
//! only from files written before the jail, which the jail pins read-only in the monitor's
//! mount namespace (see `monitor::jail::PINNED`): `container.json`, `hooks.json`,
//! `network.json`, `cgroups`, `lock` and `monitor.sock`. Of `state.json` only the status and
//! the exit status count, and it is read as a bounded regular file, never through a symlink or
//! from a FIFO.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use husk_proto::ContainerId;
use serde::{Deserialize, Serialize};

/// The live state (see the module docs).
const STATE_FILE: &str = "state.json";

/// The fixed facts, written before the monitor's jail (see the module docs).
pub const FIXED_FILE: &str = "container.json";

/// The lock every command on the container takes.
pub const LOCK_FILE: &str = "lock";

/// More than any state file husk writes (annotations included) needs; a larger one is refused
/// rather than read into memory.
const MAX_STATE_LEN: u64 = 1 << 20;

/// The runtime-spec version husk's state JSON follows.
pub const OCI_VERSION: &str = "1.2.0";

/// Container status as the runtime spec names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The VM is booting or the container being built.
    Creating,
    /// Built, process not started.
    Created,
    /// The process runs.
    Running,
    /// The VM's vCPUs are paused.
    Paused,
    /// The process exited (or the monitor is gone).
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        };
        // pad, not write_str: tables use width specifiers.
        f.pad(s)
    }
}

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// Runtime-spec version.
    pub oci_version: String,
    /// Container id.
    pub id: String,
    /// Status.
    pub status: Status,
    /// The monitor's pid (what engines wait on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Absolute bundle path.
    pub bundle: PathBuf,
    /// The spec's annotations.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
    /// When it was created (RFC 3339), as runc reports it.
    #[serde(default)]
    pub created: String,
    /// The monitor's start time (clock ticks since boot, /proc/PID/stat field 22), to tell it
    /// from a later process that reused the pid.
    #[serde(default)]
    pub monitor_start_time: u64,
    /// The process's exit status once known (128+N for signal N).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
}

impl State {
    /// The state of container `id` of `bundle` while it is being created, its process (the
    /// monitor, or a pod member) `pid` as the host knows it, if it has one yet.
    pub fn creating(id: &str, bundle: &crate::oci::bundle::Bundle, pid: Option<i32>) -> State {
        State {
            oci_version: OCI_VERSION.into(),
            id: id.to_owned(),
            status: Status::Creating,
            pid,
            bundle: bundle.dir.clone(),
            annotations: bundle.spec.annotations().clone().unwrap_or_default(),
            created: now_rfc3339(),
            monitor_start_time: pid.and_then(process_start_time).unwrap_or(0),
            exit_status: None,
        }
    }
}

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The id is not valid.
    #[error("{0}")]
    InvalidId(#[from] husk_proto::InvalidContainerId),
    /// No such container.
    #[error("container \"{0}\" does not exist")]
    NotFound(String),
    /// The id is taken.
    #[error("container \"{0}\" already exists")]
    Exists(String),
    /// Filesystem trouble.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// state.json is unreadable.
    #[error("{path}: corrupt state: {msg}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What serde said.
        msg: String,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError + use<> {
    let path = path.to_path_buf();
    move |source| StateError::Io { what, path, source }
}

/// The state root (`--root`).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// One container's directory, locked for the lifetime of this value.
#[derive(Debug)]
pub struct Entry {
    id: ContainerId,
    dir: PathBuf,
    _lock: File,
}

impl Store {
    /// The store at `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    /// Creates the directory of a new container and locks it.
    pub fn create(&self, id: &str) -> Result<Entry, StateError> {
        let id = ContainerId::new(id)?;
        std::fs::create_dir_all(&self.root).map_err(io("creating", &self.root))?;
        let dir = self.root.join(id.as_str());
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(StateError::Exists(id.to_string()));
            }
            Err(e) => return Err(io("creating", &dir)(e)),
        }
        let lock = lock(&dir)?;
        Ok(Entry {
            id,
            dir,
            _lock: lock,
        })
    }

    /// Opens and locks an existing container's directory (waits for other commands on it).
    pub fn open(&self, id: &str) -> Result<Entry, StateError> {
        let id = ContainerId::new(id)?;
        let dir = self.root.join(id.as_str());
        if !dir.join(STATE_FILE).exists() && !dir.join(LOCK_FILE).exists() {
            return Err(StateError::NotFound(id.to_string()));
        }
        let lock = lock(&dir).map_err(|e| match e {
            StateError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                StateError::NotFound(id.to_string())
            }
            e => e,
        })?;
        // Deleted while we waited for the lock?
        if !dir.exists() {
            return Err(StateError::NotFound(id.to_string()));
        }
        Ok(Entry {
            id,
            dir,
            _lock: lock,
        })
    }

    /// The ids of every container, sorted.
    pub fn list(&self) -> Result<Vec<String>, StateError> {
        let mut ids = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ids),
            Err(e) => return Err(io("reading", &self.root)(e)),
        };
        for entry in entries.flatten() {
            if entry.path().join(STATE_FILE).exists() {
                ids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }
}

fn lock(dir: &Path) -> Result<File, StateError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("opening", &path))?;
    // SAFETY: flock on an fd we own; no memory is involved.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if r != 0 {
        return Err(io("locking", &path)(std::io::Error::last_os_error()));
    }
    Ok(file)
}

impl Entry {
    /// The container's id.
    pub fn id(&self) -> &ContainerId {
        &self.id
    }

    /// The container's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The container's sockets (the monitor's control socket, the vsock device's), by paths
    /// valid while the returned value lives.
    pub fn sockets(&self) -> Result<super::sockets::SocketDir, StateError> {
        super::sockets::SocketDir::open(&self.dir).map_err(io("opening", &self.dir))
    }

    /// Reads the state (as written; see [`Entry::current`] for the live status).
    pub fn read(&self) -> Result<State, StateError> {
        read_state(&self.dir, &self.id)
    }

    /// state.json with the status corrected for a monitor that is gone.
    pub fn current(&self) -> Result<State, StateError> {
        let mut state = self.read()?;
        if state.status != Status::Stopped && !monitor_alive(&state) {
            state.status = Status::Stopped;
        }
        Ok(state)
    }

    /// Writes state.json atomically.
    pub fn write(&self, state: &State) -> Result<(), StateError> {
        write_state(&self.dir, state)
    }

    /// Removes the container's directory.
    pub fn remove(self) -> Result<(), StateError> {
        std::fs::remove_dir_all(&self.dir).map_err(io("removing", &self.dir))
    }
}

/// Reads the state in `dir`: `state.json`, with everything but the status and the exit status
/// taken from `container.json` once that exists (see the module docs).
pub fn read_state(dir: &Path, id: &ContainerId) -> Result<State, StateError> {
    let path = dir.join(STATE_FILE);
    let live = match read_bounded(&path) {
        Ok(d) => parse(&path, &d)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StateError::NotFound(id.to_string()));
        }
        Err(e) => return Err(io("reading", &path)(e)),
    };
    let path = dir.join(FIXED_FILE);
    match read_bounded(&path) {
        // Empty: created by the jail to be pinned, before the monitor wrote it.
        Ok(d) if d.is_empty() => Ok(live),
        Ok(d) => Ok(State {
            status: live.status,
            exit_status: live.exit_status,
            ..parse(&path, &d)?
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(live),
        Err(e) => Err(io("reading", &path)(e)),
    }
}

fn parse(path: &Path, data: &[u8]) -> Result<State, StateError> {
    serde_json::from_slice(data).map_err(|e| StateError::Corrupt {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Reads a file the monitor may have replaced: not through a symlink (ELOOP), not from a FIFO
/// or device (opened non-blocking, refused unless a regular file), at most
/// [`MAX_STATE_LEN`] bytes.
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut data = Vec::new();
    file.take(MAX_STATE_LEN + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_STATE_LEN {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_STATE_LEN} bytes"
        )));
    }
    Ok(data)
}

/// Writes `dir/state.json` atomically (temp file + rename). Used by the monitor without the
/// lock: renames are atomic, and the monitor is the only writer while it lives.
pub fn write_state(dir: &Path, state: &State) -> Result<(), StateError> {
    write_atomic(dir, STATE_FILE, state)
}

/// Writes `dir/container.json`: the monitor, once, before it confines itself.
pub fn write_fixed(dir: &Path, state: &State) -> Result<(), StateError> {
    write_atomic(dir, FIXED_FILE, state)
}

fn write_atomic(dir: &Path, name: &str, state: &State) -> Result<(), StateError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let json = serde_json::to_vec(state).map_err(|e| StateError::Corrupt {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    // A fresh file (O_EXCL): never one that something else put there, e.g. a symlink.
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io("writing", &tmp))?;
    f.write_all(&json).map_err(io("writing", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io("renaming", &tmp))
}

/// The current time as RFC 3339 in UTC with nanoseconds, as runc writes `created`.
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

/// A process's start time (clock ticks after boot), from /proc/PID/stat.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the monitor recorded in `state` still runs (and is still the same process).
pub fn monitor_alive(state: &State) -> bool {
    let Some(pid) = state.pid else {
        return false;
    };
    match process_start_time(pid) {
        Some(t) => state.monitor_start_time == 0 || t == state.monitor_start_time,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (Store, PathBuf) {
        let root = std::env::temp_dir().join(format!(
            "husk-state-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        (Store::new(&root), root)
    }

    fn state(id: &str, pid: Option<i32>) -> State {
        State {
            oci_version: OCI_VERSION.into(),
            id: id.into(),
            status: Status::Running,
            pid,
            bundle: "/b".into(),
            annotations: HashMap::new(),
            created: String::new(),
            monitor_start_time: pid.and_then(process_start_time).unwrap_or(0),
            exit_status: None,
        }
    }

    #[test]
    fn create_open_list_remove() {
        let (store, root) = store();
        assert!(matches!(store.open("nope"), Err(StateError::NotFound(_))));
        assert!(matches!(
            store.create("../evil"),
            Err(StateError::InvalidId(_))
        ));
        let e = store.create("c1").unwrap();
        e.write(&state(
            "c1",
            Some(i32::try_from(std::process::id()).unwrap()),
        ))
        .unwrap();
        drop(e);
        assert!(matches!(store.create("c1"), Err(StateError::Exists(_))));
        assert_eq!(store.list().unwrap(), vec!["c1".to_string()]);
        let e = store.open("c1").unwrap();
        assert_eq!(e.current().unwrap().status, Status::Running);
        let json = serde_json::to_value(e.read().unwrap()).unwrap();
        assert_eq!(json["ociVersion"], OCI_VERSION);
        assert_eq!(json["status"], "running");
        e.remove().unwrap();
        assert!(store.list().unwrap().is_empty());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn timestamps_look_like_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 30, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
    }

    #[test]
    fn only_the_status_is_taken_from_what_the_monitor_keeps_writing() {
        let (store, root) = store();
        let e = store.create("c3").unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        let mut fixed = state("c3", Some(me));
        fixed.status = Status::Creating;
        write_fixed(e.dir(), &fixed).unwrap();
        // What a monitor taken over by its guest could write: another pid, another bundle.
        let mut lie = state("c3", Some(1));
        lie.monitor_start_time = process_start_time(1).unwrap_or(0);
        lie.bundle = "/elsewhere".into();
        lie.status = Status::Paused;
        lie.exit_status = Some(3);
        e.write(&lie).unwrap();
        let read = e.read().unwrap();
        assert_eq!(read.pid, Some(me));
        assert_eq!(read.bundle, PathBuf::from("/b"));
        assert_eq!(read.monitor_start_time, fixed.monitor_start_time);
        assert_eq!((read.status, read.exit_status), (Status::Paused, Some(3)));
        // An empty record (the jail pins one before the monitor writes it) is no record.
        std::fs::write(e.dir().join(FIXED_FILE), b"").unwrap();
        assert_eq!(e.read().unwrap().pid, Some(1));
        drop(e);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_state_file_that_is_a_symlink_a_fifo_or_huge_is_refused() {
        let (store, root) = store();
        let e = store.create("c4").unwrap();
        let path = e.dir().join(STATE_FILE);
        let secret = e.dir().join("secret");
        std::fs::write(&secret, serde_json::to_vec(&state("c4", None)).unwrap()).unwrap();
        std::os::unix::fs::symlink(&secret, &path).unwrap();
        let err = e.read().unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
        std::fs::remove_file(&path).unwrap();
        // A FIFO nobody writes to: an error at once, not a read that blocks.
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = e.read().unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let mut big = serde_json::to_vec(&state("c4", None)).unwrap();
        big.resize(usize::try_from(MAX_STATE_LEN).unwrap() + 1, b' ');
        std::fs::write(&path, big).unwrap();
        let err = e.read().unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
        drop(e);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_dead_monitor_means_stopped() {
        let (store, root) = store();
        let e = store.create("c2").unwrap();
        // A pid that cannot exist (above pid_max).
        e.write(&state("c2", Some(i32::MAX))).unwrap();
        assert_eq!(e.current().unwrap().status, Status::Stopped);
        // Our own pid with a wrong start time: a reused pid.
        let mut s = state("c2", Some(i32::try_from(std::process::id()).unwrap()));
        s.monitor_start_time += 1;
        e.write(&s).unwrap();
        assert_eq!(e.current().unwrap().status, Status::Stopped);
        drop(e);
        std::fs::remove_dir_all(root).unwrap();
    }
}
