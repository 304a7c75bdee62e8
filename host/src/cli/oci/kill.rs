//! `husk kill`: a signal to the container's process, or to all of its processes.

use std::process::ExitCode;

use anyhow::{Result, anyhow, bail};

use super::Context;
use crate::monitor::api::{MonitorReply, MonitorRequest};
use crate::monitor::client;
use crate::oci::state::Status;

/// `kill`.
#[derive(Debug, clap::Args)]
pub struct KillArgs {
    /// Container id.
    id: String,
    /// Signal name or number.
    #[arg(default_value = "SIGTERM")]
    signal: String,
    /// Signal every process of the container.
    #[arg(long, short = 'a')]
    all: bool,
}

/// A signal name (`TERM`, `SIGTERM`) or number.
pub fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("invalid signal number {n}");
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| anyhow!("unknown signal {s:?}"))
}

/// `husk kill`.
pub fn kill(ctx: &Context, args: KillArgs) -> Result<ExitCode> {
    let signal = parse_signal(&args.signal)?;
    let entry = ctx.store().open(&args.id)?;
    let st = entry.current()?;
    if !matches!(
        st.status,
        Status::Created | Status::Running | Status::Paused
    ) {
        // runc's words: the containerd shim recognises them as "already finished".
        bail!(
            "cannot kill container {}: container not running (it is {})",
            args.id,
            st.status
        );
    }
    let req = MonitorRequest::Kill {
        signal,
        all: args.all,
    };
    let first = match client::request(&entry.sockets()?.monitor(), &req) {
        Ok((first, _)) => first,
        // The process ended while the signal was on its way: the monitor went away with it.
        Err(_) if entry.current()?.status == Status::Stopped => {
            bail!("cannot kill container {}: container not running", args.id)
        }
        Err(e) => bail!(e),
    };
    match first {
        MonitorReply::Ok => Ok(ExitCode::SUCCESS),
        MonitorReply::Error(e) => bail!("signalling container {}: {e}", args.id),
        other => bail!("unexpected reply {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::state::{self, State};

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("TERM").unwrap(), 15);
        assert_eq!(parse_signal("SIGKILL").unwrap(), 9);
        assert_eq!(parse_signal("kill").unwrap(), 9);
        assert_eq!(parse_signal("2").unwrap(), 2);
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("SIGNOPE").is_err());
    }

    /// A container whose monitor is gone (pid 0 never names one) is stopped: `kill` says so
    /// in runc's words, which the containerd shim maps to "process already finished".
    #[test]
    fn killing_a_stopped_container_says_not_running() {
        let root = std::env::temp_dir().join(format!("husk-kill-stopped-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let ctx = Context {
            log: None,
            log_format: crate::cli::log::Format::Text,
            root: root.clone(),
            debug: false,
            monitor_uid: crate::monitor::uids::MonitorUser::Root,
            monitor_uid_pool: crate::monitor::uids::Pool::default(),
            systemd_cgroup: false,
        };
        let entry = ctx.store().create("c1").unwrap();
        entry
            .write(&State {
                oci_version: state::OCI_VERSION.into(),
                id: "c1".into(),
                status: Status::Running,
                pid: Some(0),
                bundle: root.clone(),
                annotations: Default::default(),
                created: state::now_rfc3339(),
                monitor_start_time: 0,
                exit_status: Some(0),
            })
            .unwrap();
        drop(entry);
        let args = KillArgs {
            id: "c1".into(),
            signal: "TERM".into(),
            all: false,
        };
        let e = kill(&ctx, args).unwrap_err().to_string();
        assert!(
            e.contains("c1") && e.contains("container not running"),
            "{e}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
