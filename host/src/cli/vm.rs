//! `husk vm boot`: boots a VM from a kernel and an initramfs, without the OCI layer, and
//! reports when each boot phase happened. Used by tests and the startup benchmark.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::vmm::{self, SeccompMode, VmConfig, VmExit};

#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Boot a VM and wait for it to end.
    Boot(BootArgs),
}

#[derive(Debug, clap::Args)]
pub struct BootArgs {
    /// Uncompressed guest kernel (vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// initramfs (newc cpio).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line parameters.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Attach a vsock device whose host side is this Unix socket (guest-initiated
    /// connections to port P go to PATH_P).
    #[arg(long)]
    vsock: Option<PathBuf>,
    /// Attach the serial console to stdout (slow: every byte is a VM exit).
    #[arg(long)]
    console: bool,
    /// Give up after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Run without the seccomp filters (debugging only).
    #[arg(long, conflicts_with = "seccomp_log")]
    no_seccomp: bool,
    /// Only log seccomp violations (to the kernel log) instead of killing.
    #[arg(long)]
    seccomp_log: bool,
    /// Print the boot timeline as JSON on stdout instead of a table on stderr.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: VmCommand, process_start: Instant) -> Result<ExitCode> {
    match cmd {
        VmCommand::Boot(args) => boot(args, process_start),
    }
}

fn boot(args: BootArgs, process_start: Instant) -> Result<ExitCode> {
    for (what, path) in [
        ("kernel", Some(&args.kernel)),
        ("initramfs", args.initrd.as_ref()),
    ] {
        if let Some(p) = path
            && !p.is_file()
        {
            bail!("{what} {} does not exist or is not a file", p.display());
        }
    }
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline_extra: args.cmdline,
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
        console: args.console,
        vsock: args.vsock,
        shares: vec![],
        nets: vec![],
        seccomp: if args.no_seccomp {
            SeccompMode::Off
        } else if args.seccomp_log {
            SeccompMode::Log
        } else {
            SeccompMode::Enforce
        },
        kvm: None,
    };
    let vm = vmm::start(&config, process_start).context("starting the VM")?;
    // From here this thread only waits for the VM, stops its threads and reports.
    vmm::apply_seccomp(config.seccomp, vmm::ThreadKind::Api).map_err(anyhow::Error::msg)?;
    let (why, timeline) = vm.wait(args.timeout.map(Duration::from_secs));
    if args.json {
        let phases: Vec<String> = timeline
            .phases()
            .iter()
            .map(|(name, ms)| format!("{{\"phase\":\"{name}\",\"ms\":{ms:.3}}}"))
            .collect();
        println!(
            "{{\"exit\":\"{}\",\"phases\":[{}]}}",
            exit_name(&why),
            phases.join(",")
        );
    } else {
        eprintln!("husk vm boot: {}", exit_name(&why));
        for (name, ms) in timeline.phases() {
            eprintln!("  {ms:>10.1} ms  {name}");
        }
    }
    match why {
        VmExit::PowerOff | VmExit::Reset => Ok(ExitCode::SUCCESS),
        VmExit::Stopped => Ok(ExitCode::from(1)),
        VmExit::Error(e) => bail!("the VM failed: {e}"),
    }
}

fn exit_name(why: &VmExit) -> String {
    match why {
        VmExit::PowerOff => "power-off".into(),
        VmExit::Reset => "reset".into(),
        VmExit::Stopped => "stopped".into(),
        VmExit::Error(e) => format!("error: {}", e.replace('"', "'")),
    }
}
