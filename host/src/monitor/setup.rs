//! Creating, first stage: what the container needs on the host, prepared while the monitor
//! still sees the host and has one thread, in the order the later steps need it. The last
//! step is the jail, which takes the host's view away; what the setup made is handed on as
//! [`Prepared`].

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use husk_proto::{
    ContainerId, ContainerRef, CreateRequest, FIRST_STDIO_PORT, FsSource, MountSource, SHARE_TAG,
    Stdio, VsockPort,
};

use super::args::MonitorArgs;
use super::console::Console;
use super::error::MonitorError;
use super::network::{self, Network};
use super::{cgroup, jail, share};
use crate::assets::GuestImage;
use crate::oci::bundle::{Bundle, BundleError};
use crate::oci::pod;
use crate::oci::sockets::{self, SocketDir};
use crate::oci::state::{self, State};
use crate::template::{self, TemplateShape};
use crate::vmm::persist::Snapshot;
use crate::vmm::{SeccompMode, VmConfig};

/// The stdio the monitor inherited from `husk create`: the container's.
#[derive(Debug)]
pub(super) struct ContainerStdio {
    pub(super) stdin: std::fs::File,
    pub(super) stdout: std::fs::File,
    pub(super) stderr: std::fs::File,
}

/// Moves the inherited stdio aside for the container and points the monitor's own fds 0-2 at
/// /dev/null (stdin) and the log file or /dev/null (stdout, stderr), so that nothing the
/// monitor or its libraries print ends up in the container's output.
pub(super) fn take_stdio(log: Option<&Path>) -> std::io::Result<ContainerStdio> {
    use std::os::fd::{AsFd, BorrowedFd};
    let dup = |fd: i32| -> std::io::Result<std::fs::File> {
        // SAFETY: fds 0-2 are open for the lifetime of the process (the caller gave them).
        let b = unsafe { BorrowedFd::borrow_raw(fd) };
        Ok(std::fs::File::from(b.try_clone_to_owned()?))
    };
    let stdio = ContainerStdio {
        stdin: dup(0)?,
        stdout: dup(1)?,
        stderr: dup(2)?,
    };
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let out = match log {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)?,
        None => null.try_clone()?,
    };
    for (src, dst) in [(null.as_fd(), 0), (out.as_fd(), 1), (out.as_fd(), 2)] {
        // SAFETY: dup2 onto the standard descriptors, which we own; src is open.
        if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&src), dst) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(stdio)
}

/// The monitor holds the guest's memory: a crash must not write it to a core file, and other
/// processes of the same uid must not ptrace it or read its /proc/PID/mem (non-dumpable).
pub(super) fn no_core_dumps() -> Result<(), MonitorError> {
    let err = |what| move |source| MonitorError::CoreDumps { what, source };
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(err("setting RLIMIT_CORE to 0"))?;
    nix::sys::prctl::set_dumpable(false).map_err(err("PR_SET_DUMPABLE 0"))
}

/// The sockets the VM's vsock device connects the guest's streams to (`vsock.sock_<port>`).
#[derive(Debug)]
pub(super) struct GuestPorts {
    /// husk-init's control connection (closed once husk-init has connected).
    pub(super) control: Option<UnixListener>,
    /// The container's stdin, stdout and stderr (or its terminal, on the first).
    pub(super) stdio: [UnixListener; 3],
}

impl GuestPorts {
    /// The stdio ports: the first three from [`FIRST_STDIO_PORT`].
    const STDIO: [u32; 3] = [
        FIRST_STDIO_PORT.0,
        FIRST_STDIO_PORT.0 + 1,
        FIRST_STDIO_PORT.0 + 2,
    ];

    fn bind(sockets: &SocketDir) -> Result<GuestPorts, MonitorError> {
        let listen = |port: u32| {
            let path = sockets.vsock_port(port);
            let _ = std::fs::remove_file(&path);
            UnixListener::bind(&path).map_err(|source| MonitorError::Listen { path, source })
        };
        let control = listen(husk_proto::CONTROL_PORT.0)?;
        let [stdin, stdout, stderr] = Self::STDIO;
        Ok(GuestPorts {
            control: Some(control),
            stdio: [listen(stdin)?, listen(stdout)?, listen(stderr)?],
        })
    }
}

