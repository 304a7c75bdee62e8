//! `husk`: an OCI runtime that runs each container in its own KVM microVM. The code is in the
//! library (`src/lib.rs`).

use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let process_start = Instant::now();
    husk::main(process_start)
}
