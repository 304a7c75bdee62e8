//! `husk events`: the container's resource usage as runc's stats events.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};

use super::Context;
use crate::monitor::api::{MonitorReply, MonitorRequest};
use crate::monitor::client;
use crate::oci::state::Status;

/// `events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Container id.
    id: String,
    /// Print one stats event and exit.
    #[arg(long)]
    stats: bool,
    /// Seconds between stats events.
    #[arg(long, default_value_t = 5)]
    interval: u64,
}

/// `husk events`: stats events as JSON lines (runc's format), once with --stats.
pub fn events(ctx: &Context, args: EventsArgs) -> Result<ExitCode> {
    loop {
        let sockets = {
            let entry = ctx.store().open(&args.id)?;
            let st = entry.current()?;
            if !matches!(st.status, Status::Created | Status::Running) {
                if args.stats {
                    bail!("container {} is {}", args.id, st.status);
                }
                return Ok(ExitCode::SUCCESS);
            }
            entry.sockets()?
        };
        let data = match client::request(&sockets.monitor(), &MonitorRequest::Stats)
            .map_err(anyhow::Error::msg)?
            .0
        {
            MonitorReply::Stats(d) => d,
            MonitorReply::Error(e) => bail!("stats of {}: {e}", args.id),
            other => bail!("unexpected reply {other:?}"),
        };
        let ev = serde_json::json!({"type": "stats", "id": args.id, "data": data});
        println!("{ev}");
        if args.stats {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs(args.interval.max(1)));
    }
}
