//! `cargo xtask bench boot`: boot-to-init time of husk's VMM next to QEMU microvm, on the same
//! KVM, with the same vmlinux + initramfs, in one run; plus each VMM's peak RSS.
//!
//! - husk: `husk vm boot --json`; boot-to-init is the `init-started` boot marker (husk-init's
//!   first instruction of `main`), measured from the monitor process's start; the VMM's own
//!   work is the time to the first vCPU entry.
//! - QEMU: `-M microvm` with the serial console (`console=ttyS0 quiet`); boot-to-init is when
//!   husk-init's first console line arrives, measured from spawning QEMU (husk-init writes it a
//!   few syscalls after `main` starts; no marker port exists in QEMU).
//!
//! Both get the same kernel parameters (`kernel-config/cmdline`, plus `cmdline-kvm-pvm` and the
//! CPUID masks on kvm_pvm hosts). Medians of `--runs` boots each.
//!
//! With `--initcall-debug` it answers another question, where husk's guest boot goes
//! (`initcalls`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

use super::{kvm_available, median, which};

/// Options of `bench boot`.
#[derive(Debug, clap::Args)]
pub struct BootBenchArgs {
    /// Boots per VMM.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Directory with vmlinux and initramfs.cpio [default: target/husk-image]
    #[arg(long)]
    image: Option<PathBuf>,
    /// Also boot QEMU with TCG (software emulation).
    #[arg(long, conflicts_with = "initcall_debug")]
    tcg: bool,
    /// Instead of comparing VMMs, show where husk's guest boot goes: boot with
    /// `initcall_debug printk.time=1` (and once without, for reference), read the guest
    /// kernel's log out of its memory and print the phases, the slowest initcalls, the largest
    /// gaps between kernel messages and the initramfs unpacking, in ms (medians of --runs).
    #[arg(long)]
    initcall_debug: bool,
    /// Extra guest kernel parameters for the --initcall-debug boots, e.g. to measure what
    /// `initramfs_async=0` or `rodata=off` changes.
    #[arg(long, requires = "initcall_debug", allow_hyphen_values = true)]
    cmdline: Option<String>,
}

/// One boot's numbers.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    /// Start to init, ms.
    pub(super) to_init: f64,
    /// Start to first vCPU entry (husk only), ms.
    to_entry: Option<f64>,
    /// Start to exit, ms.
    total: f64,
    /// Peak RSS, KiB.
    pub(super) rss_kib: i64,
}

