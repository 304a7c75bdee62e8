//! # husk-proto: the wire protocol between the husk monitor and husk-init
//!
//! The host side (the per-container *monitor*, a VMM) and the guest side (`husk-init`, PID 1
//! inside the VM) talk over virtio-vsock stream connections. This crate holds everything both
//! sides must agree on: ports, message types, framing and the handshake.
//!
//! ## Connections
//!
//! * **Control**: right after its first boot marker, husk-init connects from the guest to
//!   [`HOST_CID`]:[`CONTROL_PORT`]. All requests, replies and events travel on this one
//!   connection.
//! * **Stdio**: every process (the container's main process and each exec'd one) gets its own
//!   stream connections, so that a busy stdout can never block control messages. The host
//!   chooses the ports ([`Stdio`]) and listens on them *before* it sends the request that names
//!   them; the guest connects to each named port before it starts the process. With
//!   [`Stdio::Pipes`] each of stdin/stdout/stderr is one connection (absent = `/dev/null`);
//!   with [`Stdio::Terminal`] one connection carries the pseudo-terminal in both directions.
//!   A stdio connection carries raw bytes, no framing. The guest half-closes (or closes) a
//!   stdout/stderr connection at EOF; the host closes the stdin connection to signal EOF.
//!
//! ## Framing
//!
//! Every control message is one frame: a `u32` little-endian payload length followed by the
//! payload, a bincode (standard configuration) encoding of a [`HostMessage`] or
//! [`GuestMessage`]. A frame longer than [`MAX_FRAME_LEN`] is refused before anything is
//! allocated; a payload that does not decode, or decodes with bytes left over, is an error
//! value ([`ProtoError`]), never a panic. See [`frame`].
//!
//! ## Message order
//!
//! 1. guest → host: [`GuestMessage::Hello`] with its [`PROTOCOL_VERSION`].
//! 2. host → guest: [`HostMessage::Hello`] with the host's version. Either side that sees a
//!    different version reports [`ProtoError::VersionMismatch`] and closes the connection
//!    (the host also sends nothing else; the guest powers off). `Hello` is variant 0 of both
//!    enums and its layout never changes, so that a mismatch is always detected as such.
//! 3. host → guest: [`Request::Prepare`] (the guest reseeds its RNG and sets its clock), then
//!    [`Request::ConfigureNetwork`] when the container has a network, then
//!    [`HostMessage::Request`] with [`Request::Create`]; the guest builds the
//!    container (mounts, namespaces, cgroup, ...) up to the point just before `execve` and
//!    replies [`Response::Created`].
//! 4. From then on the host sends requests in any order ([`Request::Start`],
//!    [`Request::Signal`], [`Request::Exec`], [`Request::Update`], ...). Each request carries
//!    a [`RequestId`] and gets exactly one [`GuestMessage::Response`] with the same id;
//!    responses come in request order. Independently, the guest sends [`GuestMessage::Event`]s, e.g.
//!    [`Event::Exited`] when a process ends. A process's `Exited` event is sent only after its
//!    stdout/stderr connections are closed, so the host has seen all of its output once it
//!    has seen EOF on those streams.
//! 5. host → guest: [`Request::Shutdown`]: the guest kills what is left, replies, and powers
//!    the VM off.
//!
//! ## Several containers in one VM (a pod)
//!
//! Every request about a container names it by a [`ContainerRef`] the host chose: the first
//! `Create` (the only container, or a pod's sandbox) is [`ContainerRef::FIRST`]; a pod's other
//! containers are created later, while the first runs, each with a new number, and may name the
//! first one's namespaces to join ([`CreateRequest::join`]). [`Request::Remove`] takes a
//! stopped container out of the VM (its processes, mounts and cgroup); the VM ends only with
//! `Shutdown`.
//!
//! ## Broken connection
//!
//! If the control connection breaks (EOF or an I/O error) or carries a frame that does not
//! decode, the guest treats the host as gone: it kills every container process and powers the
//! VM off. The host, seeing the same, treats the guest as dead: it stops the VM and reports
//! the container as stopped.
//!
//! One exception: a guest that has not been asked for anything yet (no container, no
//! network) and loses the connection connects again and starts over with `Hello`. That is
//! how a VM restored from a template meets its new host: the template was saved with
//! husk-init waiting after the `Hello` exchange, the restored vsock device resets every
//! connection (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`), and husk-init reconnects to the monitor
//! that restored it.
//!
//! ## The files
//!
//! `frame` (framing, the codec and [`MAX_FRAME_LEN`]), `message` (the messages and
//! [`PROTOCOL_VERSION`]), `ids` (the numbers and names the messages carry), `marker` (boot
//! markers); this file holds the constants of the connections and re-exports the rest. None
//! of the other files uses this one.

#![deny(missing_docs)]

pub mod frame;
mod ids;
pub mod marker;
mod message;

pub use frame::{
    FrameDecoder, MAX_FRAME_LEN, ProtoError, decode, encode_frame, read_message, write_message,
};
pub use ids::{ContainerId, ContainerRef, ExecId, InvalidContainerId, RequestId, VsockPort};
pub use message::*;

/// The vsock context id of the host, as seen from the guest.
pub const HOST_CID: u32 = 2;

/// The vsock context id the monitor gives every guest (each VM has its own vsock device, so
/// the number need not be unique across VMs).
pub const GUEST_CID: u32 = 3;

/// The host port husk-init connects to for the control connection.
pub const CONTROL_PORT: VsockPort = VsockPort(1024);

/// The first host port the monitor hands out for stdio connections.
pub const FIRST_STDIO_PORT: VsockPort = VsockPort(2048);

/// The tag of the virtio-fs device that carries the container's files.
pub const SHARE_TAG: &str = "husk";

#[cfg(any(test, feature = "samples"))]
pub mod samples;
#[cfg(test)]
mod tests;
