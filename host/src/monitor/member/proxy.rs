//! Step 4 of a member's life (see `super`): the commands `husk` sends to the container's own
//! `monitor.sock` are passed to the sandbox's monitor, wrapped in
//! [`MonitorRequest::ForContainer`], and its replies passed back; the status a command
//! changes is recorded in the container's `state.json` before the reply. One thread per
//! connection, each confined as `Member` (the sandbox's monitor may be taken over). A SIGKILL
//! the sandbox's monitor took is reported to the member's main thread ([`Ending::Killed`]),
//! which then need not wait for the guest to tear the container down (see `super`).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use husk_seccomp::ThreadKind;

use crate::monitor::api::{self, MonitorReply, MonitorRequest};
use crate::monitor::{client, serve, threads};
use crate::oci::state::{self, State, Status};

/// What ends a member's wait for its container (see `super::Member::serve`).
#[derive(Debug)]
pub(super) enum Ending {
    /// The sandbox's monitor reported the container's end (or its connection failed).
    Reply(Result<MonitorReply, String>),
    /// The container's main process was sent SIGKILL, and the guest took it.
    Killed,
}

/// The status a command that succeeded leaves the container in.
fn status_after(request: &MonitorRequest) -> Option<Status> {
    match request {
        MonitorRequest::Start | MonitorRequest::Resume => Some(Status::Running),
        MonitorRequest::Pause => Some(Status::Paused),
        _ => None,
    }
}

/// What every connection's proxy needs.
#[derive(Debug, Clone)]
pub(super) struct Proxy {
    /// The sandbox's `monitor.sock`.
    pub sandbox: PathBuf,
    /// The container's number in the sandbox's VM.
    pub container: u32,
    /// The container's state, written by whoever changes it.
    pub state: Arc<Mutex<State>>,
    /// The container's state directory.
    pub dir: PathBuf,
    /// Where a SIGKILL the guest took is reported.
    pub endings: Sender<Ending>,
}

/// Accepts commands on the container's `monitor.sock` and passes each to the sandbox's
/// monitor (see the module docs), one thread per connection.
pub(super) fn spawn_command_proxy(commands: UnixListener, proxy: Proxy) {
    threads::spawn("commands", ThreadKind::Member, move || {
        for stream in commands.incoming() {
            let Ok(stream) = stream else { continue };
            let proxy = proxy.clone();
            threads::spawn("command", ThreadKind::Member, move || proxy.pass(stream));
        }
    });
}

impl Proxy {
    /// Passes one command from `stream` to the sandbox's monitor, and its replies back.
    fn pass(&self, mut stream: UnixStream) {
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
        let Ok((line, mut fds)) = api::receive_request(&stream) else {
            return;
        };
        let _ = stream.set_read_timeout(None);
        let request = match serde_json::from_slice::<MonitorRequest>(&line) {
            Ok(MonitorRequest::ForContainer { .. } | MonitorRequest::AddContainer { .. }) => {
                let e = "a pod's container's monitor takes requests about the container only";
                serve::reply(&mut stream, &MonitorReply::Error(e.into()));
                return;
            }
            Ok(r) => r,
            Err(e) => {
                serve::reply(
                    &mut stream,
                    &MonitorReply::Error(format!("bad request: {e}")),
                );
                return;
            }
        };
        let then = status_after(&request);
        let kill =
            matches!(request, MonitorRequest::Kill { signal, .. } if signal == libc::SIGKILL);
        let wrapped = MonitorRequest::ForContainer {
            container: self.container,
            request: Box::new(request),
        };
        let fd: Option<OwnedFd> = fds.drain(..).next();
        let (reply, mut replies) =
            match client::request_with_fd(&self.sandbox, &wrapped, fd.as_ref().map(AsFd::as_fd)) {
                Ok(r) => r,
                Err(e) => {
                    serve::reply(&mut stream, &MonitorReply::Error(e));
                    return;
                }
            };
        if let (MonitorReply::Ok, Some(status)) = (&reply, then) {
            // Before the reply: a `husk state` right after the command must see it.
            let mut st = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if st.status != Status::Stopped {
                st.status = status;
                let _ = state::write_state(&self.dir, &st);
            }
        }
        if kill && matches!(reply, MonitorReply::Ok) {
            let _ = self.endings.send(Ending::Killed);
        }
        serve::reply(&mut stream, &reply);
        // Later replies (an exec'd process's exit), until the sandbox's monitor closes.
        while let Ok(later) = client::read_reply(&mut replies) {
            serve::reply(&mut stream, &later);
        }
    }
}
