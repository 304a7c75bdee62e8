//! The container: built from the spec the way runc builds one, but inside the VM.
//!
//! `create` forks the container's process into its new namespaces; the child builds the
//! filesystem view, pivots into it and stops just before `execve`, waiting for `start`.
//! `exec` forks a further process into the same namespaces and cgroup. The parent side (this
//! module) keeps the pipes to the waiting child and the cgroup; what runs in the children is
//! `child`. A VM holds one container, or a pod's: then the later ones may join the first one's
//! pid, uts and ipc namespaces (`namespaces`), and each has its own cgroup. How the parent
//! side's failures reach the host as an `ErrorReply` is `reply`, which `namespaces` and
//! `stdio` use too.

mod cgroup;
mod child;
mod console;
pub mod host_env;
mod mounts;
mod namespaces;
mod process;
mod reply;
mod seccomp;
mod spec;
mod stdio;
mod sync;

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use husk_proto::{
    ContainerId, ContainerStats, CreateRequest, ErrorCode, ErrorReply, ExecRequest, FsSource,
};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use self::child::{child_main, close_fds_except, init_child, install_stdio};
use self::namespaces::Entered;
use self::reply::{err, sys_reply};
use self::stdio::{receive_terminal, setup_stdio};
use crate::relay::ProcessIo;
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

impl Container {
    /// Builds the container and returns it with its (not yet started) process. `join` is the
    /// container of the VM whose namespaces the spec names by path (a pod's sandbox, see
    /// [`CreateRequest::join`]).
    pub fn create(
        req: &CreateRequest,
        env: &Env,
        join: Option<&Container>,
    ) -> Result<(Self, Spawned), ErrorReply> {
        let plan = spec::plan(req, &env.share_root)?;
        // Opened now, while the container to join surely runs; entered around the fork.
        let mut joined = Vec::new();
        for flag in &plan.joined {
            let from = join.ok_or_else(|| {
                err(
                    ErrorCode::InvalidState,
                    format!(
                        "no container to join the {} namespace of",
                        namespaces::name(*flag)
                    ),
                )
            })?;
            joined.push((namespaces::open(from.init, *flag)?, *flag));
        }
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
            let name = cgroup::Cgroup::name(req.container.0);
            Some(
                cgroup::Cgroup::create(&env.cgroup_root, &name, resources)
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
        Self::spawn_init(req, env, plan, &joined, cgroup)
    }

    fn spawn_init(
        req: &CreateRequest,
        env: &Env,
        mut plan: spec::Plan,
        joined: &[(OwnedFd, CloneFlags)],
        cgroup: Option<cgroup::Cgroup>,
    ) -> Result<(Self, Spawned), ErrorReply> {
        let cleanup = |cg: &Option<cgroup::Cgroup>| {
            if let Some(cg) = cg {
                cg.destroy();
            }
        };
        let (child_stdio, mut io, console) = match setup_stdio(&req.stdio, &env.transport) {
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

        let entered = match Entered::enter(joined) {
            Ok(e) => e,
            Err(e) => {
                cleanup(&cgroup);
                return Err(e);
            }
        };
        let forked = sys::fork_into_namespaces(plan.clone_flags);
        if !matches!(forked, Ok(0)) {
            // Back in husk-init's own namespaces; the child stays in the joined ones.
            drop(entered);
        }
        let pid = match forked {
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

        // What an exec'd process joins: the namespaces the container made, and those of the
        // pod it joined.
        let mut ns = Vec::new();
        for (flag, clone) in [
            (CloneFlags::CLONE_NEWNS, libc::CLONE_NEWNS),
            (CloneFlags::CLONE_NEWUTS, libc::CLONE_NEWUTS),
            (CloneFlags::CLONE_NEWIPC, libc::CLONE_NEWIPC),
            (CloneFlags::CLONE_NEWUSER, libc::CLONE_NEWUSER),
        ] {
            if plan.clone_flags & clone != 0 || plan.joined.contains(&flag) {
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
            has_pid_ns: plan.clone_flags & libc::CLONE_NEWPID != 0
                || plan.joined.contains(&CloneFlags::CLONE_NEWPID),
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
        let (child_stdio, mut io, console) = setup_stdio(&req.stdio, &env.transport)?;
        let (console_rx, console_tx) = console.unzip();
        let (mut rep_r, mut rep_w) = sync::pipe().map_err(|e| sys_reply("pipe", e))?;
        let ns_fds = self
            .ns
            .iter()
            .map(|flag| Ok((namespaces::open(self.init, *flag)?, *flag)))
            .collect::<Result<Vec<_>, ErrorReply>>()?;
        // A pid namespace applies to children only: enter it for the fork, then come back.
        let pid_ns = if self.has_pid_ns {
            vec![(
                namespaces::open(self.init, CloneFlags::CLONE_NEWPID)?,
                CloneFlags::CLONE_NEWPID,
            )]
        } else {
            Vec::new()
        };
        let entered = Entered::enter(&pid_ns)?;
        let forked = sys::fork_into_namespaces(0);
        if !matches!(forked, Ok(0)) {
            drop(entered);
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

    /// The container's id.
    pub fn id(&self) -> &ContainerId {
        &self.id
    }

    /// Whether the main process is still there (created or running).
    pub fn is_alive(&self) -> bool {
        self.status != Status::Stopped
    }

    /// Freezes or thaws every process of the container (the pause of one container of a pod).
    pub fn freeze(&self, frozen: bool) -> Result<(), ErrorReply> {
        let cg = self.cgroup.as_ref().ok_or_else(|| {
            err(
                ErrorCode::Unsupported,
                "pausing needs the container's cgroup (no cgroup v2 here)",
            )
        })?;
        cg.freeze(frozen)
            .map_err(|m| err(ErrorCode::System, format!("container {}: {m}", self.id)))
    }

    /// Changes the container's limits (`husk update`): `resources` is its whole
    /// `linux.resources` after the update. Refused, nothing changes.
    pub fn update(&self, resources: &oci_spec::runtime::LinuxResources) -> Result<(), ErrorReply> {
        if !self.is_alive() {
            return Err(err(
                ErrorCode::InvalidState,
                format!("container {} has stopped", self.id),
            ));
        }
        let cg = self.cgroup.as_ref().ok_or_else(|| {
            err(
                ErrorCode::Unsupported,
                "updating limits needs the container's cgroup (no cgroup v2 here)",
            )
        })?;
        cg.update(resources).map_err(|m| {
            err(
                ErrorCode::InvalidSpec,
                format!("container {}: {m}", self.id),
            )
        })
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