/// Runs the benchmark.
pub fn run(args: &BootBenchArgs) -> Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    let root = crate::workspace::root();
    let (vmlinux, initrd) = super::guest_image(args.image.as_deref())?;
    ensure!(
        kvm_available(),
        "/dev/kvm is not available: the boot benchmark compares VMMs on KVM"
    );
    let kvm_pvm = is_kvm_pvm();
    let cmdline = guest_cmdline(&root, kvm_pvm)?;

    println!("building husk (release)");
    let husk = super::build_husk(&root)?;
    if args.initcall_debug {
        return super::initcalls::run(
            args.runs,
            &husk,
            &vmlinux,
            &initrd,
            args.cmdline.as_deref().unwrap_or(""),
        );
    }

    println!(
        "host: {}; {} runs each; image {}",
        if kvm_pvm {
            "kvm_pvm (nested, emulated guest kernel mode)"
        } else {
            "KVM"
        },
        args.runs,
        vmlinux.parent().unwrap_or(Path::new("")).display()
    );
    let mut results: Vec<(&str, Vec<Sample>)> = Vec::new();
    let mut husk_samples = Vec::new();
    let mut qemu_samples = Vec::new();
    let mut tcg_samples = Vec::new();
    for run in 1..=args.runs {
        let s = husk_boot(&husk, &vmlinux, &initrd)?;
        println!(
            "  run {run}: husk       init at {:>9.1} ms, rss {:>6} KiB",
            s.to_init, s.rss_kib
        );
        husk_samples.push(s);
        let cpu = qemu_kvm_cpu(kvm_pvm);
        let s = qemu_boot("kvm", cpu, &vmlinux, &initrd, &cmdline)?;
        println!(
            "  run {run}: qemu (kvm) init at {:>9.1} ms, rss {:>6} KiB",
            s.to_init, s.rss_kib
        );
        qemu_samples.push(s);
        if args.tcg {
            let tcg_cmdline = format!("{cmdline} tsc_early_khz=2000000 lpj=4000000");
            let s = qemu_boot("tcg", "max", &vmlinux, &initrd, &tcg_cmdline)?;
            println!(
                "  run {run}: qemu (tcg) init at {:>9.1} ms, rss {:>6} KiB",
                s.to_init, s.rss_kib
            );
            tcg_samples.push(s);
        }
    }
    results.push(("husk (KVM)", husk_samples));
    results.push(("QEMU microvm (KVM)", qemu_samples));
    if args.tcg {
        results.push(("QEMU microvm (TCG)", tcg_samples));
    }

    println!();
    println!(
        "{:<20} {:>14} {:>16} {:>14} {:>14}",
        "VMM", "to init (ms)", "to 1st entry (ms)", "total (ms)", "peak RSS (KiB)"
    );
    let mut medians = Vec::new();
    for (name, samples) in &results {
        let to_init = median(samples.iter().map(|s| s.to_init));
        let entry = samples
            .iter()
            .filter_map(|s| s.to_entry)
            .collect::<Vec<_>>();
        let entry = if entry.is_empty() {
            "-".to_string()
        } else {
            format!("{:.1}", median(entry.into_iter()))
        };
        let total = median(samples.iter().map(|s| s.total));
        let rss = median(samples.iter().map(|s| s.rss_kib as f64));
        println!("{name:<20} {to_init:>14.1} {entry:>16} {total:>14.1} {rss:>14.0}");
        medians.push((to_init, rss));
    }
    let (husk_init, husk_rss) = medians[0];
    let (qemu_init, qemu_rss) = medians[1];

    // The VMM's own work before the guest runs: exec to the first KVM_RUN, both VMMs traced
    // the same way (strace's overhead inflates both).
    let mut startup: Vec<(&str, Vec<f64>)> = vec![("husk", vec![]), ("QEMU microvm", vec![])];
    if which("strace") {
        let cpu = qemu_kvm_cpu(kvm_pvm);
        for _ in 0..args.runs {
            let mut h = vec![husk.as_os_str().to_owned()];
            h.extend(["vm", "boot", "--kernel"].map(Into::into));
            h.push(vmlinux.as_os_str().to_owned());
            h.push("--initrd".into());
            h.push(initrd.as_os_str().to_owned());
            startup[0].1.push(first_kvm_run_ms(&h)?);
            let mut q: Vec<std::ffi::OsString> = qemu_args("kvm", cpu, &vmlinux, &initrd, &cmdline)
                .into_iter()
                .collect();
            q.insert(0, "qemu-system-x86_64".into());
            startup[1].1.push(first_kvm_run_ms(&q)?);
        }
    }
    println!();
    println!(
        "husk / QEMU (KVM): boot-to-init {:.3}x, peak RSS {:.3}x",
        husk_init / qemu_init,
        husk_rss / qemu_rss
    );
    if startup[0].1.is_empty() {
        println!("(install strace to compare the VMMs' own startup: exec to first KVM_RUN)");
    } else {
        let h = median(startup[0].1.iter().copied());
        let q = median(startup[1].1.iter().copied());
        println!(
            "VMM startup, exec to first KVM_RUN under strace (median of {}): husk {h:.1} ms, QEMU {q:.1} ms, ratio {:.3}x",
            args.runs,
            h / q
        );
    }
    Ok(())
}

/// Whether /dev/kvm is nested page-table-based virtualization (kvm_pvm).
pub(super) fn is_kvm_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The kernel parameters every guest gets (`kernel-config/cmdline`), plus the kvm_pvm ones on
/// kvm_pvm hosts: what husk's VMM passes, so QEMU boots the guest the same way.
pub(super) fn guest_cmdline(root: &Path, kvm_pvm: bool) -> Result<String> {
    let params = |file: &str| -> Result<String> {
        let p = root.join("kernel-config").join(file);
        Ok(std::fs::read_to_string(&p)
            .with_context(|| format!("reading {}", p.display()))?
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "))
    };
    let mut cmdline = params("cmdline")?;
    if kvm_pvm {
        cmdline = format!("{cmdline} {}", params("cmdline-kvm-pvm")?);
    }
    Ok(cmdline)
}

/// QEMU's `-cpu` for KVM: the host's, less what kvm_pvm cannot emulate (husk's VMM masks the
/// same CPUID bits there) and the IA32_ARCH_CAPABILITIES MSR, whose write kvm_pvm refuses.
pub(super) fn qemu_kvm_cpu(kvm_pvm: bool) -> &'static str {
    if kvm_pvm {
        "host,-cx16,-popcnt,-arch-capabilities"
    } else {
        "host"
    }
}

