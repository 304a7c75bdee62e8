//! Progress output: every line says how long the whole task has been running.

use std::time::{Duration, Instant};

/// A task's clock; phases print with the elapsed time in front.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
}

impl Progress {
    /// Starts the clock.
    pub fn start() -> Progress {
        Progress {
            start: Instant::now(),
        }
    }

    /// Prints a progress line.
    pub fn say(&self, msg: impl std::fmt::Display) {
        println!("[{}] {msg}", fmt_duration(self.start.elapsed()));
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// `75.3s` or `4m12s`.
pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:5.1}s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}
