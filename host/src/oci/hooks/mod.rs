//! OCI hooks (runtime spec, config.md "POSIX-platform Hooks"): programs the engine names in
//! `config.json` that the runtime runs at points of the container's lifecycle, each with the
//! container's state JSON on its stdin.
//!
//! | hook | who runs it, when | state `status` | a failure |
//! |---|---|---|---|
//! | `prestart`, `createRuntime` | `husk create`, when the monitor asks: after the container's network namespace exists, before the VM boots | `creating` | fails `create`, which cleans up |
//! | `poststart` | `husk start`, after the guest started the process | `running` | a warning; the rest still run |
//! | `poststop` | `husk delete` (and `run`, and a failed `create`), after the container is gone | `stopped` | a warning; the rest still run |
//! | `createContainer`, `startContainer` | refused when the bundle is loaded | | |
//!
//! Every hook runs in the runtime's namespaces, never the container's. `prestart` and
//! `createRuntime` run in `husk create` (see `crate::monitor::create_hooks`): the monitor, the
//! first process of a pid namespace of its own, asks for them once it has made the container's
//! network namespace (the state's `pid`'s, `/proc/<pid>/ns/net`, which is what Docker's
//! `libnetwork-setkey` prestart hook hands to dockerd to fill); from `create` the state's `pid`
//! names the monitor for the kernel too (`ip link ... netns <pid>`). The working directory is
//! the bundle, as runc's.
//!
//! Why `createContainer` and `startContainer` are refused: the spec runs them in the
//! container's mount namespace, i.e. inside the VM, where the host's binaries (the hook's
//! `path`) do not exist and from where nothing on the host can be reached. Running them on the
//! host instead would give them a different file system than the one they are written for, so
//! husk says it cannot honour them rather than pretend.
//!
//! The hooks of a container are kept in its state directory ([`HOOKS_FILE`]) when it is
//! created, so `start` and `delete` run the ones it was created with even if the bundle changed
//! or is gone.
//!
//! A hook's stdin, stdout and stderr are memory files, not pipes: a hook that does not read its
//! stdin, or that leaves a child holding its stdout, can neither block nor outlive the wait.
//! A hook past its `timeout` is killed (SIGKILL) and fails.
//!
//! Which hooks husk runs, and the check of a bundle's hooks, are `spec`; this file saves,
//! loads and runs them.

pub mod spec;

use std::io::{Read, Seek};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Hooks};

pub use self::spec::HookKind;
use super::state::State;
use crate::error_chain;

/// The copy of the spec's hooks in the container's state directory.
pub const HOOKS_FILE: &str = "hooks.json";

