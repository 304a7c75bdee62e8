//! Logging to the kernel log (`/dev/kmsg`) as PID 1, to stderr otherwise.
//!
//! In the VM, userspace writes to the serial console are unreliable on some hosts and cost a
//! VM exit per byte, while `/dev/kmsg` lines reach the console through the kernel's own
//! (polled) console path and carry kernel timestamps. Errors go out at `KERN_ERR` so they are
//! visible even with `quiet`; everything else at `KERN_INFO`/`KERN_DEBUG`.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

static KMSG: Mutex<Option<File>> = Mutex::new(None);

/// Sends further log lines to `/dev/kmsg` (if it can be opened).
pub fn init_kmsg() {
    // /dev may not be mounted yet: devtmpfs is mounted by system::setup, which calls this
    // again afterwards.
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg")
        && let Ok(mut g) = KMSG.lock()
    {
        *g = Some(f);
    }
}

/// Writes one line at the given syslog level.
pub fn write(level: u8, args: std::fmt::Arguments<'_>) {
    let line = format!("<{level}>husk-init: {args}\n");
    if let Ok(mut g) = KMSG.lock()
        && let Some(f) = g.as_mut()
    {
        // One write() per line: /dev/kmsg takes each write as one record.
        if f.write_all(line.as_bytes()).is_ok() {
            return;
        }
    }
    let _ = std::io::stderr().write_all(&line.as_bytes()[3..]);
}

/// An error and every cause behind it, on one line (`what: why: deeper why`): the top-level
/// message alone ("control connection failed") does not say what the host did wrong.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

macro_rules! error {
    ($($a:tt)*) => { $crate::log::write(3, format_args!($($a)*)) };
}
macro_rules! warning {
    ($($a:tt)*) => { $crate::log::write(4, format_args!($($a)*)) };
}
macro_rules! info {
    ($($a:tt)*) => { $crate::log::write(6, format_args!($($a)*)) };
}
macro_rules! debug {
    ($($a:tt)*) => {
        if cfg!(debug_assertions) { $crate::log::write(7, format_args!($($a)*)) }
    };
}
pub(crate) use {debug, error, info, warning};

#[cfg(test)]
mod tests {
    #[test]
    fn chain_names_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed mid-frame");
        let e = crate::server::ServerError::Connection(husk_proto::ProtoError::Io(io));
        assert_eq!(
            super::chain(&e),
            "control connection failed: I/O error on the control connection: closed mid-frame"
        );
    }
}
