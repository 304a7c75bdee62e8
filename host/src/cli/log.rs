//! Error reporting: one line on stderr, and with `--log` the same line in the log file, as
//! text or in runc's JSON line format (`{"level":"error","msg":"...","time":"..."}`) so that
//! engines can show it.

use std::io::Write;
use std::path::PathBuf;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Plain lines.
    Text,
    /// runc's JSON lines.
    Json,
}

impl Format {
    /// The flag's value for this format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
        }
    }
}

/// Where errors go.
#[derive(Debug)]
pub struct Logger {
    path: Option<PathBuf>,
    format: Format,
}

impl Logger {
    /// A logger for `--log`/`--log-format`.
    pub fn new(path: Option<PathBuf>, format: Format, _debug: bool) -> Logger {
        Logger { path, format }
    }

    /// Reports an error.
    pub fn error(&self, msg: &str) {
        eprintln!("husk: {msg}");
        let Some(path) = &self.path else { return };
        let line = match self.format {
            Format::Text => format!("{} error: {msg}\n", crate::oci::state::now_rfc3339()),
            Format::Json => {
                let v = serde_json::json!({
                    "level": "error",
                    "msg": msg,
                    "time": crate::oci::state::now_rfc3339(),
                });
                format!("{v}\n")
            }
        };
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}