/// What the setup made, for the stages that follow.
#[derive(Debug)]
pub(super) struct Prepared {
    /// The bundle, as loaded by the monitor.
    bundle: Bundle,
    /// The container id.
    id: ContainerId,
    /// Where each bind mount's source is in the share.
    mounts: Vec<MountSource>,
    /// The container's network, undone when dropped (unless left to `husk delete`).
    pub(super) network: Option<Network>,
    /// Names the sockets of the state directory.
    pub(super) sockets: SocketDir,
    /// The guest's ports.
    pub(super) ports: GuestPorts,
    /// The control socket `husk` commands connect to.
    pub(super) commands: UnixListener,
    /// The container's terminal, with `process.terminal`.
    pub(super) console: Option<Console>,
    /// The container's state (`creating`).
    pub(super) state: State,
    /// The VM to start (of the template's shape when there is one).
    pub(super) vm: VmConfig,
    /// The template to restore the VM from, if any (else it boots).
    pub(super) template: Option<Template>,
}

/// A template a container's VM is restored from.
#[derive(Debug)]
pub(super) struct Template {
    /// Its key in the cache (for `husk create` to remove it if the restore is refused).
    pub(super) key: template::Key,
    /// The saved VM.
    pub(super) snapshot: Snapshot,
}

impl Prepared {
    /// The size of the VM to start.
    pub(super) fn vm_size(&self) -> crate::oci::bundle::VmSize {
        crate::oci::bundle::VmSize {
            memory_mib: self.vm.mem_mib,
            vcpus: self.vm.vcpus,
        }
    }

    /// What husk-init is asked to create: the container of the bundle on the share, its stdio
    /// on the stdio ports (its terminal on the first, with `process.terminal`).
    pub(super) fn create_request(&self) -> CreateRequest {
        let [stdin, stdout, stderr] = GuestPorts::STDIO;
        CreateRequest {
            container: ContainerRef::FIRST,
            join: None,
            container_id: self.id.clone(),
            config_json: self.bundle.config_json.clone(),
            rootfs: FsSource::Share {
                tag: SHARE_TAG.into(),
                path: "rootfs".into(),
            },
            mounts: self.mounts.clone(),
            stdio: if self.bundle.terminal() {
                Stdio::Terminal {
                    port: VsockPort(stdin),
                }
            } else {
                Stdio::Pipes {
                    stdin: Some(VsockPort(stdin)),
                    stdout: Some(VsockPort(stdout)),
                    stderr: Some(VsockPort(stderr)),
                }
            },
        }
    }
}

/// Prepares everything on the host (see the module docs), ending in the jail.
pub(super) fn prepare(args: &MonitorArgs, dir: &Path) -> Result<Prepared, MonitorError> {
    let bundle = Bundle::load(&args.bundle).map_err(MonitorError::Bundle)?;
    let id = ContainerId::new(args.id.clone())?;
    // Joined with the jail; checked first, before anything is made.
    let cgroup = cgroup::Placement::monitor(&bundle.spec, &args.id, args.systemd_cgroup, bundle.vm)
        .map_err(|why| {
            MonitorError::Bundle(BundleError::Invalid {
                path: bundle.dir.join("config.json"),
                field: "linux.cgroupsPath",
                why,
            })
        })?;
    let image = crate::assets::find()?;
    let (share, mounts) = share::prepare(dir, &bundle)?;
    let mut network = network_with_hooks(args, &bundle, dir)?;
    let sockets = SocketDir::open(dir).map_err(|source| MonitorError::SocketDir {
        dir: dir.to_owned(),
        source,
    })?;
    let ports = GuestPorts::bind(&sockets)?;
    // Before the jail, which does not hold /dev/kvm, nor the templates.
    let kvm = Arc::new(open_kvm()?);
    let template = choose_template(args, &bundle, &image, network.as_ref());
    // The last things that need the host's view, then the jail (before the VMM's threads).
    let console = match (bundle.terminal(), &args.console_socket) {
        (false, _) => None,
        (true, Some(socket)) => Some(Console::open(socket)?),
        (true, None) => return Err(MonitorError::NoConsoleSocket),
    };
    // The container's fixed facts and the control socket, before the jail pins them (see
    // `crate::oci::state` on what husk trusts).
    let state = fixed_state(args, &bundle, dir)?;
    let commands =
        UnixListener::bind(sockets.monitor()).map_err(|source| MonitorError::Listen {
            path: sockets::MONITOR_SOCKET.into(),
            source,
        })?;
    jail::enter(&jail::Jail {
        id: &args.id,
        cgroup: &cgroup,
        state_dir: dir,
        read_only: vec![&image.vmlinux, &image.initramfs],
        network: network.is_some(),
        leave_network_namespace: network::requested(&bundle.spec) != network::Requested::New,
        user: args.user.map(|map| (map, share.as_path())),
    })?;
    crate::phases::record_now("monitor-confined");
    if args.user.is_some()
        && let Some(network) = network.as_mut()
    {
        network.leave_to_delete();
    }
    let nets = network
        .as_ref()
        .map(|n| n.devices.clone())
        .unwrap_or_default();
    let vm = match &template {
        Some(_) => template::vm_config(
            &image,
            template_shape(&bundle),
            sockets.vsock(),
            share,
            nets,
            Some(kvm),
        ),
        None => VmConfig {
            kernel: image.vmlinux,
            initrd: Some(image.initramfs),
            cmdline_extra: String::new(),
            mem_mib: bundle.vm.memory_mib,
            vcpus: bundle.vm.vcpus,
            console: args.console,
            seccomp: SeccompMode::Enforce,
            vsock: Some(sockets.vsock()),
            shares: vec![(SHARE_TAG.to_string(), share)],
            nets,
            spare_nets: 0,
            kvm: Some(kvm),
        },
    };
    Ok(Prepared {
        bundle,
        id,
        mounts,
        network,
        sockets,
        ports,
        commands,
        console,
        state,
        vm,
        template,
    })
}

