//! `husk start`: the monitor has the guest start the process; then the `poststart` hooks.

use std::process::ExitCode;

use anyhow::{Result, bail};

use super::{Context, IdArg};
use crate::monitor::api::{MonitorReply, MonitorRequest};
use crate::monitor::client;
use crate::oci::hooks::{self, HookKind};
use crate::oci::state::Status;

/// Starts created container `id` (`start`, and `run` after `create`).
pub(super) fn start_container(ctx: &Context, id: &str) -> Result<()> {
    let entry = ctx.store().open(id)?;
    let st = entry.current()?;
    if st.status != Status::Created {
        bail!(
            "cannot start container {id}: it is {}, not created",
            st.status
        );
    }
    match client::request(&entry.sockets()?.monitor(), &MonitorRequest::Start)
        .map_err(anyhow::Error::msg)?
        .0
    {
        MonitorReply::Ok => {
            // Without the container's lock: a hook may well run `husk state`.
            let (kept, st) = (hooks::load_or_warn(entry.dir()), entry.current());
            drop(entry);
            if let (Some(kept), Ok(st)) = (kept, st) {
                hooks::run_warning(HookKind::Poststart, Some(&kept), &st);
            }
            crate::phases::record_now("start-returned");
            Ok(())
        }
        MonitorReply::Error(e) => bail!("starting container {id}: {e}"),
        other => bail!("starting container {id}: unexpected reply {other:?}"),
    }
}

/// `husk start`.
pub fn start(ctx: &Context, args: IdArg) -> Result<ExitCode> {
    start_container(ctx, &args.id)?;
    Ok(ExitCode::SUCCESS)
}
