//! A container process's own settings (OCI `process`): user, capabilities, rlimits,
//! no_new_privs, environment, working directory, and the final `execve`.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use caps::{CapSet, CapsHashSet};
use husk_proto::ErrorCode;
use nix::sys::resource::Resource;
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{Capabilities, PosixRlimitType, Process};

use super::seccomp::SeccompPlan;
use super::sync::ChildError;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The five capability sets to end with.
#[derive(Debug, Clone, Default)]
pub struct CapPlan {
    bounding: CapsHashSet,
    effective: CapsHashSet,
    inheritable: CapsHashSet,
    permitted: CapsHashSet,
    ambient: CapsHashSet,
}

/// Everything about the process itself, checked before any fork.
#[derive(Debug, Clone)]
pub struct ProcessPlan {
    /// argv.
    pub args: Vec<CString>,
    /// The environment, `KEY=value`.
    pub env: Vec<CString>,
    /// PATH used to look up `args[0]`.
    path_env: String,
    /// Working directory (absolute, in the container).
    pub cwd: PathBuf,
    uid: u32,
    gid: u32,
    additional_gids: Vec<u32>,
    umask: Option<u32>,
    caps: Option<CapPlan>,
    rlimits: Vec<(Resource, u64, u64)>,
    no_new_privileges: bool,
    oom_score_adj: Option<i32>,
    /// Whether it gets a terminal.
    pub terminal: bool,
    /// `consoleSize` as (rows, columns): the terminal's size before the process starts.
    pub console_size: Option<(u16, u16)>,
}

fn invalid(msg: impl Into<String>) -> ChildError {
    ChildError {
        code: ErrorCode::InvalidSpec,
        message: msg.into(),
    }
}

fn cstring(what: &str, s: &str) -> Result<CString, ChildError> {
    CString::new(s).map_err(|_| invalid(format!("{what} contains a NUL byte: {s:?}")))
}

fn cap_set(set: &Option<Capabilities>, which: &str) -> Result<CapsHashSet, ChildError> {
    let mut out = CapsHashSet::new();
    for cap in set.iter().flatten() {
        // oci-spec's names are the kernel's "CAP_*" names, as is caps'.
        let name = serde_json::to_value(cap)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let c = caps::Capability::from_str(&name).map_err(|_| ChildError {
            code: ErrorCode::Unsupported,
            message: format!("process.capabilities.{which}: unknown capability {name:?}"),
        })?;
        out.insert(c);
    }
    Ok(out)
}

fn rlimit_resource(t: PosixRlimitType) -> Resource {
    match t {
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
    }
}

