//! What the monitor logs about what husk-init sent it: something a guest controls, so it is
//! rate limited and bounded in length. A guest that repeats a message the monitor does not
//! expect (a second `Hello`, say) must not fill the engine's log, nor make the monitor spend
//! its time formatting 8 MiB frames.

use std::fmt;
use std::io::Write;
use std::time::{Duration, Instant};

/// Lines let through per [`WINDOW`]; the rest are counted and reported once the window passes.
pub(super) const BURST: u32 = 10;
/// The window of [`BURST`].
pub(super) const WINDOW: Duration = Duration::from_secs(60);
/// The longest description of a guest message in a line.
pub(super) const MAX_DESCRIPTION: usize = 256;

/// A rate limiter of guest-triggered log lines (for the main thread, which alone logs them).
#[derive(Debug, Default)]
pub(super) struct GuestLog {
    start: Option<Instant>,
    lines: u32,
    dropped: u64,
}

impl GuestLog {
    /// Writes `line` to `out` unless [`BURST`] lines were already written in this window;
    /// the first line of a new window says how many were dropped in the last.
    pub(super) fn line(&mut self, now: Instant, out: &mut impl Write, line: fmt::Arguments<'_>) {
        if self
            .start
            .is_none_or(|start| now.duration_since(start) >= WINDOW)
        {
            if self.dropped > 0 {
                let _ = writeln!(
                    out,
                    "husk monitor: {} more lines about husk-init's messages were dropped",
                    self.dropped
                );
            }
            *self = GuestLog {
                start: Some(now),
                lines: 0,
                dropped: 0,
            };
        }
        if self.lines < BURST {
            self.lines += 1;
            let _ = writeln!(out, "{line}");
        } else {
            self.dropped += 1;
        }
    }
}

/// `value`'s `Debug` text, cut at [`MAX_DESCRIPTION`] bytes (formatting stops there: a huge
/// message costs no more than a small one).
pub(super) fn describe(value: &impl fmt::Debug) -> String {
    struct Bounded(String);
    impl fmt::Write for Bounded {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let room = MAX_DESCRIPTION.saturating_sub(self.0.len());
            if s.len() <= room {
                self.0.push_str(s);
                return Ok(());
            }
            let mut end = room;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            self.0.push_str(&s[..end]);
            Err(fmt::Error)
        }
    }
    let mut out = Bounded(String::new());
    if fmt::write(&mut out, format_args!("{value:?}")).is_err() {
        out.0.push_str("...");
    }
    out.0
}

#[cfg(test)]
mod tests {
    use husk_proto::{GuestMessage, Hello, Response};

    use super::*;

    #[test]
    fn a_guest_repeating_a_message_gets_a_few_lines_a_minute() {
        let mut log = GuestLog::default();
        let mut out = Vec::new();
        let t0 = Instant::now();
        let hello = GuestMessage::Hello(Hello::current());
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_millis(u64::from(i));
            log.line(
                now,
                &mut out,
                format_args!("unexpected: {}", describe(&hello)),
            );
        }
        let lines = String::from_utf8(out.clone()).unwrap();
        assert_eq!(lines.lines().count(), 10, "{lines}");
        // A minute on: the count of what was dropped, and lines again.
        log.line(t0 + WINDOW * 2, &mut out, format_args!("again"));
        let lines = String::from_utf8(out).unwrap();
        let tail: Vec<&str> = lines.lines().skip(10).collect();
        assert_eq!(
            tail,
            [
                "husk monitor: 9990 more lines about husk-init's messages were dropped",
                "again"
            ]
        );
    }

    #[test]
    fn a_huge_message_is_described_in_a_few_hundred_bytes() {
        let pids = GuestMessage::Response {
            id: husk_proto::RequestId(9),
            result: Ok(Response::Pids(vec![4_000_000; 1 << 20])),
        };
        let text = describe(&pids);
        assert!(text.len() <= MAX_DESCRIPTION + 3, "{}", text.len());
        assert!(text.starts_with("Response"), "{text}");
        assert!(text.ends_with("..."), "{text}");
        assert_eq!(
            describe(&Hello::current()),
            format!("{:?}", Hello::current())
        );
    }
}
