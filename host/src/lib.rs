//! `husk`: an OCI runtime that runs each container in its own KVM microVM.
//!
//! This library is the whole of the `husk` binary (`src/main.rs` only calls [`main`]); it is a
//! library so that the fuzz targets in `fuzz/` can drive the guest-facing code. Everything but
//! [`main`] is private to the crate, except the `fuzzing` module, which exists only with the
//! `fuzzing` cargo feature (off by default) and is not part of any supported interface.
//!
//! The modules, from the command line down:
//!
//! - `cli`: parses the command line; `cli::oci` has one file per OCI verb, each a few lines
//!   over the modules below;
//! - `oci`: the bundle, the state store under `--root`, the hooks, which containers make a pod
//!   (`pod`);
//! - `monitor`: the process behind each container, in the stages of creating it (`setup`,
//!   `vm`, `guest`, `serve`), and its control socket (`api`, `client`); for a pod's later
//!   container, the process that stands for it in its sandbox's VM (`member`);
//! - `template`: the cache of saved, booted VMs that containers' VMs are restored from;
//! - `vmm`: the KVM virtual machine and its devices;
//! - `assets` (where the guest image is), `phases` (`HUSK_PHASES` timestamps), `mount_ns`
//!   (a private mount namespace), `pid` (the pid the host knows this process by) and
//!   `errors` ([`error_chain`]) serve them all. None of them uses this file: what they share
//!   is defined in those leaves, and `crate::error_chain` is a re-export.

mod assets;
mod cli;
mod errors;
mod monitor;
mod mount_ns;
mod oci;
mod phases;
mod pid;
mod template;
mod vmm;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

use std::process::ExitCode;
use std::time::Instant;

pub(crate) use errors::error_chain;

/// Parses the command line and runs the command; `process_start` is when the process began
/// (the start of the boot timeline).
pub fn main(process_start: Instant) -> ExitCode {
    cli::main(process_start)
}
