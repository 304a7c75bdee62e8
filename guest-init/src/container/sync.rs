//! The pipes between husk-init and a container process it forked, from fork to execve.
//!
//! * parent → child (`GoAhead` pipe): one byte per step: [`GO_SETUP`] once the parent has
//!   written the id maps and placed the child in its cgroup, [`GO_START`] when the host says
//!   start. EOF means "give up": the child exits.
//! * child → parent (`Status` pipe, close-on-exec in the child): [`READY`] once the container
//!   is built and only `execve` is left, or [`FAILED`] followed by an error code byte and a
//!   message. EOF without either means the child exec'd (the pipe closed on exec) or died.

use std::fs::File;
use std::io::{self, Read, Write};

use husk_proto::ErrorCode;
use nix::errno::Errno;

/// Parent → child: id maps and cgroup are done, build the container.
pub const GO_SETUP: u8 = b'M';
/// Parent → child: exec the process.
pub const GO_START: u8 = b'S';
/// Child → parent: built, waiting for [`GO_START`].
pub const READY: u8 = b'R';
/// Child → parent: an error report follows.
pub const FAILED: u8 = b'E';

/// What the child reported.
#[derive(Debug, PartialEq, Eq)]
pub enum ChildReport {
    /// It is built and waits for start.
    Ready,
    /// It exec'd (or died without a word: the caller's waitpid tells which).
    Closed,
    /// It failed.
    Failed(ChildError),
}

/// An error the child reports before it exits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ChildError {
    /// The class of failure.
    pub code: ErrorCode,
    /// What failed, for humans.
    pub message: String,
}

impl ChildError {
    /// A failed system call while building the container.
    pub fn sys(what: impl std::fmt::Display, err: impl std::fmt::Display) -> Self {
        Self {
            code: ErrorCode::System,
            message: format!("{what}: {err}"),
        }
    }
}

/// [`ChildError::sys`] for `map_err`: the failed call's errno, explained by `what`.
pub fn sys_err(what: impl std::fmt::Display) -> impl FnOnce(Errno) -> ChildError {
    move |e| ChildError::sys(what, e)
}

const CODES: [ErrorCode; 8] = [
    ErrorCode::InvalidSpec,
    ErrorCode::Unsupported,
    ErrorCode::InvalidState,
    ErrorCode::NoSuchProcess,
    ErrorCode::ExecutableNotFound,
    ErrorCode::PermissionDenied,
    ErrorCode::System,
    ErrorCode::Protocol,
];

fn code_byte(code: ErrorCode) -> u8 {
    CODES
        .iter()
        .position(|c| *c == code)
        .and_then(|i| u8::try_from(i).ok())
        .unwrap_or(6)
}

/// Creates a pipe pair (read, write), both close-on-exec.
pub fn pipe() -> io::Result<(File, File)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((File::from(r), File::from(w)))
}

/// Child side: waits for a byte from the parent; `None` at EOF.
pub fn wait_for(go: &mut File) -> Option<u8> {
    let mut b = [0u8];
    loop {
        match go.read(&mut b) {
            Ok(1) => return Some(b[0]),
            Ok(_) => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// Child side: reports `err` (best effort: the parent may be gone).
pub fn report_failure(status: &mut File, err: &ChildError) {
    let mut msg = vec![FAILED, code_byte(err.code)];
    msg.extend_from_slice(err.message.as_bytes());
    let _ = status.write_all(&msg);
}

/// Parent side: reads what the child says, until READY, a failure, or EOF.
pub fn read_report(status: &mut File) -> io::Result<ChildReport> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match status.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.first() == Some(&READY) {
            return Ok(ChildReport::Ready);
        }
    }
    Ok(match buf.as_slice() {
        [] => ChildReport::Closed,
        [FAILED, code, msg @ ..] => ChildReport::Failed(ChildError {
            code: CODES
                .get(usize::from(*code))
                .copied()
                .unwrap_or(ErrorCode::System),
            message: String::from_utf8_lossy(msg).into_owned(),
        }),
        other => ChildReport::Failed(ChildError {
            code: ErrorCode::System,
            message: format!("container process sent {} unexpected bytes", other.len()),
        }),
    })
}

/// Parent side: sends one go-ahead byte.
pub fn send(go: &mut File, byte: u8) -> io::Result<()> {
    go.write_all(&[byte])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_travel_through_a_pipe() {
        let (mut r, mut w) = pipe().unwrap();
        report_failure(
            &mut w,
            &ChildError {
                code: ErrorCode::ExecutableNotFound,
                message: "exec: \"nope\": executable file not found in $PATH".into(),
            },
        );
        drop(w);
        let ChildReport::Failed(e) = read_report(&mut r).unwrap() else {
            panic!("not a failure")
        };
        assert_eq!(e.code, ErrorCode::ExecutableNotFound);
        assert!(e.message.contains("not found in $PATH"));

        let (mut r, mut w) = pipe().unwrap();
        send(&mut w, READY).unwrap();
        assert_eq!(read_report(&mut r).unwrap(), ChildReport::Ready);
        let (mut r, w) = pipe().unwrap();
        drop(w);
        assert_eq!(read_report(&mut r).unwrap(), ChildReport::Closed);
        assert_eq!(wait_for(&mut r), None);
    }
}