impl ProcessPlan {
    /// Validates an OCI process object.
    pub fn from_spec(p: &Process) -> Result<Self, ChildError> {
        let args = p
            .args()
            .as_ref()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| invalid("process.args must not be empty"))?
            .iter()
            .map(|a| cstring("process.args", a))
            .collect::<Result<Vec<_>, _>>()?;
        let mut path_env = None;
        let mut env = Vec::new();
        for kv in p.env().iter().flatten() {
            if !kv.contains('=') {
                return Err(invalid(format!("process.env entry {kv:?} has no '='")));
            }
            if let Some(v) = kv.strip_prefix("PATH=") {
                path_env = Some(v.to_string());
            }
            env.push(cstring("process.env", kv)?);
        }
        super::host_env::apply(&mut env);
        let cwd = p.cwd().clone();
        if !cwd.is_absolute() {
            return Err(invalid(format!(
                "process.cwd {} is not an absolute path",
                cwd.display()
            )));
        }
        let caps = match p.capabilities() {
            None => None,
            Some(c) => Some(CapPlan {
                bounding: cap_set(c.bounding(), "bounding")?,
                effective: cap_set(c.effective(), "effective")?,
                inheritable: cap_set(c.inheritable(), "inheritable")?,
                permitted: cap_set(c.permitted(), "permitted")?,
                ambient: cap_set(c.ambient(), "ambient")?,
            }),
        };
        let rlimits = p
            .rlimits()
            .iter()
            .flatten()
            .map(|r| (rlimit_resource(r.typ()), r.soft(), r.hard()))
            .collect();
        let console_size = match p.console_size() {
            None => None,
            Some(b) => {
                let dim = |v: u64, what: &str| {
                    u16::try_from(v).map_err(|_| {
                        invalid(format!("process.consoleSize.{what} {v} is over 65535"))
                    })
                };
                Some((dim(b.height(), "height")?, dim(b.width(), "width")?))
            }
        };
        let user = p.user();
        Ok(Self {
            args,
            env,
            path_env: path_env.unwrap_or_else(|| DEFAULT_PATH.into()),
            cwd,
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
            umask: user.umask(),
            caps,
            rlimits,
            no_new_privileges: p.no_new_privileges().unwrap_or(false),
            oom_score_adj: p.oom_score_adj(),
            terminal: p.terminal().unwrap_or(false),
            console_size,
        })
    }

    /// Adds `HOME` from the container's /etc/passwd when the spec does not set it (as runc).
    /// Runs in the container's root.
    pub fn default_home(&mut self) {
        if self.env.iter().any(|e| e.as_bytes().starts_with(b"HOME=")) {
            return;
        }
        let home = std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|p| {
                p.lines().find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 6 && f[2].parse::<u32>().ok() == Some(self.uid))
                        .then(|| f[5].to_string())
                })
            })
            .unwrap_or_else(|| "/".into());
        if let Ok(c) = CString::new(format!("HOME={home}")) {
            self.env.push(c);
        }
    }

    /// Finds the executable the way runc (Go's exec.LookPath) does, with runc's messages
    /// (engines match on them: "executable file not found" and "no such file" mean 127,
    /// "permission denied" 126). Runs in the container's root, before privileges drop.
    pub fn find_executable(&self) -> Result<CString, ChildError> {
        let arg0 = self.args[0].to_string_lossy().into_owned();
        let not_found = |msg: String| ChildError {
            code: ErrorCode::ExecutableNotFound,
            message: msg,
        };
        if arg0.contains('/') {
            let path = if Path::new(&arg0).is_absolute() {
                PathBuf::from(&arg0)
            } else {
                self.cwd.join(&arg0)
            };
            let md = std::fs::metadata(&path)
                .map_err(|e| not_found(format!("exec: {arg0:?}: stat {arg0}: {}", io_msg(&e))))?;
            if md.is_dir() || md.permissions().mode() & 0o111 == 0 {
                return Err(ChildError {
                    code: ErrorCode::PermissionDenied,
                    message: format!("exec: {arg0:?}: permission denied"),
                });
            }
            return cstring("process.args[0]", &path.to_string_lossy());
        }
        for dir in self.path_env.split(':') {
            let dir = if dir.is_empty() { "." } else { dir };
            let cand = Path::new(dir).join(&arg0);
            if let Ok(md) = std::fs::metadata(&cand)
                && md.is_file()
                && md.permissions().mode() & 0o111 != 0
            {
                return cstring("process.args[0]", &cand.to_string_lossy());
            }
        }
        Err(not_found(format!(
            "exec: {arg0:?}: executable file not found in $PATH"
        )))
    }

    /// Settings that need privilege and must precede the privilege drop: rlimits and the
    /// OOM score.
    pub fn apply_limits(&self) -> Result<(), ChildError> {
        for (res, soft, hard) in &self.rlimits {
            nix::sys::resource::setrlimit(*res, *soft, *hard).map_err(|e| {
                ChildError::sys(format!("setting rlimit {res:?} to {soft}/{hard}"), e)
            })?;
        }
        if let Some(adj) = self.oom_score_adj {
            std::fs::write("/proc/self/oom_score_adj", adj.to_string())
                .map_err(|e| ChildError::sys("setting oom_score_adj", e))?;
        }
        Ok(())
    }

    /// Drops to the spec's user and capabilities, applies seccomp and no_new_privs, and
    /// execs `exe`. Returns only on failure.
    pub fn exec(&self, exe: &CString, seccomp: Option<&SeccompPlan>) -> ChildError {
        match self.drop_privileges_and_exec(exe, seccomp) {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    fn drop_privileges_and_exec(
        &self,
        exe: &CString,
        seccomp: Option<&SeccompPlan>,
    ) -> Result<std::convert::Infallible, ChildError> {
        // Everything that needs no privilege and may use a syscall a profile lacks comes
        // before the filter: profiles written before close_range(2) existed deny it (older
        // Docker-style allow lists, hand-written ones), and runc runs them. After the filter only
        // what runc itself does after its own is left: prctl, capget/capset, setgroups,
        // setres[ug]id, umask, chdir (fchown of the terminal) and execve, which every
        // profile that can run a program allows.
        crate::sys::reset_signals();
        crate::sys::cloexec_from(3).map_err(|e| ChildError::sys("close_range", e))?;
        // Without no_new_privs the filter must go in while we still hold CAP_SYS_ADMIN.
        if !self.no_new_privileges
            && let Some(s) = seccomp
        {
            s.install()
                .map_err(|e| ChildError::sys("installing the seccomp profile", e))?;
        }
        if let Some(c) = &self.caps {
            nix::sys::prctl::set_keepcaps(true)
                .map_err(|e| ChildError::sys("PR_SET_KEEPCAPS", e))?;
            for cap in caps::all() {
                if !c.bounding.contains(&cap) {
                    // A capability the kernel does not know cannot be dropped: ignore EINVAL.
                    let _ = caps::drop(None, CapSet::Bounding, cap);
                }
            }
        }
        if self.terminal {
            // The pty slave was created by root; as runc does, it becomes the process's own
            // (its group stays devpts' `gid=`), so that it can reopen its terminal by name.
            // In a user namespace that does not map the uid (EINVAL) or the slave's group
            // (EPERM) it cannot change owner: it stays root's, which costs only that.
            match nix::unistd::fchown(std::io::stdin(), Some(Uid::from_raw(self.uid)), None) {
                Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::EPERM) => {}
                Err(e) => {
                    return Err(ChildError::sys(
                        "giving the terminal to the process's user",
                        e,
                    ));
                }
            }
        }
        let gids: Vec<Gid> = self
            .additional_gids
            .iter()
            .map(|g| Gid::from_raw(*g))
            .collect();
        if let Err(e) = nix::unistd::setgroups(&gids) {
            // In a user namespace with setgroups denied only an empty list is acceptable.
            if !(gids.is_empty() && e == nix::errno::Errno::EPERM) {
                return Err(ChildError::sys(
                    format!("setgroups({:?})", self.additional_gids),
                    e,
                ));
            }
        }
        let gid = Gid::from_raw(self.gid);
        nix::unistd::setresgid(gid, gid, gid)
            .map_err(|e| ChildError::sys(format!("setting gid {}", self.gid), e))?;
        let uid = Uid::from_raw(self.uid);
        nix::unistd::setresuid(uid, uid, uid)
            .map_err(|e| ChildError::sys(format!("setting uid {}", self.uid), e))?;
        if let Some(c) = &self.caps {
            let set = |which, v: &CapsHashSet, name| {
                caps::set(None, which, v)
                    .map_err(|e| ChildError::sys(format!("setting the {name} capabilities"), e))
            };
            // Each capset must leave a consistent state: inheritable may only grow from the
            // permitted set still held, and effective must stay inside permitted. So
            // inheritable first, then effective, and permitted shrinks last (root still holds
            // the full effective set until then).
            set(CapSet::Inheritable, &c.inheritable, "inheritable")?;
            set(CapSet::Effective, &c.effective, "effective")?;
            set(CapSet::Permitted, &c.permitted, "permitted")?;
            // The kernel accepts an ambient capability only if it is both permitted and
            // inheritable. Specs that list ambient capabilities without the inheritable ones
            // (`runc spec`'s default does) still run under runc and crun, which skip what the
            // kernel would refuse; so do we. Other failures are errors.
            let raisable = c
                .ambient
                .iter()
                .filter(|cap| c.inheritable.contains(cap) && c.permitted.contains(cap));
            for cap in raisable {
                caps::raise(None, CapSet::Ambient, *cap)
                    .map_err(|e| ChildError::sys(format!("raising ambient {cap}"), e))?;
            }
        }
        if let Some(mask) = self.umask {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
        }
        nix::unistd::chdir(&self.cwd)
            .map_err(|e| ChildError::sys(format!("chdir to {}", self.cwd.display()), e))?;
        if self.no_new_privileges {
            nix::sys::prctl::set_no_new_privs()
                .map_err(|e| ChildError::sys("PR_SET_NO_NEW_PRIVS", e))?;
            if let Some(s) = seccomp {
                s.install()
                    .map_err(|e| ChildError::sys("installing the seccomp profile", e))?;
            }
        }
        let err = crate::sys::execve(exe, &self.args, &self.env);
        let arg0 = self.args[0].to_string_lossy();
        Err(match err.raw_os_error() {
            Some(libc::ENOENT) => ChildError {
                code: ErrorCode::ExecutableNotFound,
                message: format!("exec: {arg0:?}: no such file or directory"),
            },
            Some(libc::EACCES) | Some(libc::EPERM) => ChildError {
                code: ErrorCode::PermissionDenied,
                message: format!("exec: {arg0:?}: permission denied"),
            },
            _ => ChildError::sys(format!("exec {arg0:?}"), err),
        })
    }
}

