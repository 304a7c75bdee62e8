//! A container process's terminal, allocated the way runc allocates it: by the process itself,
//! from the `/dev/ptmx` of the container's own mount namespace.
//!
//! The container mounts its own devpts instance at /dev/pts. A pty pair opened by husk-init in
//! the guest's devpts would work as a terminal, but its slave has no name in the container
//! (`tty` prints "not a tty", ttyname() fails). So the forked child opens the pair once it sees
//! the container's /dev (after pivot_root, or after joining the mount namespace for an exec'd
//! process), makes the slave its stdio and controlling terminal, and hands the master back to
//! husk-init over a socket pair with SCM_RIGHTS; husk-init relays the master to the host as
//! before.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use super::sync::ChildError;
use crate::sys;

/// The byte that travels with the master (SCM_RIGHTS needs at least one byte of data).
const TAG: u8 = b'T';

/// husk-init's end: the master arrives here.
#[derive(Debug)]
pub struct Receiver(UnixStream);

/// The child's end: it sends the master here.
#[derive(Debug)]
pub struct Sender(UnixStream);

/// A connected pair (both ends close-on-exec).
pub fn channel() -> io::Result<(Receiver, Sender)> {
    let (r, s) = UnixStream::pair()?;
    Ok((Receiver(r), Sender(s)))
}

impl Sender {
    /// The descriptor the forked child must keep open.
    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// In the forked child, in the container's mount namespace (and before the privilege
    /// drop): opens a pty pair in the container's devpts, gives it `size`, makes the slave fds
    /// 0, 1 and 2 and the controlling terminal (the caller is a session leader already), and
    /// sends the master to husk-init.
    pub fn open_terminal(self, size: Option<(u16, u16)>) -> Result<(), ChildError> {
        let (master, slave) = sys::open_pty().map_err(|e| {
            ChildError::sys(
                "process.terminal: opening /dev/ptmx in the container (is devpts mounted at \
                 /dev/pts?)",
                e,
            )
        })?;
        // The size must be there before the process can ask for it; for an exec'd process
        // nothing happens between this and execve.
        if let Some((rows, cols)) = size {
            sys::set_winsize(&master, rows, cols).map_err(|e| {
                ChildError::sys("setting the terminal size (process.consoleSize)", e)
            })?;
        }
        for target in 0..3 {
            sys::dup_onto(&slave, target).map_err(|e| ChildError::sys("dup2", e))?;
        }
        drop(slave);
        sys::set_controlling_tty(0)
            .map_err(|e| ChildError::sys("making the pty the controlling terminal", e))?;
        let fds = [master.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        loop {
            match sendmsg::<()>(
                self.0.as_raw_fd(),
                &[IoSlice::new(&[TAG])],
                &cmsg,
                MsgFlags::empty(),
                None,
            ) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    return Err(ChildError::sys(
                        "handing the terminal's master to husk-init",
                        e,
                    ));
                }
            }
        }
        // Our copy of the master goes now: the process must not hold it (its reads would
        // steal the host's input).
        drop(master);
        Ok(())
    }
}

impl Receiver {
    /// Waits for the child's master. An error when the child ended (or failed) before
    /// sending one: its report on the status pipe then says why.
    pub fn receive(&self) -> io::Result<OwnedFd> {
        let mut byte = [0u8; 1];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut byte)];
        let msg = loop {
            match recvmsg::<()>(
                self.0.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => break m,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        };
        let mut got = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: the kernel just installed `fd` in our table for this message;
                    // nothing else owns it. Extra descriptors (never sent) are closed.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    if got.is_none() {
                        got = Some(owned);
                    }
                }
            }
        }
        if msg.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the process ended before it opened its terminal",
            ));
        }
        got.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the process sent no terminal descriptor",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_sender_is_an_eof_not_a_hang() {
        let (r, s) = channel().unwrap();
        drop(s);
        let e = r.receive().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}
