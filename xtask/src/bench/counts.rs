//! `cargo xtask bench counts`: how many system calls and page faults a container's life costs
//! husk-init, per phase, next to what `runc` and `crun` make for the same container on the host.
//!
//! On kvm_pvm hosts every guest system call costs ~270 µs and every guest page fault ~3 ms,
//! so these counts, which do not depend on the machine's speed, are what the guest's share of
//! a start is made of (issue 21). They are counted where counting is exact and cheap:
//!
//! - husk-init runs as a host process building the same container it builds in the VM (the
//!   ignored test `counts_per_phase` in `guest-init/tests/counts.rs`, in release): system
//!   calls from `strace -f -ttt` (every process it starts included), split at the protocol's
//!   phase boundaries; page faults from `/proc/PID/stat` in a run without strace. What the
//!   guest kernel adds around them (virtio-fs round trips, its own faults) is not counted.
//! - `runc run` / `crun run` of a busybox `true` bundle (`runc spec`'s defaults), and `runc
//!   exec` / `crun exec` of `true` in a running container: system calls from `strace -f -c`,
//!   page faults from `wait4`'s rusage (the runtime and the processes it reaped) in a run
//!   without strace.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use super::{Scratch, make_bundle};

#[derive(Debug, clap::Args)]
pub struct CountsBenchArgs {
    /// Where to write counts.json (default: target/bench/counts).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The system calls and page faults of one measured step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    syscalls: u64,
    minor_faults: u64,
    major_faults: u64,
}

impl std::ops::Add for Counts {
    type Output = Counts;
    fn add(self, o: Counts) -> Counts {
        Counts {
            syscalls: self.syscalls + o.syscalls,
            minor_faults: self.minor_faults + o.minor_faults,
            major_faults: self.major_faults + o.major_faults,
        }
    }
}

pub fn run(args: &CountsBenchArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "bench counts needs root (husk-init builds containers, runc and crun run them)"
    );
    for tool in ["strace", "runc", "crun"] {
        ensure!(super::which(tool), "bench counts needs {tool} on PATH");
    }
    super::check_tools()?;
    let root = crate::workspace::root();
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench/counts"));
    std::fs::create_dir_all(&out_dir)?;
    let work = Scratch::new(
        &std::env::temp_dir().join(format!("husk-bench-counts-{}", std::process::id())),
    )?;

    println!(
        "husk-init (as a host process, release build): a container running `true`, an exec of `true`"
    );
    let husk_init = husk_init_counts(&root, work.path())?;
    let mut runtimes = Vec::new();
    for runtime in ["runc", "crun"] {
        println!("{runtime}: run of a container running `true`, exec of `true` in a running one");
        runtimes.push((runtime, runtime_counts(runtime, work.path())?));
    }

    let phase = |name: &str| {
        husk_init
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| *c)
            .unwrap_or_default()
    };
    println!(
        "\nsystem calls and page faults (minor/major) per phase; husk-init's are of its code on the host"
    );
    println!("{:<44} {:>9} {:>13}", "step", "syscalls", "faults");
    let row = |what: &str, c: Counts| {
        println!(
            "{what:<44} {:>9} {:>9}/{:<3}",
            c.syscalls, c.minor_faults, c.major_faults
        );
    };
    for (name, c) in &husk_init {
        row(&format!("husk-init {name}"), *c);
    }
    let husk_run = phase("create") + phase("start") + phase("run");
    row("husk-init create + start + run (total)", husk_run);
    for (runtime, (run, exec)) in &runtimes {
        row(&format!("{runtime} run"), *run);
        row(&format!("{runtime} exec"), *exec);
    }
    println!();
    for (runtime, (run, exec)) in &runtimes {
        println!(
            "husk-init / {runtime}: a container's run {:.2}x the system calls, {:.2}x the minor faults; an exec {:.2}x, {:.2}x",
            ratio(husk_run.syscalls, run.syscalls),
            ratio(husk_run.minor_faults, run.minor_faults),
            ratio(phase("exec").syscalls, exec.syscalls),
            ratio(phase("exec").minor_faults, exec.minor_faults),
        );
    }

    let counts_json = |c: &Counts| json!({"syscalls": c.syscalls, "minor_faults": c.minor_faults, "major_faults": c.major_faults});
    let report = json!({
        "husk-init": husk_init.iter().map(|(n, c)| json!({"phase": n, "counts": counts_json(c)})).collect::<Vec<_>>(),
        "runtimes": runtimes.iter().map(|(r, (run, exec))| json!({
            "runtime": r, "run": counts_json(run), "exec": counts_json(exec),
        })).collect::<Vec<_>>(),
    });
    let file = out_dir.join("counts.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", file.display());
    Ok(())
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        f64::NAN
    } else {
        a as f64 / b as f64
    }
}

