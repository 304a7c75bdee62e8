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
    /// Restore a VM from the template of a shape (made first if there is none), wait until
    /// husk-init has reconnected and taken `Prepare`, report when each phase happened, stop.
    Restore(RestoreArgs),
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// vCPUs of the template.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory of the template, in MiB.
    #[arg(long, default_value_t = crate::oci::bundle::DEFAULT_MEMORY_MIB)]
    mem_mib: u64,
    /// Print the timeline as JSON on stdout instead of a table on stderr.
    #[arg(long)]
    json: bool,
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
    /// After the VM ends, write the guest kernel's log (its printk ring buffer, read out of
    /// guest memory; `dmesg`'s format) to this file. Unlike `--console` this costs the guest
    /// nothing per byte, so it does not change the boot it records (see
    /// `cargo xtask bench boot --initcall-debug`).
    #[arg(long, value_name = "FILE")]
    kernel_log: Option<PathBuf>,
    /// The kernel's System.map, for `--kernel-log` [default: System.map beside --kernel].
    #[arg(long, requires = "kernel_log")]
    system_map: Option<PathBuf>,
}

pub fn run(cmd: VmCommand, process_start: Instant) -> Result<ExitCode> {
    match cmd {
        VmCommand::Boot(args) => boot(args, process_start),
        VmCommand::Restore(args) => restore(args, process_start),
    }
}

fn restore(args: RestoreArgs, process_start: Instant) -> Result<ExitCode> {
    use husk_proto::{GuestMessage, HostMessage, Request, RequestId};

    let image = crate::assets::find()?;
    let shape = crate::template::TemplateShape {
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
    };
    let Some((key, snapshot)) = crate::template::for_container(&image, shape) else {
        bail!("no template for {shape:?} (see the message above)");
    };
    let opened = Instant::now();
    let scratch = std::env::temp_dir().join(format!("husk-vm-restore-{}", std::process::id()));
    std::fs::create_dir_all(scratch.join("share"))?;
    let cleanup = scopeguard(&scratch);
    let control_path = scratch.join(format!("vsock.sock_{}", husk_proto::CONTROL_PORT.0));
    let control = std::os::unix::net::UnixListener::bind(&control_path)?;
    let config = crate::template::vm_config(
        &image,
        shape,
        scratch.join("vsock.sock"),
        scratch.join("share"),
        vec![],
        None,
    );
    let vm = vmm::restore(&config, &snapshot, process_start)
        .with_context(|| format!("restoring template {key}"))?;
    let restored = Instant::now();
    let mut conn = crate::template::greet(&vm, &control)?;
    let greeted = Instant::now();
    let request = HostMessage::Request {
        id: RequestId(0),
        request: Request::Prepare(crate::template::prepare_request(vec![
            crate::vmm::spare_net_mac(0),
        ])?),
    };
    husk_proto::write_message(&mut conn, &request)?;
    let reply: Option<GuestMessage> = husk_proto::read_message(&mut conn)?;
    let prepared = Instant::now();
    if !matches!(reply, Some(GuestMessage::Response { result: Ok(_), .. })) {
        bail!("husk-init answered Prepare with {reply:?}");
    }
    vm.stop();
    let (why, timeline) = vm.wait(Some(Duration::from_secs(10)));
    drop(cleanup);
    let ms = |t: Instant| t.duration_since(process_start).as_secs_f64() * 1000.0;
    let mut phases = vec![
        ("template opened".to_owned(), ms(opened)),
        ("VM restored".to_owned(), ms(restored)),
    ];
    if let Some(t) = timeline.first_entry {
        phases.push(("first vCPU entry".into(), ms(t)));
    }
    phases.push(("husk-init greeted".into(), ms(greeted)));
    phases.push(("Prepare answered".into(), ms(prepared)));
    report(&phases, &why, args.json, "husk vm restore");
    Ok(ExitCode::SUCCESS)
}

/// Removes `dir` when dropped.
fn scopeguard(dir: &std::path::Path) -> impl Drop + '_ {
    struct Remove<'a>(&'a std::path::Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    Remove(dir)
}

/// Prints phases (name, ms since the process start) as JSON on stdout or a table on stderr.
fn report(phases: &[(String, f64)], why: &VmExit, json: bool, what: &str) {
    if json {
        let phases: Vec<String> = phases
            .iter()
            .map(|(name, ms)| format!("{{\"phase\":\"{name}\",\"ms\":{ms:.3}}}"))
            .collect();
        println!(
            "{{\"exit\":\"{}\",\"phases\":[{}]}}",
            exit_name(why),
            phases.join(",")
        );
    } else {
        eprintln!("{what}: {}", exit_name(why));
        for (name, ms) in phases {
            eprintln!("  {ms:>10.1} ms  {name}");
        }
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
    // Everything --kernel-log needs from the file system is opened now: the waiting thread
    // confines itself below.
    let kernel_log = match &args.kernel_log {
        Some(path) => Some(open_kernel_log(
            path,
            args.system_map.as_deref(),
            &args.kernel,
        )?),
        None => None,
    };
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
        spare_nets: 0,
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
    vmm::apply_seccomp(config.seccomp, vmm::ThreadKind::VmWait).map_err(anyhow::Error::msg)?;
    let timeout = args.timeout.map(Duration::from_secs);
    let (why, timeline) = match kernel_log {
        None => vm.wait(timeout),
        Some((mut file, prb)) => {
            let (why, timeline, log) =
                vm.wait_then(timeout, |read| vmm::kernel_log::read(read, prb));
            // The log of a VM that failed is still worth having, so a bad log only warns.
            match log {
                Ok(records) => std::io::Write::write_all(
                    &mut file,
                    vmm::kernel_log::format(&records).as_bytes(),
                )
                .context("writing the kernel log")?,
                Err(e) => eprintln!("husk vm boot: reading the guest kernel's log: {e}"),
            }
            (why, timeline)
        }
    };
    report(&timeline.phases(), &why, args.json, "husk vm boot");
    match why {
        VmExit::PowerOff | VmExit::Reset => Ok(ExitCode::SUCCESS),
        VmExit::Stopped => Ok(ExitCode::from(1)),
        VmExit::Error(e) => bail!("the VM failed: {e}"),
    }
}

/// Creates the `--kernel-log` file and finds the kernel's `prb` (the printk ring buffer
/// pointer) in its System.map.
fn open_kernel_log(
    path: &std::path::Path,
    system_map: Option<&std::path::Path>,
    kernel: &std::path::Path,
) -> Result<(std::fs::File, u64)> {
    let map_path = system_map.map_or_else(|| kernel.with_file_name("System.map"), PathBuf::from);
    let map = std::fs::read_to_string(&map_path)
        .with_context(|| format!("reading {} (give --system-map)", map_path.display()))?;
    let prb = vmm::kernel_log::symbol(&map, "prb")
        .with_context(|| format!("{} has no `prb` symbol", map_path.display()))?;
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    Ok((file, prb))
}

fn exit_name(why: &VmExit) -> String {
    match why {
        VmExit::PowerOff => "power-off".into(),
        VmExit::Reset => "reset".into(),
        VmExit::Stopped => "stopped".into(),
        VmExit::Error(e) => format!("error: {}", e.replace('"', "'")),
    }
}
