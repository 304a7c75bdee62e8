//! The commands that read a container's state: `husk state`, `husk list` and `husk ps` (the
//! last asks the guest for its pids).

use std::process::ExitCode;

use anyhow::{Result, bail};

use super::{Context, IdArg};
use crate::monitor::api::{MonitorReply, MonitorRequest};
use crate::monitor::client;
use crate::oci::state::Status;

/// `ps`.
#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// Container id.
    id: String,
    /// table or json.
    #[arg(long, short = 'f', default_value = "table")]
    format: String,
}

/// `list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// table or json.
    #[arg(long, short = 'f', default_value = "table")]
    format: String,
    /// Only ids.
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// `husk state`.
pub fn state(ctx: &Context, args: IdArg) -> Result<ExitCode> {
    let entry = ctx.store().open(&args.id)?;
    let st = entry.current()?;
    println!("{}", serde_json::to_string_pretty(&st)?);
    Ok(ExitCode::SUCCESS)
}

/// `husk ps`.
pub fn ps(ctx: &Context, args: PsArgs) -> Result<ExitCode> {
    let entry = ctx.store().open(&args.id)?;
    let st = entry.current()?;
    if !matches!(
        st.status,
        Status::Created | Status::Running | Status::Paused
    ) {
        bail!("container {} is {}", args.id, st.status);
    }
    let pids = match client::request(&entry.sockets()?.monitor(), &MonitorRequest::Ps)
        .map_err(anyhow::Error::msg)?
        .0
    {
        MonitorReply::Pids(p) => p,
        MonitorReply::Error(e) => bail!("ps {}: {e}", args.id),
        other => bail!("unexpected reply {other:?}"),
    };
    match args.format.as_str() {
        "json" => println!("{}", serde_json::to_string(&pids)?),
        "table" => {
            println!("PID");
            for p in pids {
                println!("{p}");
            }
        }
        other => bail!("unknown format {other:?} (table or json)"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `husk list`.
pub fn list(ctx: &Context, args: ListArgs) -> Result<ExitCode> {
    let store = ctx.store();
    let mut states = Vec::new();
    for id in store.list()? {
        if let Ok(entry) = store.open(&id)
            && let Ok(st) = entry.current()
        {
            states.push(st);
        }
    }
    if args.quiet {
        for s in &states {
            println!("{}", s.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    match args.format.as_str() {
        "json" => println!("{}", serde_json::to_string(&states)?),
        "table" => {
            println!(
                "{:<20} {:<8} {:<10} {:<40} CREATED",
                "ID", "PID", "STATUS", "BUNDLE"
            );
            for s in &states {
                let pid = s.pid.filter(|_| s.status != Status::Stopped).unwrap_or(0);
                println!(
                    "{:<20} {:<8} {:<10} {:<40} {}",
                    s.id,
                    pid,
                    s.status,
                    s.bundle.display(),
                    s.created
                );
            }
        }
        other => bail!("unknown format {other:?} (table or json)"),
    }
    Ok(ExitCode::SUCCESS)
}
