//! The messages of the control connection.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::frame::ProtoError;
use crate::ids::{ContainerId, ContainerRef, ExecId, RequestId, VsockPort};

/// The version of this protocol. Bump it on any incompatible change to the messages.
pub const PROTOCOL_VERSION: u32 = 4;

/// The first message each side sends: the protocol version it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
}

impl Hello {
    /// The hello of this build.
    pub fn current() -> Self {
        Self {
            version: PROTOCOL_VERSION,
        }
    }

    /// Checks the peer's hello against ours.
    pub fn check(&self) -> Result<(), ProtoError> {
        if self.version == PROTOCOL_VERSION {
            Ok(())
        } else {
            Err(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: self.version,
            })
        }
    }
}

/// A message from the host (monitor) to the guest (husk-init).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostMessage {
    /// The handshake; must stay variant 0 with an unchanged layout.
    Hello(Hello),
    /// A request; the guest answers it with a [`GuestMessage::Response`] carrying `id`.
    Request {
        /// Echoed in the response.
        id: RequestId,
        /// What the host asks for.
        request: Request,
    },
}

/// What the host can ask of the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Build a container up to just before `execve` of its process: the first after `Prepare`
    /// (and `ConfigureNetwork` when there is a network), a pod's others while it runs.
    Create(Box<CreateRequest>),
    /// Apply the network configuration of the VM's interfaces (before `Start`).
    ConfigureNetwork(NetworkConfig),
    /// Let a container's process run (`execve`). Answered by [`Response::Started`].
    Start {
        /// Which container.
        container: ContainerRef,
    },
    /// Send `signal` to one process, or to all processes of a container.
    Signal {
        /// Who gets the signal.
        target: SignalTarget,
        /// The signal number (Linux x86_64 numbering).
        signal: i32,
    },
    /// Start a further process in a container's namespaces and cgroup.
    Exec(Box<ExecRequest>),
    /// Set the window size of a process's pseudo-terminal.
    ResizePty {
        /// Whose terminal.
        process: ProcessRef,
        /// The new size.
        size: WindowSize,
    },
    /// Close the stdin of a process (the host saw EOF on its side).
    CloseStdin {
        /// Whose stdin.
        process: ProcessRef,
    },
    /// List the pids (in the guest) of all processes of a container.
    ListPids {
        /// Which container.
        container: ContainerRef,
    },
    /// Read a container's resource usage.
    Stats {
        /// Which container.
        container: ContainerRef,
    },
    /// Take a container out of the VM: kill what is left of it, release its mounts and its
    /// cgroup. Answered when it is gone. (Not the first container: its end is the VM's.)
    Remove {
        /// Which container.
        container: ContainerRef,
    },
    /// Freeze (`frozen`) or thaw every process of a container (its cgroup's `cgroup.freeze`):
    /// the pause of one container of a pod, whose VM goes on.
    Freeze {
        /// Which container.
        container: ContainerRef,
        /// Frozen or thawed.
        frozen: bool,
    },
    /// Kill whatever is left, sync, and power the VM off; answered after the sync, just before
    /// power-off (the host may end the VM on the answer).
    Shutdown,
    /// Make this VM its own before anything else: a VM restored from a template shares the
    /// template's kernel RNG state and has its clock. Sent first, answered [`Response::Done`].
    Prepare(PrepareRequest),
    /// Change a container's resource limits (`husk update`): the guest applies them to the
    /// container's cgroup as it applied the spec's at create, or puts the previous ones back
    /// and answers why not. Answered [`Response::Done`].
    Update {
        /// Which container.
        container: ContainerRef,
        /// The container's whole `linux.resources` after the update (the previous ones with
        /// the update's fields over them), as OCI `LinuxResources` JSON; the guest parses it
        /// with oci-spec, as it does the spec.
        resources_json: Vec<u8>,
    },
}

/// What makes a VM its own ([`Request::Prepare`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareRequest {
    /// Random bytes from the host, mixed into the guest kernel's RNG (and credited as entropy),
    /// after which the RNG reseeds: two VMs restored from one template draw different numbers.
    /// At most [`MAX_ENTROPY_LEN`] bytes.
    pub entropy: Vec<u8>,
    /// The host's wall clock, in nanoseconds since the Unix epoch, for the guest's.
    pub realtime_ns: i64,
    /// The MAC addresses of the VM's NICs that the container does not use (the spare slots of
    /// a VM template): husk-init takes them away (unbinds their driver), so that the VM has only
    /// the interfaces of the container's network.
    pub spare_nics: Vec<[u8; 6]>,
}