/// The template shape of the container's VM.
fn template_shape(bundle: &Bundle) -> TemplateShape {
    TemplateShape {
        vcpus: bundle.vm.vcpus,
        mem_mib: bundle.vm.memory_mib,
    }
}

/// The template to restore the container's VM from: none when templates are off for it (the
/// annotation `io.husk.vm.template=off`, or `HUSK_TEMPLATES=off` in `create`'s environment),
/// for a VM with a serial console (debugging), or with more interfaces than a template has
/// slots; else the cache's, made now if there is none (see `crate::template`).
fn choose_template(
    args: &MonitorArgs,
    bundle: &Bundle,
    image: &GuestImage,
    network: Option<&Network>,
) -> Option<Template> {
    let annotation = bundle
        .spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(template::ANNOTATION))
        .map(String::as_str);
    let env = std::env::var(template::ENV).ok();
    if annotation == Some("off") || env.as_deref() == Some("off") || args.console {
        return None;
    }
    let nets = network.map_or(0, |n| n.devices.len());
    if nets > usize::from(template::NET_SLOTS) {
        eprintln!(
            "husk monitor: {nets} network interfaces, a VM template has {}: booting cold",
            template::NET_SLOTS
        );
        return None;
    }
    template::for_container(image, template_shape(bundle))
        .map(|(key, snapshot)| Template { key, snapshot })
}

/// The network namespace (a new one while the monitor still has a single thread), the hooks
/// that fill it (run by `husk create`, see `super::create_hooks`), then its interfaces for the
/// VM: undone on drop, when the monitor ends or right away if creating fails later.
fn network_with_hooks(
    args: &MonitorArgs,
    bundle: &Bundle,
    dir: &Path,
) -> Result<Option<Network>, MonitorError> {
    let netns = network::Netns::for_spec(&bundle.spec).map_err(MonitorError::Network)?;
    record_netns(&netns, dir)?;
    super::create_hooks::run(args.notify_fd, args.hooks_fd, bundle)?;
    network::setup(&netns, dir).map_err(MonitorError::Network)
}

/// Records which network namespace the VM's network comes from ([`pod::NETNS_FILE`], pinned
/// by the jail): a later container that names the same namespace is created in this VM (see
/// `crate::oci::pod`).
fn record_netns(netns: &network::Netns, dir: &Path) -> Result<(), MonitorError> {
    let path = match netns {
        network::Netns::None => return Ok(()),
        network::Netns::Path(p) => p.clone(),
        network::Netns::Own { path } => path.clone(),
    };
    let id = pod::NetnsId::of(&path).map_err(|source| pod::PodError::Record {
        what: "reading the network namespace",
        path,
        source,
    })?;
    pod::write_json(&dir.join(pod::NETNS_FILE), &id)?;
    Ok(())
}

/// Opens `/dev/kvm` for the VMM (the monitor's jail does not hold it).
fn open_kvm() -> Result<OwnedFd, MonitorError> {
    nix::fcntl::open(
        "/dev/kvm",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(MonitorError::Kvm)
}

/// The container's state as the monitor starts it (`creating`, its own pid), written as the
/// fixed record (`container.json`) husk commands trust.
fn fixed_state(args: &MonitorArgs, bundle: &Bundle, dir: &Path) -> Result<State, MonitorError> {
    let pid = i32::try_from(crate::pid::host_pid()).unwrap_or(0);
    let state = State::creating(&args.id, bundle, Some(pid));
    state::write_fixed(dir, &state).map_err(MonitorError::State)?;
    Ok(state)
}
