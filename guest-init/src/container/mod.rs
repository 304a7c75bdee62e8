//! The container: built from the spec the way runc builds one, but inside the VM.
//!
//! `create` forks the container's process into its new namespaces; the child builds the
//! filesystem view, pivots into it and stops just before `execve`, waiting for `start`.
//! `exec` forks a further process into the same namespaces and cgroup. The parent side (this
//! module) keeps the pipes to the waiting child and the cgroup.

mod cgroup;
mod console;
mod mounts;
mod process;
mod seccomp;
mod spec;
mod sync;

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use husk_proto::{
    ContainerId, ContainerStats, CreateRequest, ErrorCode, ErrorReply, ExecRequest, FsSource,
};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::relay::{ChildStdio, ProcessIo};
use crate::transport::Transport;
use crate::{log, sys};

pub use sync::ChildError;

/// Where the guest mounts virtio-fs shares (`<SHARE_ROOT>/<tag>`).
pub const SHARE_ROOT: &str = "/run/husk/fs";

/// What the container engine needs from its surroundings.
#[derive(Debug, Clone)]
pub struct Env {
    /// How to reach the host's stdio ports.
    pub transport: Transport,
    /// The cgroup v2 hierarchy.
    pub cgroup_root: PathBuf,
    /// Where shares are mounted.
    pub share_root: PathBuf,
}

/// A process just started, with the guest end of its stdio.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid in the guest.
    pub pid: Pid,
    /// Its stdio pumps.
    pub io: ProcessIo,
}

/// The lifecycle of the container's main process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Built, waiting for start.
    Created,
    /// Exec'd.
    Running,
    /// Exited.
    Stopped,
}

/// A container in this VM.
#[derive(Debug)]
pub struct Container {
    id: ContainerId,
    init: Pid,
    status: Status,
    /// Parent → child pipe until start.
    go: Option<File>,
    /// Child → parent pipe until start.
    report: Option<File>,
    cgroup: Option<cgroup::Cgroup>,
    /// Namespaces exec'd processes join (in join order, user last).
    ns: Vec<CloneFlags>,
    seccomp: Option<seccomp::SeccompPlan>,
    /// Whether the container has its own pid namespace.
    has_pid_ns: bool,
}

fn err(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        code,
        message: message.into(),
    }
}

fn sys_reply(what: &str, e: impl std::fmt::Display) -> ErrorReply {
    err(ErrorCode::System, format!("{what}: {e}"))
}

impl From<ChildError> for ErrorReply {
    fn from(e: ChildError) -> Self {
        err(e.code, e.message)
    }
}