/// Most bytes of [`PrepareRequest::entropy`] the guest takes.
pub const MAX_ENTROPY_LEN: usize = 256;

/// Everything the guest needs to build a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateRequest {
    /// The number the host gave it (see [`ContainerRef`]).
    pub container: ContainerRef,
    /// A container of the VM whose namespaces this one joins where its spec names a namespace
    /// by path (a pod's containers: CRI names the sandbox's ipc, uts and pid namespaces by
    /// their host paths, which mean nothing in the VM). `None`: paths are refused, as today.
    pub join: Option<ContainerRef>,
    /// The container id (used as the default hostname and in messages).
    pub container_id: ContainerId,
    /// The bundle's `config.json`, byte for byte; the guest parses it with oci-spec.
    pub config_json: Vec<u8>,
    /// Where the root filesystem is found in the guest.
    pub rootfs: FsSource,
    /// Where the source of each `bind` mount of the spec is found in the guest, by the mount's
    /// index in `config.json`'s `mounts`. Bind mounts not listed here are refused.
    pub mounts: Vec<MountSource>,
    /// How the process's stdio reaches the host.
    pub stdio: Stdio,
}

/// A directory or file the guest can reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsSource {
    /// A path relative to the root of a virtio-fs device with the given tag.
    Share {
        /// The virtio-fs tag (see [`crate::SHARE_TAG`]).
        tag: String,
        /// Relative path inside the share; must not contain `..`.
        path: String,
    },
    /// An absolute path that already exists in the guest (e.g. in the initramfs; for tests).
    Guest(String),
}

/// The source of the spec's bind mount number `index`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSource {
    /// Index into `config.json`'s `mounts`.
    pub index: u32,
    /// Where its source is.
    pub source: FsSource,
}

/// How a process's stdin/stdout/stderr reach the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stdio {
    /// One stream connection per descriptor; `None` means `/dev/null`.
    Pipes {
        /// Host port the guest connects to and reads the process's stdin from.
        stdin: Option<VsockPort>,
        /// Host port the guest connects to and writes the process's stdout to.
        stdout: Option<VsockPort>,
        /// Host port the guest connects to and writes the process's stderr to.
        stderr: Option<VsockPort>,
    },
    /// A pseudo-terminal in the guest; its master is relayed over one connection.
    Terminal {
        /// Host port of the terminal stream.
        port: VsockPort,
    },
}

impl Stdio {
    /// No stdio at all (everything `/dev/null`).
    pub const NULL: Stdio = Stdio::Pipes {
        stdin: None,
        stdout: None,
        stderr: None,
    };

    /// Whether the process gets a terminal.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Stdio::Terminal { .. })
    }
}

/// Starts a further process in a running container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The container.
    pub container: ContainerRef,
    /// The id the host gave it.
    pub exec_id: ExecId,
    /// An OCI `process` object as JSON (as in `runc exec --process`).
    pub process_json: Vec<u8>,
    /// Its stdio.
    pub stdio: Stdio,
}

/// Names a process of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProcessRef {
    /// A container's main process.
    Init(ContainerRef),
    /// An exec'd process (exec ids are the VM's, whatever the container).
    Exec(ExecId),
}

impl fmt::Display for ProcessRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessRef::Init(c) => write!(f, "init of {c}"),
            ProcessRef::Exec(id) => id.fmt(f),
        }
    }
}

/// Who receives a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignalTarget {
    /// One process.
    Process(ProcessRef),
    /// Every process of a container (`kill --all`).
    All(ContainerRef),
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// The network configuration of the VM, read by the host from the engine's network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Interfaces to configure (besides `lo`, which is always brought up).
    pub interfaces: Vec<NetInterface>,
    /// Routes to add, in order, after the interfaces are up.
    pub routes: Vec<NetRoute>,
}