/// Runs `cmd` under `strace -f`, returns the time from its execve to its first KVM_RUN, and
/// kills it there.
fn first_kvm_run_ms(cmd: &[std::ffi::OsString]) -> Result<f64> {
    let trace = std::env::temp_dir().join(format!("husk-bench-strace-{}", std::process::id()));
    let _ = std::fs::remove_file(&trace);
    let mut child = Command::new("strace")
        .args(["-f", "-ttt", "-e", "trace=execve,ioctl", "-o"])
        .arg(&trace)
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("running strace")?;
    let start = Instant::now();
    let result = loop {
        let text = std::fs::read_to_string(&trace).unwrap_or_default();
        let mut exec_at = None;
        let mut found = None;
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (Some(pid), Some(ts)) = (f.next(), f.next()) else {
                continue;
            };
            let Ok(ts) = ts.parse::<f64>() else { continue };
            if exec_at.is_none() && line.contains("execve(") {
                exec_at = Some(ts);
            }
            if line.contains("KVM_RUN") && !line.contains("resumed") {
                found = Some((pid.to_string(), ts));
                break;
            }
        }
        if let (Some(e), Some((_, t))) = (exec_at, &found) {
            break Ok((t - e) * 1000.0);
        }
        if start.elapsed() > std::time::Duration::from_secs(30) {
            break Err(anyhow::anyhow!("no KVM_RUN within 30 s"));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Kill the traced VMM (its pid is the first thing on each trace line), then strace ends.
    if let Ok(text) = std::fs::read_to_string(&trace)
        && let Some(pid) = text
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) on a pid we started (through strace); no memory is involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&trace);
    result
}

/// Waits for `pid`, returning its exit status and peak RSS (KiB).
fn wait_rusage(child: &mut std::process::Child) -> Result<(i32, i64)> {
    let pid = libc::pid_t::try_from(child.id()).context("pid")?;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in; pid is our own unreaped child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals; waits only for our child.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    ensure!(r == pid, "wait4: {}", std::io::Error::last_os_error());
    Ok((status, usage.ru_maxrss))
}

fn husk_boot(husk: &Path, vmlinux: &Path, initrd: &Path) -> Result<Sample> {
    let start = Instant::now();
    let mut child = Command::new(husk)
        .args(["vm", "boot", "--json", "--timeout", "600", "--kernel"])
        .arg(vmlinux)
        .arg("--initrd")
        .arg(initrd)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("running {}", husk.display()))?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().context("stdout")?, &mut out)?;
    let (status, rss) = wait_rusage(&mut child)?;
    let total = start.elapsed().as_secs_f64() * 1000.0;
    ensure!(status == 0, "husk vm boot failed (status {status}): {out}");
    let phase = |name: &str| -> Option<f64> {
        let key = format!("\"phase\":\"{name}\",\"ms\":");
        let at = out.find(&key)? + key.len();
        out[at..].split([',', '}']).next()?.parse().ok()
    };
    let Some(to_init) = phase("marker init-started") else {
        bail!("husk vm boot reported no init-started marker: {out}");
    };
    Ok(Sample {
        to_init,
        to_entry: phase("first vCPU entry"),
        total,
        rss_kib: rss,
    })
}

/// QEMU microvm's arguments for booting the image with the serial console on stdio.
fn qemu_args(
    accel: &str,
    cpu: &str,
    vmlinux: &Path,
    initrd: &Path,
    cmdline: &str,
) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = [
        "-M",
        "microvm,rtc=off,isa-serial=on",
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-device",
        "i8042",
        "-serial",
        "stdio",
        "-kernel",
    ]
    .map(Into::into)
    .into();
    a.push(vmlinux.as_os_str().to_owned());
    a.push("-initrd".into());
    a.push(initrd.as_os_str().to_owned());
    a.push("-append".into());
    a.push(format!("{cmdline} console=ttyS0 quiet").into());
    a
}

/// Boots the image in QEMU microvm once: to init is from spawning QEMU to husk-init's first
/// console line.
pub(super) fn qemu_boot(
    accel: &str,
    cpu: &str,
    vmlinux: &Path,
    initrd: &Path,
    cmdline: &str,
) -> Result<Sample> {
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(qemu_args(accel, cpu, vmlinux, initrd, cmdline))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running qemu-system-x86_64 (apt-get install -y qemu-system-x86)")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut to_init = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if to_init.is_none() && line.contains("husk-init:") {
            to_init = Some(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let (status, rss) = wait_rusage(&mut child)?;
    let total = start.elapsed().as_secs_f64() * 1000.0;
    ensure!(status == 0, "qemu ({accel}) exited with status {status}");
    let to_init = to_init.with_context(|| format!("qemu ({accel}): husk-init never printed"))?;
    Ok(Sample {
        to_init,
        to_entry: None,
        total,
        rss_kib: rss,
    })
}