/// husk-init's counts per phase, from the ignored test that measures them.
fn husk_init_counts(root: &Path, work: &Path) -> Result<Vec<(String, Counts)>> {
    let out = work.join("husk-init.json");
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "test",
            "-q",
            "--release",
            "-p",
            "husk-init",
            "--test",
            "counts",
            "--",
            "--ignored",
            "--exact",
            "counts_per_phase",
        ])
        .env("HUSK_COUNTS_OUT", &out)
        .stdout(Stdio::null())
        .status()
        .context("running husk-init's counting test")?;
    ensure!(
        status.success(),
        "husk-init's counting test failed ({status})"
    );
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?,
    )?;
    let phases = report["husk-init"]
        .as_array()
        .context("no husk-init phases in the counting test's report")?;
    phases
        .iter()
        .map(|p| {
            let n = |k: &str| p[k].as_u64().with_context(|| format!("{k} in {p}"));
            Ok((
                p["phase"].as_str().context("phase name")?.to_string(),
                Counts {
                    syscalls: n("syscalls")?,
                    minor_faults: n("minor_faults")?,
                    major_faults: n("major_faults")?,
                },
            ))
        })
        .collect()
}

/// `runtime run` of `true`, and `runtime exec` of `true` in a running container.
fn runtime_counts(runtime: &str, work: &Path) -> Result<(Counts, Counts)> {
    let dir = work.join(runtime);
    let state = dir.join("state");
    let true_bundle = make_bundle(&dir.join("true"), &["/bin/true"], None)?;
    let rootfs = true_bundle.join("rootfs");
    let idle_bundle = make_bundle(&dir.join("idle"), &["/bin/sleep", "1000"], Some(&rootfs))?;
    let base = |args: &[&str]| {
        let mut cmd = vec![
            runtime.to_string(),
            "--root".into(),
            state.display().to_string(),
        ];
        cmd.extend(args.iter().map(|a| a.to_string()));
        cmd
    };
    let run = |id: &str| base(&["run", "--bundle", &true_bundle.display().to_string(), id]);
    let run_counts = Counts {
        syscalls: strace_calls(&run("counted-run-traced"), &dir.join("run.strace"))?,
        ..faults(&run("counted-run"))?
    };
    // A running container to exec in.
    let idle = "counted-idle";
    run_ok(&base(&[
        "run",
        "--detach",
        "--bundle",
        &idle_bundle.display().to_string(),
        idle,
    ]))?;
    let exec = base(&["exec", idle, "/bin/true"]);
    let exec_counts = (|| {
        Ok::<_, anyhow::Error>(Counts {
            syscalls: strace_calls(&exec, &dir.join("exec.strace"))?,
            ..faults(&exec)?
        })
    })();
    let _ = run_ok(&base(&["delete", "--force", idle]));
    Ok((run_counts, exec_counts?))
}

/// Runs `cmd`, which must succeed. Its output goes to a file, not a pipe: a detached
/// container inherits the runtime's stdio and would hold a pipe open for as long as it runs.
fn run_ok(cmd: &[String]) -> Result<()> {
    let log = std::env::temp_dir().join(format!("husk-bench-counts-{}.log", std::process::id()));
    let file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let status = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("running {}", cmd[0]));
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let status = status?;
    ensure!(
        status.success(),
        "{} failed ({status}): {}",
        cmd.join(" "),
        output.trim()
    );
    Ok(())
}

/// The system calls `cmd` and every process it starts make: `strace -f -c`'s total.
fn strace_calls(cmd: &[String], summary: &Path) -> Result<u64> {
    let mut traced = vec!["strace".to_string(), "-f".into(), "-c".into(), "-o".into()];
    traced.push(summary.display().to_string());
    traced.extend(cmd.iter().cloned());
    run_ok(&traced)?;
    let text = std::fs::read_to_string(summary)?;
    total_calls(&text).with_context(|| format!("no total in strace's summary:\n{text}"))
}

/// The calls column of the `total` line of `strace -c`'s summary.
fn total_calls(summary: &str) -> Option<u64> {
    let total = summary.lines().find(|l| l.trim_end().ends_with("total"))?;
    // % time, seconds, usecs/call, calls, [errors,] "total"
    total.split_whitespace().nth(3)?.parse().ok()
}

/// The page faults of `cmd` and of the processes it reaped (`wait4`'s rusage).
fn faults(cmd: &[String]) -> Result<Counts> {
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", cmd[0]))?;
    let pid = libc::pid_t::try_from(child.id()).context("pid")?;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals; waits only for our own unreaped child.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        let _ = child.kill();
        bail!("wait4 {}: {}", cmd[0], std::io::Error::last_os_error());
    }
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{} failed (wait status {status})",
        cmd.join(" ")
    );
    Ok(Counts {
        syscalls: 0,
        minor_faults: u64::try_from(usage.ru_minflt).unwrap_or(0),
        major_faults: u64::try_from(usage.ru_majflt).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_of_strace_summaries_is_read_with_or_without_errors() {
        let with_errors = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 40.00    0.000400          10        40         2 openat
------ ----------- ----------- --------- --------- ----------------
100.00    0.001000           0      3162       123 total
";
        assert_eq!(total_calls(with_errors), Some(3162));
        let without = "100.00    0.001000           0       984           total\n";
        assert_eq!(total_calls(without), Some(984));
        assert_eq!(total_calls("nothing"), None);
    }
}
