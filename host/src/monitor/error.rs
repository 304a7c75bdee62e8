//! Why the monitor could not create the container: `husk create` prints the message (the
//! error and its causes, `a: b: c`, see [`crate::error_chain`]) after the monitor wrote it on
//! the notify pipe.
//!
//! Errors of other modules are wrapped two ways, so that the message is the same as it has
//! always been: with `#[source]` (or transparently) where their own message and causes make
//! one chain, and inside the message, without a source, where an error's message already
//! names its cause (a bundle or state error, a VM error) or only its message was ever shown
//! (the wire protocol's).

use std::path::PathBuf;
use std::time::Duration;

use husk_proto::{GuestMessage, InvalidContainerId, ProtoError};

use super::console::ConsoleError;
use super::jail::JailError;
use super::network::NetworkError;
use super::share::ShareError;
use crate::assets::ImageNotFound;
use crate::oci::bundle::BundleError;
use crate::oci::state::StateError;
use crate::vmm::{VmError, VmExit};

/// Why the monitor could not create the container.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The record of the VM's network namespace (for a pod's later containers) could not be
    /// written.
    #[error(transparent)]
    Pod(#[from] crate::oci::pod::PodError),
    /// The monitor would leave core dumps, or be readable by other processes of its uid.
    #[error("{what}")]
    CoreDumps {
        /// The setting.
        what: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The container's stdio could not be moved aside.
    #[error("setting up the container's stdio")]
    Stdio(#[source] std::io::Error),
    /// The bundle changed (or went) since `create` loaded it.
    #[error("{0}")]
    Bundle(BundleError),
    /// The container id.
    #[error(transparent)]
    Id(#[from] InvalidContainerId),
    /// No guest image.
    #[error(transparent)]
    Image(#[from] ImageNotFound),
    /// The shared directory.
    #[error(transparent)]
    Share(#[from] ShareError),
    /// The network namespace or its interfaces.
    #[error("setting up the network")]
    Network(#[source] NetworkError),
    /// The bundle has `prestart` or `createRuntime` hooks, but `husk create` gave the monitor
    /// no way to have it run them.
    #[error(
        "the bundle has prestart or createRuntime hooks, but the monitor was given no --hooks-fd \
         to have husk create run them"
    )]
    NoHooksChannel,
    /// Asking `husk create` to run the `prestart` and `createRuntime` hooks, or hearing back.
    #[error("the create hooks: {what}")]
    HooksChannel {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state directory could not be opened for its sockets.
    #[error("{dir}")]
    SocketDir {
        /// The state directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A socket of the state directory could not be bound.
    #[error("listening on {path}")]
    Listen {
        /// The socket (the control socket by its name in the state directory).
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and do you have access to it?)")]
    Kvm(nix::Error),
    /// The container's terminal.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// `process.terminal` without a socket to send the terminal to.
    #[error("process.terminal is true but no --console-socket was given")]
    NoConsoleSocket,
    /// The state could not be written.
    #[error("{0}")]
    State(StateError),
    /// The monitor could not be confined.
    #[error(transparent)]
    Jail(#[from] JailError),
    /// The VM could not be built or started.
    #[error("starting the VM: {0:#}")]
    StartVm(VmError),
    /// The started VM cannot be controlled from another thread.
    #[error("{0}")]
    VmHandle(VmError),
    /// A thread, or a socket's mode or copy.
    #[error(transparent)]
    Io(std::io::Error),
    /// The VM ended before husk-init connected (the guest crashed, or the kernel did not boot).
    #[error("the VM ended before husk-init connected: {0:?}")]
    VmEnded(VmExit),
    /// husk-init did not connect in time; the VM is stopped.
    #[error("husk-init did not connect within {} s", .0.as_secs())]
    ConnectTimeout(Duration),
    /// husk-init's connection could not be accepted.
    #[error("accepting husk-init's connection")]
    Accept(#[source] std::io::Error),
    /// The control connection to husk-init failed, or husk-init spoke another protocol.
    #[error("husk-init: {0}")]
    Guest(ProtoError),
    /// husk-init's first message was not its Hello.
    #[error("husk-init sent {0:?} instead of Hello")]
    NoHello(Option<GuestMessage>),
    /// The control port's listener is gone (a second greeting on one monitor).
    #[error("husk-init's control port is closed")]
    NoControlPort,
    /// husk-init could not make the VM its own (reseed its RNG, set its clock).
    #[error("preparing the VM: {0}")]
    Prepare(String),
    /// husk-init could not configure the VM's network.
    #[error("configuring the network in the VM: {0}")]
    ConfigureNetwork(String),
    /// husk-init could not create the container.
    #[error("creating the container: {0}")]
    CreateContainer(String),
    /// husk-init answered a request with something else than its answer.
    #[error("husk-init answered {request} with {answer:?}")]
    UnexpectedAnswer {
        /// The request (as the message names it).
        request: &'static str,
        /// What came instead.
        answer: Option<GuestMessage>,
    },
}