fn io_msg(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(json: &str) -> Process {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_plain_process_validates() {
        let p = ProcessPlan::from_spec(&process(
            r#"{"args":["sh","-c","true"],"cwd":"/","user":{"uid":1000,"gid":1000},
                "env":["PATH=/bin","A=b"],
                "capabilities":{"bounding":["CAP_KILL"],"effective":["CAP_KILL"]},
                "rlimits":[{"type":"RLIMIT_NOFILE","hard":1024,"soft":512}]}"#,
        ))
        .unwrap();
        assert_eq!(p.args.len(), 3);
        assert_eq!(p.path_env, "/bin");
        assert_eq!(p.rlimits, vec![(Resource::RLIMIT_NOFILE, 512, 1024)]);
    }

    #[test]
    fn bad_processes_are_refused_with_the_field_named() {
        let e = ProcessPlan::from_spec(&process(
            r#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#,
        ))
        .unwrap_err();
        assert!(e.message.contains("process.args"), "{e}");
        let e = ProcessPlan::from_spec(&process(
            r#"{"args":["x"],"cwd":"rel","user":{"uid":0,"gid":0}}"#,
        ))
        .unwrap_err();
        assert!(e.message.contains("process.cwd"), "{e}");
        let e = ProcessPlan::from_spec(&process(
            r#"{"args":["x"],"cwd":"/","env":["NOEQ"],"user":{"uid":0,"gid":0}}"#,
        ))
        .unwrap_err();
        assert!(e.message.contains("NOEQ"), "{e}");
        let e = ProcessPlan::from_spec(&process(
            r#"{"args":["x"],"cwd":"/","consoleSize":{"height":70000,"width":80},"user":{"uid":0,"gid":0}}"#,
        ))
        .unwrap_err();
        assert!(e.message.contains("consoleSize.height 70000"), "{e}");
    }

    #[test]
    fn executable_lookup_uses_runc_messages() {
        let p = ProcessPlan::from_spec(&process(
            r#"{"args":["definitely-not-here"],"cwd":"/","env":["PATH=/nonexistent:/bin"],"user":{"uid":0,"gid":0}}"#,
        ))
        .unwrap();
        let e = p.find_executable().unwrap_err();
        assert_eq!(e.code, ErrorCode::ExecutableNotFound);
        assert!(
            e.message.contains("executable file not found in $PATH"),
            "{e}"
        );
        let p = ProcessPlan::from_spec(&process(
            r#"{"args":["/no/such"],"cwd":"/","user":{"uid":0,"gid":0}}"#,
        ))
        .unwrap();
        let e = p.find_executable().unwrap_err();
        assert!(e.message.contains("no such file or directory"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("not-executable");
        std::fs::write(&plain, "data").unwrap();
        let json = format!(
            r#"{{"args":["{}"],"cwd":"/","user":{{"uid":0,"gid":0}}}}"#,
            plain.display()
        );
        let p = ProcessPlan::from_spec(&process(&json)).unwrap();
        let e = p.find_executable().unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        assert!(e.message.contains("permission denied"), "{e}");
        let p = ProcessPlan::from_spec(&process(
            r#"{"args":["sh"],"cwd":"/","env":["PATH=/bin:/usr/bin"],"user":{"uid":0,"gid":0}}"#,
        ))
        .unwrap();
        assert!(p.find_executable().unwrap().to_bytes().ends_with(b"/sh"));
    }
}