/// Mounts the virtio-fs share `tag` under the share root (once).
fn ensure_share(env: &Env, src: &FsSource) -> Result<(), ErrorReply> {
    let FsSource::Share { tag, .. } = src else {
        return Ok(());
    };
    let dir = env.share_root.join(tag);
    if dir.join(".").exists() && is_mountpoint(&dir) {
        return Ok(());
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| sys_reply(&format!("creating {}", dir.display()), e))?;
    nix::mount::mount(
        Some(tag.as_str()),
        &dir,
        Some("virtiofs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| sys_reply(&format!("mounting the virtio-fs share {tag:?}"), e))
}

fn is_mountpoint(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

/// Closes every descriptor from 3 up except `keep` (the child must not hold the parent's
/// ends of pipes — stdin EOF would never arrive — nor any other guest descriptor).
fn close_fds_except(keep: &[RawFd]) {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// Both ends of the channel that carries a terminal's master from the process to us.
type ConsoleChannel = (console::Receiver, console::Sender);

/// Connects a process's stdio. A terminal also gets the channel on which the process sends
/// its pty master (it opens the pty itself, in the container; see `console`).
fn setup_stdio(
    stdio: &husk_proto::Stdio,
    env: &Env,
) -> Result<(ChildStdio, ProcessIo, Option<ConsoleChannel>), ErrorReply> {
    let (child, io) =
        ProcessIo::setup(stdio, &env.transport).map_err(|e| sys_reply("setting up stdio", e))?;
    let console = match child {
        ChildStdio::Terminal => {
            Some(console::channel().map_err(|e| sys_reply("creating the terminal channel", e))?)
        }
        ChildStdio::Fds { .. } => None,
    };
    Ok((child, io, console))
}

/// Parent side: takes the master the child sends and relays it. If the child failed first,
/// its own report says why.
fn receive_terminal(
    console: Option<console::Receiver>,
    io: &mut ProcessIo,
    report: &mut File,
) -> Result<(), ErrorReply> {
    let Some(rx) = console else { return Ok(()) };
    match rx.receive() {
        Ok(master) => io
            .attach_terminal(master)
            .map_err(|e| sys_reply("relaying the terminal", e)),
        Err(e) => Err(match sync::read_report(report) {
            Ok(sync::ChildReport::Failed(ce)) => ce.into(),
            _ => sys_reply("receiving the process's terminal", e),
        }),
    }
}

/// In a forked child: makes it a session leader with the stdio descriptors as 0, 1, 2 (a
/// terminal comes later, from the container's devpts: [`console::Sender::open_terminal`]).
fn install_stdio(stdio: ChildStdio) -> Result<(), ChildError> {
    nix::unistd::setsid().map_err(|e| ChildError::sys("setsid", e))?;
    if let ChildStdio::Fds {
        stdin,
        stdout,
        stderr,
    } = &stdio
    {
        for (fd, target) in [(stdin, 0), (stdout, 1), (stderr, 2)] {
            if fd.as_raw_fd() != target {
                sys::dup_onto(fd, target).map_err(|e| ChildError::sys("dup2", e))?;
            }
        }
    }
    Ok(())
}

/// Runs `body` as the rest of a forked child's life: reports its error and exits.
fn child_main(
    report: &mut File,
    body: impl FnOnce(&mut File) -> Result<std::convert::Infallible, ChildError>,
) -> ! {
    let e = match body(report) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    sync::report_failure(report, &e);
    // SAFETY: _exit ends the process at once without running the parent's atexit handlers
    // or flushing stdio buffers it inherited (which would duplicate the parent's output).
    unsafe { libc::_exit(1) }
}

impl Container {
    /// Builds the container and returns it with its (not yet started) process.
    pub fn create(req: &CreateRequest, env: &Env) -> Result<(Self, Spawned), ErrorReply> {
        let plan = spec::plan(req, &env.share_root)?;
        ensure_share(env, &req.rootfs)?;
        for m in &req.mounts {
            ensure_share(env, &m.source)?;
        }
        let resources = plan
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref());
        let cgroup = if cgroup::is_cgroup2(&env.cgroup_root) {
            Some(
                cgroup::Cgroup::create(&env.cgroup_root, resources)
                    .map_err(|m| err(ErrorCode::InvalidSpec, m))?,
            )
        } else {
            if resources.is_some() {
                log::warning!(
                    "no cgroup v2 hierarchy at {}: linux.resources not applied",
                    env.cgroup_root.display()
                );
            }
            None
        };
        Self::spawn_init(req, env, plan, cgroup)
    }

    fn spawn_init(
        req: &CreateRequest,
        env: &Env,
        mut plan: spec::Plan,
        cgroup: Option<cgroup::Cgroup>,
    ) -> Result<(Self, Spawned), ErrorReply> {
        let cleanup = |cg: &Option<cgroup::Cgroup>| {
            if let Some(cg) = cg {
                cg.destroy();
            }
        };
        let (child_stdio, mut io, console) = match setup_stdio(&req.stdio, env) {
            Ok(x) => x,
            Err(e) => {
                cleanup(&cgroup);
                return Err(e);
            }
        };
        let (mut go_r, mut go_w) = sync::pipe().map_err(|e| sys_reply("pipe", e))?;
        let (mut rep_r, mut rep_w) = sync::pipe().map_err(|e| sys_reply("pipe", e))?;
        let in_userns = plan.id_maps.is_some();
        let (console_rx, console_tx) = console.unzip();

        let pid = match sys::fork_into_namespaces(plan.clone_flags) {
            Err(e) => {
                cleanup(&cgroup);
                return Err(sys_reply("creating the container's namespaces (clone)", e));
            }
            Ok(0) => {
                drop(go_w);
                drop(rep_r);
                drop(io);
                drop(console_rx);
                let mut keep = vec![go_r.as_raw_fd(), rep_w.as_raw_fd()];
                keep.extend(child_stdio.raw_fds());
                keep.extend(console_tx.as_ref().map(console::Sender::raw_fd));
                close_fds_except(&keep);
                child_main(&mut rep_w, |rep| {
                    install_stdio(child_stdio)?;
                    init_child(&mut plan, &mut go_r, rep, in_userns, console_tx)
                });
            }
            Ok(pid) => Pid::from_raw(pid),
        };
        drop(go_r);
        drop(rep_w);
        drop(child_stdio);
        drop(console_tx);

        let fail = |e: ErrorReply, cg: &Option<cgroup::Cgroup>| {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            cleanup(cg);
            e
        };
        if let Some((uid_map, gid_map)) = &plan.id_maps {
            let w = |f: &str, v: &str| {
                std::fs::write(format!("/proc/{pid}/{f}"), v)
                    .map_err(|e| sys_reply(&format!("writing {f} {v:?}"), e))
            };
            if let Err(e) = w("uid_map", uid_map).and_then(|()| w("gid_map", gid_map)) {
                return Err(fail(e, &cgroup));
            }
        }
        if let Some(cg) = &cgroup
            && let Err(e) = cg.add(pid.as_raw())
        {
            return Err(fail(
                sys_reply("moving the process into its cgroup", e),
                &cgroup,
            ));
        }
        if let Err(e) = sync::send(&mut go_w, sync::GO_SETUP) {
            return Err(fail(
                sys_reply("releasing the container process", e),
                &cgroup,
            ));
        }
        if let Err(e) = receive_terminal(console_rx, &mut io, &mut rep_r) {
            return Err(fail(e, &cgroup));
        }
        match sync::read_report(&mut rep_r) {
            Ok(sync::ChildReport::Ready) => {}
            Ok(sync::ChildReport::Failed(e)) => return Err(fail(e.into(), &cgroup)),
            Ok(sync::ChildReport::Closed) => {
                return Err(fail(
                    err(
                        ErrorCode::System,
                        "the container process died while being built",
                    ),
                    &cgroup,
                ));
            }
            Err(e) => {
                return Err(fail(
                    sys_reply("reading the container process's report", e),
                    &cgroup,
                ));
            }
        }

        let mut ns = Vec::new();
        for (flag, clone) in [
            (CloneFlags::CLONE_NEWNS, libc::CLONE_NEWNS),
            (CloneFlags::CLONE_NEWUTS, libc::CLONE_NEWUTS),
            (CloneFlags::CLONE_NEWIPC, libc::CLONE_NEWIPC),
            (CloneFlags::CLONE_NEWUSER, libc::CLONE_NEWUSER),
        ] {
            if plan.clone_flags & clone != 0 {
                ns.push(flag);
            }
        }
        if plan.cgroup_ns {
            ns.insert(
                ns.len() - usize::from(in_userns),
                CloneFlags::CLONE_NEWCGROUP,
            );
        }
        let container = Container {
            id: req.container_id.clone(),
            init: pid,
            status: Status::Created,
            go: Some(go_w),
            report: Some(rep_r),
            cgroup,
            ns,
            seccomp: plan.seccomp.take(),
            has_pid_ns: plan.clone_flags & libc::CLONE_NEWPID != 0,
        };
        Ok((container, Spawned { pid, io }))
    }

    /// Records that the main process exited.
    pub fn mark_stopped(&mut self) {
        self.status = Status::Stopped;
        self.go = None;
        self.report = None;
    }

    /// Lets the main process exec.
    pub fn start(&mut self) -> Result<(), ErrorReply> {
        if self.status != Status::Created {
            return Err(err(
                ErrorCode::InvalidState,
                format!(
                    "container {} is not created (it is {:?})",
                    self.id, self.status
                ),
            ));
        }
        let (Some(mut go), Some(mut report)) = (self.go.take(), self.report.take()) else {
            return Err(err(
                ErrorCode::InvalidState,
                "container was already started",
            ));
        };
        sync::send(&mut go, sync::GO_START)
            .map_err(|e| sys_reply("starting the container process", e))?;
        match sync::read_report(&mut report) {
            Ok(sync::ChildReport::Closed) => {
                self.status = Status::Running;
                Ok(())
            }
            Ok(sync::ChildReport::Failed(e)) => {
                self.status = Status::Stopped;
                Err(e.into())
            }
            Ok(sync::ChildReport::Ready) => Err(err(
                ErrorCode::System,
                "container process reported ready twice",
            )),
            Err(e) => Err(sys_reply("reading the container process's report", e)),
        }
    }

    /// Starts a further process in the container.
    pub fn exec(&self, req: &ExecRequest, env: &Env) -> Result<Spawned, ErrorReply> {
        if self.status == Status::Stopped {
            return Err(err(
                ErrorCode::InvalidState,
                format!("container {} is stopped", self.id),
            ));
        }
        let spec: oci_spec::runtime::Process = serde_json::from_slice(&req.process_json)
            .map_err(|e| err(ErrorCode::InvalidSpec, format!("process.json: {e}")))?;
        let mut plan = process::ProcessPlan::from_spec(&spec)?;
        plan.terminal = req.stdio.is_terminal();
        let (child_stdio, mut io, console) = setup_stdio(&req.stdio, env)?;
        let (console_rx, console_tx) = console.unzip();
        let (mut rep_r, mut rep_w) = sync::pipe().map_err(|e| sys_reply("pipe", e))?;
        // Namespace descriptors, opened while /proc still shows guest pids.
        let open_ns = |name: &str| -> Result<OwnedFd, ErrorReply> {
            std::fs::File::open(format!("/proc/{}/ns/{name}", self.init))
                .map(OwnedFd::from)
                .map_err(|e| sys_reply(&format!("opening the container's {name} namespace"), e))
        };
        let mut ns_fds = Vec::new();
        for flag in &self.ns {
            let name = match *flag {
                CloneFlags::CLONE_NEWNS => "mnt",
                CloneFlags::CLONE_NEWUTS => "uts",
                CloneFlags::CLONE_NEWIPC => "ipc",
                CloneFlags::CLONE_NEWUSER => "user",
                CloneFlags::CLONE_NEWCGROUP => "cgroup",
                _ => continue,
            };
            ns_fds.push((open_ns(name)?, *flag));
        }
        // A pid namespace applies to children only: enter it for the fork, then come back.
        let pid_ns = if self.has_pid_ns {
            Some((open_ns("pid")?, open_ns_self("pid")?))
        } else {
            None
        };
        if let Some((theirs, _)) = &pid_ns {
            nix::sched::setns(theirs, CloneFlags::CLONE_NEWPID)
                .map_err(|e| sys_reply("entering the pid namespace", e))?;
        }
        let forked = sys::fork_into_namespaces(0);
        if let Some((_, ours)) = &pid_ns
            && !matches!(forked, Ok(0))
            && let Err(e) = nix::sched::setns(ours, CloneFlags::CLONE_NEWPID)
        {
            log::error!("cannot return to husk-init's pid namespace: {e}");
        }
        let cgroup_procs = self.cgroup.as_ref().map(|c| c.path().join("cgroup.procs"));
        let pid = match forked {
            Err(e) => return Err(sys_reply("fork", e)),
            Ok(0) => {
                drop(rep_r);
                drop(io);
                drop(console_rx);
                let mut keep = vec![rep_w.as_raw_fd()];
                keep.extend(child_stdio.raw_fds());
                keep.extend(console_tx.as_ref().map(console::Sender::raw_fd));
                keep.extend(ns_fds.iter().map(|(fd, _)| fd.as_raw_fd()));
                close_fds_except(&keep);
                child_main(&mut rep_w, |_| {
                    if let Some(procs) = &cgroup_procs {
                        std::fs::write(procs, "0")
                            .map_err(|e| ChildError::sys("joining the container's cgroup", e))?;
                    }
                    for (fd, flag) in &ns_fds {
                        nix::sched::setns(fd, *flag)
                            .map_err(|e| ChildError::sys(format!("setns {flag:?}"), e))?;
                    }
                    install_stdio(child_stdio)?;
                    // In the container's mount namespace now: its /dev/ptmx.
                    if let Some(tx) = console_tx {
                        tx.open_terminal(plan.console_size)?;
                    }
                    plan.default_home();
                    let exe = plan.find_executable()?;
                    plan.apply_limits()?;
                    Err(plan.exec(&exe, self.seccomp.as_ref()))
                });
            }
            Ok(pid) => Pid::from_raw(pid),
        };
        drop(rep_w);
        drop(child_stdio);
        drop(console_tx);
        if let Err(e) = receive_terminal(console_rx, &mut io, &mut rep_r) {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            return Err(e);
        }
        match sync::read_report(&mut rep_r) {
            Ok(sync::ChildReport::Closed) => Ok(Spawned { pid, io }),
            Ok(sync::ChildReport::Failed(e)) => {
                let _ = nix::sys::wait::waitpid(pid, None);
                Err(e.into())
            }
            Ok(sync::ChildReport::Ready) => Err(err(
                ErrorCode::System,
                "exec'd process sent an unexpected report",
            )),
            Err(e) => Err(sys_reply("reading the exec'd process's report", e)),
        }
    }

    /// Every process of the container (guest pids).
    pub fn pids(&self) -> Vec<u32> {
        if let Some(cg) = &self.cgroup {
            return cg.pids();
        }
        if !self.has_pid_ns {
            return u32::try_from(self.init.as_raw()).into_iter().collect();
        }
        // No cgroup (host tests): every process in the container's pid namespace.
        let Ok(target) = std::fs::read_link(format!("/proc/{}/ns/pid", self.init)) else {
            return Vec::new();
        };
        let mut out: Vec<u32> = std::fs::read_dir("/proc")
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
                    .filter(|pid| {
                        std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                            .ok()
                            .as_ref()
                            == Some(&target)
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_unstable();
        out
    }

    /// Resource usage; without a cgroup only the process count is known, and no limit.
    pub fn stats(&self) -> ContainerStats {
        match &self.cgroup {
            Some(c) => c.stats(),
            None => ContainerStats {
                memory_limit: u64::MAX,
                pids_limit: u64::MAX,
                pids_current: u64::try_from(self.pids().len()).unwrap_or(u64::MAX),
                ..ContainerStats::default()
            },
        }
    }

    /// Kills every process of the container and removes its cgroup.
    pub fn destroy(&mut self) {
        for pid in self.pids() {
            if let Ok(p) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
        let _ = nix::sys::signal::kill(self.init, Signal::SIGKILL);
        if let Some(cg) = &self.cgroup {
            cg.destroy();
        }
        self.go = None;
        self.report = None;
    }
}

fn open_ns_self(name: &str) -> Result<OwnedFd, ErrorReply> {
    std::fs::File::open(format!("/proc/self/ns/{name}"))
        .map(OwnedFd::from)
        .map_err(|e| sys_reply(&format!("opening husk-init's {name} namespace"), e))
}

/// The container's main process from fork to just before exec.
fn init_child(
    plan: &mut spec::Plan,
    go: &mut File,
    report: &mut File,
    in_userns: bool,
    console: Option<console::Sender>,
) -> Result<std::convert::Infallible, ChildError> {
    if sync::wait_for(go) != Some(sync::GO_SETUP) {
        return Err(ChildError::sys("waiting for husk-init", "it gave up"));
    }
    if in_userns {
        // Root in the new user namespace (if mapped), so files are created as root.
        let root = nix::unistd::Uid::from_raw(0);
        let _ = nix::unistd::setresgid(
            nix::unistd::Gid::from_raw(0),
            nix::unistd::Gid::from_raw(0),
            nix::unistd::Gid::from_raw(0),
        );
        let _ = nix::unistd::setresuid(root, root, root);
    }
    if plan.cgroup_ns {
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
            .map_err(|e| ChildError::sys("creating the cgroup namespace", e))?;
    }
    plan.rootfs.mount_all(in_userns)?;
    plan.rootfs.pivot()?;
    // As runc: the terminal comes from the container's own devpts, before the root is
    // finalised (remounted read-only, paths masked).
    if let Some(tx) = console {
        tx.open_terminal(plan.process.console_size)?;
    }
    if let Some(h) = &plan.hostname {
        nix::unistd::sethostname(h)
            .map_err(|e| ChildError::sys(format!("setting hostname {h:?}"), e))?;
    }
    if let Some(d) = &plan.domainname {
        let c = std::ffi::CString::new(d.as_str()).map_err(|e| ChildError::sys("domainname", e))?;
        // SAFETY: setdomainname reads `len` bytes from a live CString.
        if unsafe { libc::setdomainname(c.as_ptr(), d.len()) } != 0 {
            return Err(ChildError::sys(
                format!("setting domainname {d:?}"),
                std::io::Error::last_os_error(),
            ));
        }
    }
    for (k, v) in &plan.sysctls {
        let path = format!("/proc/sys/{}", k.replace('.', "/"));
        std::fs::write(&path, v)
            .map_err(|e| ChildError::sys(format!("setting sysctl {k}={v}"), e))?;
    }
    plan.rootfs.finish()?;
    plan.process.default_home();
    let exe = plan.process.find_executable()?;
    plan.process.apply_limits()?;
    sync::send(report, sync::READY).map_err(|e| ChildError::sys("reporting ready", e))?;
    if sync::wait_for(go) != Some(sync::GO_START) {
        // husk-init gave up on us (delete before start).
        // SAFETY: see child_main.
        unsafe { libc::_exit(0) }
    }
    Err(plan.process.exec(&exe, plan.seccomp.as_ref()))
}
