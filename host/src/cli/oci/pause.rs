//! `husk pause` and `husk resume`: the monitor stops or restarts the VM's vCPUs.

use std::process::ExitCode;

use anyhow::{Result, bail};

use super::{Context, IdArg};
use crate::monitor::api::{MonitorReply, MonitorRequest};
use crate::monitor::client;
use crate::oci::state::Status;

/// `husk pause` / `husk resume`.
pub fn pause(ctx: &Context, args: IdArg, pause: bool) -> Result<ExitCode> {
    let entry = ctx.store().open(&args.id)?;
    let st = entry.current()?;
    let (want, verb) = if pause {
        (Status::Running, "pause")
    } else {
        (Status::Paused, "resume")
    };
    if st.status != want {
        bail!("cannot {verb} container {}: it is {}", args.id, st.status);
    }
    let req = if pause {
        MonitorRequest::Pause
    } else {
        MonitorRequest::Resume
    };
    match client::request(&entry.sockets()?.monitor(), &req)
        .map_err(anyhow::Error::msg)?
        .0
    {
        MonitorReply::Ok => Ok(ExitCode::SUCCESS),
        MonitorReply::Error(e) => bail!("{verb} {}: {e}", args.id),
        other => bail!("unexpected reply {other:?}"),
    }
}
