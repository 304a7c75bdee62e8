//! Creating, third stage: the session with husk-init over the VM's control port. husk-init
//! connects once the guest kernel has started it; then comes the handshake (its Hello, then
//! ours) and the requests that must be answered before `husk create` returns, each a typed
//! call that waits for its answer: [`GuestSession::prepare`], [`GuestSession::configure_network`]
//! (when the VM has interfaces) and [`GuestSession::create_container`]. Once the container is
//! created, the serving loop's writer sends its requests on the same connection
//! ([`GuestSession::into_writer`]) and a reader thread takes the answers and events.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use husk_proto::{
    CreateRequest, GuestMessage, Hello, HostMessage, NetworkConfig, Request, RequestId, Response,
};

use super::error::MonitorError;
use crate::vmm::{VmExit, VmHandle};

/// How long a booting guest may take to connect after the VM starts. Generous because nested
/// kvm_pvm hosts take ~30-40 s to boot a guest; real KVM takes well under a second.
pub(super) const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The id of the `Create` request.
const CREATE_ID: RequestId = RequestId(0);
/// The id of the `ConfigureNetwork` request (sent before `Create`, numbered after it).
const CONFIGURE_NETWORK_ID: RequestId = RequestId(1);
/// The id of the `Prepare` request (sent first, numbered after the others).
const PREPARE_ID: RequestId = RequestId(2);
/// The first id of the serving loop's requests: 0 to 2 went to the handshake's.
const FIRST_SERVE_ID: u64 = 3;

/// The monitor's end of husk-init's control connection.
#[derive(Debug)]
pub(super) struct GuestSession {
    conn: UnixStream,
    next_id: u64,
}

impl GuestSession {
    /// Waits for husk-init to connect on `control` (the VM's control port): gives up when
    /// `vm_ended` says the VM ended first, or after `timeout` (then stopping `vm`).
    pub(super) fn accept(
        control: &UnixListener,
        vm: &VmHandle,
        timeout: Duration,
        mut vm_ended: impl FnMut() -> Option<VmExit>,
    ) -> Result<GuestSession, MonitorError> {
        control.set_nonblocking(true).map_err(MonitorError::Io)?;
        let deadline = Instant::now() + timeout;
        let conn = loop {
            match control.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(why) = vm_ended() {
                        return Err(MonitorError::VmEnded(why));
                    }
                    if Instant::now() > deadline {
                        vm.stop();
                        return Err(MonitorError::ConnectTimeout(timeout));
                    }
                    // Sleep in poll(2) on the listener: woken the moment husk-init connects
                    // (this is on the startup path), and every 100 ms to check the VM.
                    let mut fds = [nix::poll::PollFd::new(
                        std::os::fd::AsFd::as_fd(control),
                        nix::poll::PollFlags::POLLIN,
                    )];
                    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
                }
                Err(e) => return Err(MonitorError::Accept(e)),
            }
        };
        conn.set_nonblocking(false).map_err(MonitorError::Io)?;
        Ok(GuestSession {
            conn,
            next_id: FIRST_SERVE_ID,
        })
    }

    /// The version handshake: husk-init's Hello (checked), then ours.
    pub(super) fn hello(&mut self) -> Result<(), MonitorError> {
        match self.read()? {
            Some(GuestMessage::Hello(h)) => h.check().map_err(MonitorError::Guest)?,
            other => return Err(MonitorError::NoHello(other)),
        }
        self.write(&HostMessage::Hello(Hello::current()))
    }

    /// Makes the VM its own (see [`husk_proto::Request::Prepare`]): fresh entropy for the
    /// guest kernel's RNG, the wall clock, and the spare NICs (by MAC) taken away. First,
    /// before anything of the container.
    pub(super) fn prepare(&mut self, spare_nics: Vec<[u8; 6]>) -> Result<(), MonitorError> {
        let request = crate::template::prepare_request(spare_nics).map_err(MonitorError::Io)?;
        match self.call(PREPARE_ID, Request::Prepare(request))? {
            Some(GuestMessage::Response { result: Ok(_), .. }) => Ok(()),
            Some(GuestMessage::Response { result: Err(e), .. }) => {
                Err(MonitorError::Prepare(e.message))
            }
            other => Err(MonitorError::UnexpectedAnswer {
                request: "Prepare",
                answer: other,
            }),
        }
    }

    /// Has husk-init configure the VM's interfaces, addresses and routes.
    pub(super) fn configure_network(&mut self, config: NetworkConfig) -> Result<(), MonitorError> {
        match self.call(CONFIGURE_NETWORK_ID, Request::ConfigureNetwork(config))? {
            Some(GuestMessage::Response { result: Ok(_), .. }) => Ok(()),
            Some(GuestMessage::Response { result: Err(e), .. }) => {
                Err(MonitorError::ConfigureNetwork(e.message))
            }
            other => Err(MonitorError::UnexpectedAnswer {
                request: "ConfigureNetwork",
                answer: other,
            }),
        }
    }

    /// Has husk-init create the container (it then waits for `Start`).
    pub(super) fn create_container(&mut self, request: CreateRequest) -> Result<(), MonitorError> {
        match self.call(CREATE_ID, Request::Create(Box::new(request)))? {
            Some(GuestMessage::Response {
                result: Ok(Response::Created { .. }),
                ..
            }) => Ok(()),
            Some(GuestMessage::Response { result: Err(e), .. }) => {
                Err(MonitorError::CreateContainer(e.message))
            }
            other => Err(MonitorError::UnexpectedAnswer {
                request: "create",
                answer: other,
            }),
        }
    }

    /// The connection again, for the thread that reads husk-init's answers and events.
    pub(super) fn reader(&self) -> io::Result<UnixStream> {
        self.conn.try_clone()
    }

    /// The connection and the id of the next request, for the serving loop's writer.
    pub(super) fn into_writer(self) -> (UnixStream, RequestId) {
        (self.conn, RequestId(self.next_id))
    }

    /// Sends request `id` and reads the message that answers it.
    fn call(
        &mut self,
        id: RequestId,
        request: Request,
    ) -> Result<Option<GuestMessage>, MonitorError> {
        self.write(&HostMessage::Request { id, request })?;
        self.read()
    }

    fn write(&mut self, msg: &HostMessage) -> Result<(), MonitorError> {
        husk_proto::write_message(&mut self.conn, msg).map_err(MonitorError::Guest)
    }

    fn read(&mut self) -> Result<Option<GuestMessage>, MonitorError> {
        husk_proto::read_message(&mut self.conn).map_err(MonitorError::Guest)
    }
}
