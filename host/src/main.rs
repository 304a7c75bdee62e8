//! `husk`: an OCI runtime that runs each container in its own KVM microVM.

mod assets;
mod cli;
mod monitor;
mod oci;
mod phases;
mod vmm;

use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let process_start = Instant::now();
    cli::main(process_start)
}