/// One guest network interface, found by the MAC address its device has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// The name to give it in the guest (e.g. `eth0`).
    pub name: String,
    /// The MAC address the guest's interface has now: the virtio-net device's when the VM
    /// booted, the template's when it was restored from one.
    pub device_mac: [u8; 6],
    /// The MAC address to give it (the engine's veth's).
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Addresses to assign.
    pub addresses: Vec<IpCidr>,
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpCidr {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length in bits.
    pub prefix_len: u8,
}

/// A route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRoute {
    /// Destination network; `None` is the default route.
    pub destination: Option<IpCidr>,
    /// Next hop, if any.
    pub gateway: Option<IpAddr>,
    /// Outgoing interface name (as named in [`NetInterface::name`]).
    pub interface: String,
}

/// A message from the guest to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GuestMessage {
    /// The handshake; must stay variant 0 with an unchanged layout.
    Hello(Hello),
    /// The answer to the request with the same id.
    Response {
        /// The request's id.
        id: RequestId,
        /// What came of it.
        result: Result<Response, ErrorReply>,
    },
    /// Something that happened on its own.
    Event(Event),
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The container is built; `pid` is its process's pid in the guest.
    Created {
        /// Guest pid of the container's process.
        pid: u32,
    },
    /// The process was exec'd.
    Started,
    /// The exec'd process is running with this guest pid.
    ExecStarted {
        /// Guest pid.
        pid: u32,
    },
    /// Guest pids of the container's processes.
    Pids(Vec<u32>),
    /// Resource usage.
    Stats(ContainerStats),
    /// The request was carried out and has nothing to report.
    Done,
}

/// Resource usage of the container, from its cgroup in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {
    /// CPU time used, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// CPU time in user mode, in nanoseconds.
    pub cpu_user_ns: u64,
    /// CPU time in kernel mode, in nanoseconds.
    pub cpu_system_ns: u64,
    /// Memory in use, in bytes.
    pub memory_usage: u64,
    /// Memory limit in bytes (`u64::MAX` if none).
    pub memory_limit: u64,
    /// Processes in the cgroup.
    pub pids_current: u64,
    /// Process limit (`u64::MAX` if none).
    pub pids_limit: u64,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The class of failure.
    pub code: ErrorCode,
    /// A message for humans naming what was wrong and where.
    pub message: String,
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.message, self.code)
    }
}

impl std::error::Error for ErrorReply {}

/// Classes of failure the guest reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// config.json or a process JSON is malformed or inconsistent.
    InvalidSpec,
    /// The spec asks for something husk does not do (named in the message).
    Unsupported,
    /// The request does not fit the container's state (e.g. `Start` twice).
    InvalidState,
    /// The process named by the request does not exist (anymore).
    NoSuchProcess,
    /// The executable was not found (a shell would exit 127).
    ExecutableNotFound,
    /// The executable exists but cannot be run (a shell would exit 126).
    PermissionDenied,
    /// A system call failed while carrying out the request.
    System,
    /// The request itself violated the protocol.
    Protocol,
}

/// Something the guest reports without being asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A process ended. Sent after its stdout/stderr connections were closed.
    Exited {
        /// Which process.
        process: ProcessRef,
        /// How it ended.
        status: WaitStatus,
    },
}

/// How a process ended, as `waitpid` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitStatus {
    /// It called `exit` with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled {
        /// The signal number.
        signal: i32,
        /// Whether it dumped core.
        core_dumped: bool,
    },
}

impl WaitStatus {
    /// Decodes a raw `waitpid` status.
    pub fn from_raw(status: i32) -> Self {
        let sig = status & 0x7f;
        if sig == 0 {
            WaitStatus::Exited((status >> 8) & 0xff)
        } else {
            WaitStatus::Signaled {
                signal: sig,
                core_dumped: status & 0x80 != 0,
            }
        }
    }

    /// The exit code a shell (and runc) reports: the code itself, or 128 + the signal number.
    ///
    /// ```
    /// use husk_proto::WaitStatus;
    /// assert_eq!(WaitStatus::Exited(3).exit_code(), 3);
    /// assert_eq!(WaitStatus::Signaled { signal: 9, core_dumped: false }.exit_code(), 137);
    /// ```
    pub fn exit_code(&self) -> i32 {
        match *self {
            WaitStatus::Exited(code) => code,
            WaitStatus::Signaled { signal, .. } => 128 + signal,
        }
    }
}
