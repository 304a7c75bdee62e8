//! Step 4 of a member's life (see `super`): the commands `husk` sends to the container's own
//! `monitor.sock` are passed to the sandbox's monitor, wrapped in
//! [`MonitorRequest::ForContainer`], and its replies passed back; the status a command
//! changes is recorded in the container's `state.json` before the reply. One thread per
//! connection, each confined as `Member` (the sandbox's monitor may be taken over).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use husk_seccomp::ThreadKind;

use crate::monitor::api::{self, MonitorReply, MonitorRequest};
use crate::monitor::{client, serve, threads};
use crate::oci::state::{self, State, Status};

/// The status a command that succeeded leaves the container in.
fn status_after(request: &MonitorRequest) -> Option<Status> {
    match request {
        MonitorRequest::Start | MonitorRequest::Resume => Some(Status::Running),
        MonitorRequest::Pause => Some(Status::Paused),
        _ => None,
    }
}

/// Accepts commands on the container's `monitor.sock` and passes each to the sandbox's
/// monitor (see the module docs), one thread per connection.
pub(super) fn spawn_command_proxy(
    commands: UnixListener,
    sandbox: PathBuf,
    container: u32,
    state: Arc<Mutex<State>>,
    dir: PathBuf,
) {
    threads::spawn("commands", ThreadKind::Member, move || {
        for stream in commands.incoming() {
            let Ok(stream) = stream else { continue };
            let (sandbox, state, dir) = (sandbox.clone(), state.clone(), dir.clone());
            threads::spawn("command", ThreadKind::Member, move || {
                proxy(stream, &sandbox, container, &state, &dir);
            });
        }
    });
}

/// Passes one command from `stream` to the sandbox's monitor, and its replies back.
fn proxy(mut stream: UnixStream, sandbox: &Path, container: u32, state: &Mutex<State>, dir: &Path) {
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
    let wrapped = MonitorRequest::ForContainer {
        container,
        request: Box::new(request),
    };
    let fd: Option<OwnedFd> = fds.drain(..).next();
    let (reply, mut replies) =
        match client::request_with_fd(sandbox, &wrapped, fd.as_ref().map(AsFd::as_fd)) {
            Ok(r) => r,
            Err(e) => {
                serve::reply(&mut stream, &MonitorReply::Error(e));
                return;
            }
        };
    if let (MonitorReply::Ok, Some(status)) = (&reply, then) {
        // Before the reply: a `husk state` right after the command must see it.
        let mut st = state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if st.status != Status::Stopped {
            st.status = status;
            let _ = state::write_state(dir, &st);
        }
    }
    serve::reply(&mut stream, &reply);
    // Later replies (an exec'd process's exit), until the sandbox's monitor closes.
    while let Ok(later) = client::read_reply(&mut replies) {
        serve::reply(&mut stream, &later);
    }
}
