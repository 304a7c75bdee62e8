//! The messages between `husk` commands and a container's monitor, over `monitor.sock`:
//! one JSON object per line. A command sends one [`MonitorRequest`] and reads
//! [`MonitorReply`]s until the one that answers it (an exec also gets `Exited` later, on the
//! same connection). A request may carry one file descriptor (SCM_RIGHTS on its first
//! bytes): the monitor runs in a jail (see `jail`) where it cannot open the caller's paths, so
//! what it needs from the caller's side of the world (an exec's pty) comes as a descriptor.

use std::io::{IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use husk_proto::{Stdio, WindowSize};
use serde::{Deserialize, Serialize};

/// What a command asks the monitor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MonitorRequest {
    /// Start the container's process.
    Start,
    /// Deliver a signal to the main process, or to every process with `all`.
    Kill {
        /// Signal number.
        signal: i32,
        /// All processes.
        all: bool,
    },
    /// Deliver a signal to an exec'd process (`exec` is the id from
    /// [`MonitorReply::ExecStarted`]): how `husk exec`, the exec relay included, forwards the
    /// signals sent to it.
    KillExec {
        /// Which exec.
        exec: u32,
        /// Signal number.
        signal: i32,
    },
    /// The guest pids of the container's processes.
    Ps,
    /// Run another process in the container.
    Exec {
        /// The OCI process JSON.
        process_json: Vec<u8>,
        /// Its stdio (ports the caller listens on at `vsock.sock_<port>`).
        stdio: Stdio,
        /// With a terminal whose master the caller already sent to the engine's console
        /// socket: the pty's slave comes with this request, the monitor relays it (so the
        /// exec may be detached) and `stdio` is ignored.
        console: bool,
    },
    /// Resize the terminal of an exec'd process (`exec` is the id from
    /// [`MonitorReply::ExecStarted`]).
    ResizeExec {
        /// Which exec.
        exec: u32,
        /// The new size.
        size: WindowSize,
    },
    /// Resize the terminal of the container's main process: how a pod's container's terminal,
    /// relayed by the process that stands for it on the host (`member`), follows the engine's
    /// (the VM's own container's terminal is the monitor's, which sees its resizes itself).
    Resize {
        /// The new size.
        size: WindowSize,
    },
    /// Pause the VM's vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// Resource usage of the container (runc's `events --stats` data).
    Stats,
    /// Add a container to this monitor's VM (a pod's container, from the process that stands
    /// for it on the host; see `monitor::member`): husk-init creates it from `config_json` on
    /// the share, its stdio on `stdio`'s ports. Answered [`MonitorReply::Added`], then
    /// [`MonitorReply::Exited`] on the same connection when its main process ends.
    AddContainer {
        /// Its id.
        id: String,
        /// Its config.json.
        config_json: Vec<u8>,
        /// Where its rootfs is in the share.
        rootfs: String,
        /// Where its bind mounts' sources are in the share.
        mounts: Vec<husk_proto::MountSource>,
        /// Its stdio: ports the caller listens on at `vsock.sock_<port>` (here).
        stdio: Stdio,
    },
    /// `request` about container `container` of the VM (one [`MonitorRequest::AddContainer`]
    /// added) instead of the VM's own: how a pod's container's commands reach the VM.
    ForContainer {
        /// Which container (the number from [`MonitorReply::Added`]).
        container: u32,
        /// The command.
        request: Box<MonitorRequest>,
    },
    /// Take the container out of the VM (only with [`MonitorRequest::ForContainer`]): what is
    /// left of its processes is killed, its cgroup removed.
    Remove,
    /// Change the container's limits in the VM (`husk update`): the fields `resources` sets
    /// replace the container's, and the result must fit the VM. Answered `Ok` once husk-init
    /// has applied them.
    Update {
        /// What changes.
        resources: Box<oci_spec::runtime::LinuxResources>,
    },
}

/// What the monitor answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MonitorReply {
    /// Done.
    Ok,
    /// Pids for `Ps`.
    Pids(Vec<u32>),
    /// The exec'd process runs.
    ExecStarted {
        /// Its guest pid.
        pid: u32,
        /// Its exec id (for resizes).
        exec: u32,
    },
    /// The exec'd process ended: its exit status (128+N for signal N).
    Exited(i32),
    /// Resource usage, as runc's stats JSON.
    Stats(serde_json::Value),
    /// The request failed.
    Error(String),
    /// A container was added to the VM.
    Added {
        /// Its number in the VM (for [`MonitorRequest::ForContainer`]).
        container: u32,
        /// Its main process's guest pid.
        pid: u32,
    },
}

/// The longest request line the monitor reads (an exec's process JSON is the big one).
pub const MAX_REQUEST: usize = 1 << 20;

/// Writes `req` as one line on `stream`, with `fd` (if any) attached to its first bytes.
pub fn send_request(
    stream: &mut UnixStream,
    req: &MonitorRequest,
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let Some(fd) = fd else {
        return stream.write_all(&line);
    };
    let fds = [fd.as_raw_fd()];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let sent = nix::sys::socket::sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&line)],
        &cmsg,
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    stream.write_all(&line[sent..])
}

/// Reads one request line from `stream`, with the descriptors that came with it. Reads no
/// further than the newline's packet: a caller sends one request and then waits.
pub fn receive_request(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = nix::sys::socket::recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        for c in msg.cmsgs()? {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these descriptors in this process for
                // us; nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let n = msg.bytes;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        line.extend_from_slice(&buf[..n]);
        if buf[..n].contains(&b'\n') {
            return Ok((line, fds));
        }
        if line.len() > MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("request longer than {MAX_REQUEST} bytes"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_its_descriptor() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let req = MonitorRequest::Exec {
            process_json: vec![b'x'; 100_000],
            stdio: husk_proto::Stdio::NULL,
            console: true,
        };
        let writer = std::thread::spawn(move || {
            send_request(&mut a, &req, Some(std::os::fd::AsFd::as_fd(&file))).unwrap();
        });
        let (line, fds) = receive_request(&b).unwrap();
        writer.join().unwrap();
        assert_eq!(fds.len(), 1);
        let got: MonitorRequest = serde_json::from_slice(&line).unwrap();
        assert!(
            matches!(got, MonitorRequest::Exec { console: true, ref process_json, .. } if process_json.len() == 100_000)
        );
        let target = std::fs::read_link(format!("/proc/self/fd/{}", fds[0].as_raw_fd())).unwrap();
        assert_eq!(target, std::path::Path::new("/dev/null"));
    }

    #[test]
    fn a_caller_that_hangs_up_mid_line_is_an_error() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"{\"Start").unwrap();
        drop(a);
        assert!(receive_request(&b).is_err());
    }
}
