//! The `husk` command line.

mod vm;

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "husk",
    version,
    about = "OCI runtime that runs each container in its own KVM microVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Developer commands that work on a VM without the OCI layer.
    #[command(subcommand)]
    Vm(vm::VmCommand),
}

/// Parses the arguments and runs the command.
pub fn main(process_start: Instant) -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vm(cmd) => vm::run(cmd, process_start),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("husk: {e:#}");
            ExitCode::FAILURE
        }
    }
}
