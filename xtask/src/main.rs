//! `cargo xtask`: developer tasks that are programs rather than shell scripts.
//!
//! - `build-image`: the guest assets every husk VM boots (kernel `vmlinux` + initramfs).
//! - `bench boot`: boot-to-init time of husk's VMM next to QEMU's on the same KVM; with
//!   `--initcall-debug`, where the guest kernel's boot goes.
//! - `bench counts`: system calls and page faults per phase of husk-init, runc and crun.
//! - `bench startup`: the phases of `husk run` next to runc, crun and QEMU; memory, density.
//! - `bench fs`: exec and read throughput through the virtio-fs share next to the host's.
//! - `bench podman`: `podman run --rm IMAGE true` with husk next to runc and crun.
//! - `bench pod`: a pod of two containers through containerd's CRI, husk next to runc.
//! - `fuzz`: each cargo-fuzz target for a while, with executions and crashes per target.

mod bench;
mod fuzz;
mod image;
mod progress;
mod tools;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "husk developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the guest kernel (vmlinux) and the initramfs holding husk-init.
    ///
    /// Outputs are cached under $HUSK_CACHE_DIR (default /var/cache/husk) by a hash of their
    /// inputs, so an unchanged rebuild takes seconds.
    BuildImage(image::BuildImageArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run each fuzz target in fuzz/ for a while (one after the other) and report executions
    /// and crashes per target; fails on a crash, naming the input that caused it.
    Fuzz(fuzz::FuzzArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Boot-to-init time and peak RSS: husk's VMM next to QEMU microvm on the same KVM (or,
    /// with --initcall-debug, where the guest kernel's boot to husk-init goes).
    Boot(bench::boot::BootBenchArgs),
    /// System calls and page faults of a container's phases in husk-init, next to runc's and
    /// crun's for the same container.
    Counts(bench::counts::CountsBenchArgs),
    /// First exec of a 1 MiB binary and sequential read throughput through the virtio-fs
    /// share, next to the same on the host.
    Fs(bench::fs::FsBenchArgs),
    /// `podman run --rm IMAGE true` wall time with husk as podman's runtime, next to runc and
    /// crun under the same podman, in turns.
    Podman(bench::podman::PodmanBenchArgs),
    /// Time to a running pod of two containers through containerd's CRI plugin (the tests' CRI
    /// harness), with husk and runc as the runtime handler in turns; where husk's time goes.
    Pod(bench::pod::PodBenchArgs),
    /// Where each millisecond of `husk run` goes (husk's own phase timestamps), next to runc
    /// run, crun run and QEMU microvm's boot-to-init in the same run; memory and density.
    Startup(bench::startup::StartupBenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::BuildImage(args) => image::build_image(&args).map(drop),
        Command::Bench(BenchCommand::Boot(args)) => bench::boot::run(&args),
        Command::Bench(BenchCommand::Counts(args)) => bench::counts::run(&args),
        Command::Bench(BenchCommand::Fs(args)) => bench::fs::run(&args),
        Command::Bench(BenchCommand::Podman(args)) => bench::podman::run(&args),
        Command::Bench(BenchCommand::Pod(args)) => bench::pod::run(&args),
        Command::Bench(BenchCommand::Startup(args)) => bench::startup::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
