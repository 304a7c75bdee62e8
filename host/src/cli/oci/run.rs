//! `husk run`: `create`, then `start`, then (unless `--detach`) wait for the container and
//! delete it, exiting with its status.

use std::process::ExitCode;

use anyhow::{Context as _, Result};

use super::create::{CreateArgs, create_container};
use super::delete::remove_entry;
use super::start::start_container;
use super::{Context, exit_code};

/// `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    create: CreateArgs,
    /// Return after starting instead of waiting for the container to exit.
    #[arg(long, short = 'd')]
    detach: bool,
}

/// `husk run`.
pub fn run(ctx: &Context, args: RunArgs) -> Result<ExitCode> {
    let mut child = create_container(ctx, &args.create)?;
    if let Err(e) = start_container(ctx, &args.create.id) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    if args.detach {
        return Ok(ExitCode::SUCCESS);
    }
    let status = child.wait().context("waiting for the monitor")?;
    let code = status.code().unwrap_or(255);
    // `run` without --detach cleans up after itself, as runc does.
    if let Ok(entry) = ctx.store().open(&args.create.id) {
        let _ = remove_entry(entry);
    }
    Ok(exit_code(code))
}