/// How much of a failed hook's output its error quotes (the end of it).
const OUTPUT_EXCERPT: usize = 2048;

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The hook's program could not be started (missing, not executable, or its move back to
    /// the host's network namespace failed).
    #[error("{kind} hook {path}: cannot run it")]
    Spawn {
        /// Which hooks.
        kind: HookKind,
        /// The hook's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The hook ran and exited with a status other than 0, or was killed by a signal.
    #[error("{kind} hook {path} failed ({status}); its output: {output:?}")]
    Failed {
        /// Which hooks.
        kind: HookKind,
        /// The hook's path.
        path: PathBuf,
        /// How it ended ("exit status 3", "killed by signal 9").
        status: String,
        /// The end of what it wrote (stderr, then stdout).
        output: String,
    },
    /// The hook still ran when its `timeout` was up; it was killed (SIGKILL).
    #[error("{kind} hook {path} ran past its timeout of {timeout} s and was killed")]
    Timeout {
        /// Which hooks.
        kind: HookKind,
        /// The hook's path.
        path: PathBuf,
        /// The spec's timeout.
        timeout: i64,
    },
    /// Preparing the hook's stdin, stdout or stderr, or waiting for it, failed.
    #[error("{kind} hook {path}: {what}")]
    Io {
        /// Which hooks.
        kind: HookKind,
        /// The hook's path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The copy of the hooks in the state directory ([`HOOKS_FILE`]) could not be written, read
    /// or parsed.
    #[error("cannot write or read the container's hooks {path}")]
    Store {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The state a hook reads on stdin: the runtime spec's state, nothing of husk's own.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct HookState<'a> {
    oci_version: &'a str,
    id: &'a str,
    status: super::state::Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<i32>,
    bundle: &'a Path,
    annotations: &'a std::collections::HashMap<String, String>,
}

impl<'a> From<&'a State> for HookState<'a> {
    fn from(s: &'a State) -> Self {
        HookState {
            oci_version: &s.oci_version,
            id: &s.id,
            status: s.status,
            pid: s.pid,
            bundle: &s.bundle,
            annotations: &s.annotations,
        }
    }
}

/// Keeps `hooks` (those `start` and `delete` will run) in the state directory `dir`.
pub fn save(dir: &Path, hooks: Option<&Hooks>) -> Result<(), HookError> {
    let path = dir.join(HOOKS_FILE);
    // Without hooks an empty file: the jail pins it, so that the monitor cannot add one later.
    let data = match hooks {
        Some(hooks) => serde_json::to_vec(hooks).map_err(std::io::Error::from),
        None => Ok(Vec::new()),
    };
    data.and_then(|d| std::fs::write(&path, d))
        .map_err(|source| HookError::Store { path, source })
}

/// The hooks kept in the state directory `dir` (none when there is no file, or an empty one).
pub fn load(dir: &Path) -> Result<Option<Hooks>, HookError> {
    let path = dir.join(HOOKS_FILE);
    match std::fs::read(&path) {
        Ok(d) if d.is_empty() => Ok(None),
        Ok(d) => serde_json::from_slice(&d)
            .map(Some)
            .map_err(|e| HookError::Store {
                path,
                source: e.into(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HookError::Store { path, source }),
    }
}

/// [`load`] for the hooks that only warn (`poststart`, `poststop`): a file that cannot be read
/// is a warning too, and no hooks.
pub fn load_or_warn(dir: &Path) -> Option<Hooks> {
    load(dir).unwrap_or_else(|e| {
        eprintln!("husk: warning: {}", error_chain(&e));
        None
    })
}

/// Runs the `kind` hooks of `hooks` in order with `state` on their stdin, stopping at the
/// first that fails.
pub fn run(kind: HookKind, hooks: Option<&Hooks>, state: &State) -> Result<(), HookError> {
    let Some(hooks) = hooks else {
        return Ok(());
    };
    kind.hooks(hooks)
        .iter()
        .try_for_each(|h| run_one(kind, h, state))
}

/// Runs every `kind` hook of `hooks`; a failing one is reported on stderr (`husk: warning:
/// ...`) and the rest still run, as the spec asks of `poststart` and `poststop`.
pub fn run_warning(kind: HookKind, hooks: Option<&Hooks>, state: &State) {
    let Some(hooks) = hooks else {
        return;
    };
    for h in kind.hooks(hooks) {
        if let Err(e) = run_one(kind, h, state) {
            eprintln!("husk: warning: {}", error_chain(&e));
        }
    }
}

/// An anonymous memory file.
fn memfd(name: &str) -> std::io::Result<std::fs::File> {
    nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map(std::fs::File::from)
        .map_err(std::io::Error::from)
}

fn run_one(kind: HookKind, hook: &Hook, state: &State) -> Result<(), HookError> {
    let path = hook.path().clone();
    let io_err = |what| {
        let path = path.clone();
        move |source| HookError::Io {
            kind,
            path,
            what,
            source,
        }
    };
    let mut stdin = memfd("husk-hook-state").map_err(io_err("making its stdin"))?;
    serde_json::to_writer(&mut stdin, &HookState::from(state))
        .map_err(std::io::Error::from)
        .and_then(|()| stdin.rewind())
        .map_err(io_err("writing the state to its stdin"))?;
    let stdout = memfd("husk-hook-stdout").map_err(io_err("making its stdout"))?;
    let stderr = memfd("husk-hook-stderr").map_err(io_err("making its stderr"))?;

    let mut cmd = Command::new(&path);
    if let Some((argv0, rest)) = hook.args().as_deref().and_then(<[String]>::split_first) {
        cmd.arg0(argv0).args(rest);
    }
    cmd.env_clear();
    for (k, v) in hook
        .env()
        .iter()
        .flatten()
        .filter_map(|e| e.split_once('='))
    {
        cmd.env(k, v);
    }
    if state.bundle.is_dir() {
        cmd.current_dir(&state.bundle);
    }
    let clone = |f: &std::fs::File, what| f.try_clone().map_err(io_err(what));
    cmd.stdin(clone(&stdin, "making its stdin")?)
        .stdout(clone(&stdout, "making its stdout")?)
        .stderr(clone(&stderr, "making its stderr")?);
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        kind,
        path: path.clone(),
        source,
    })?;
    drop(cmd);

    let deadline = hook
        .timeout()
        .map(|t| Instant::now() + Duration::from_secs(t.unsigned_abs()));
    let mut nap = Duration::from_millis(1);
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait().map_err(io_err("waiting for it"))? {
            break status;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HookError::Timeout {
                kind,
                path,
                timeout: hook.timeout().unwrap_or_default(),
            });
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    };
    if status.success() {
        return Ok(());
    }
    let status = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => status.to_string(),
    };
    let mut output = tail(stderr);
    let out = tail(stdout);
    if !out.is_empty() {
        if !output.is_empty() {
            output.push('\n');
        }
        output.push_str(&out);
    }
    Err(HookError::Failed {
        kind,
        path,
        status,
        output: output.trim_end().to_owned(),
    })
}

/// The last [`OUTPUT_EXCERPT`] bytes written to `f`, as text.
fn tail(mut f: std::fs::File) -> String {
    let len = f.seek(std::io::SeekFrom::End(0)).unwrap_or(0);
    let from = len.saturating_sub(OUTPUT_EXCERPT as u64);
    let mut buf = Vec::new();
    if f.seek(std::io::SeekFrom::Start(from)).is_ok() {
        let _ = f.read_to_end(&mut buf);
    }
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if from > 0 {
        text.insert_str(0, "...");
    }
    text
}

#[cfg(test)]
mod tests;
