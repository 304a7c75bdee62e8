//! `cargo xtask bench fs`: what the virtio-fs share costs on the startup path. A static probe
//! (`xtask/assets/fsprobe.c`) times the first (cold) and a second (warm) exec of a 1 MiB static
//! binary and a sequential read of a 64 MiB file; it runs once inside a husk container, where
//! the files come through the share, and once on the host against the same files. The page
//! cache is dropped before each cold run.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

use super::median;

/// Options of `bench fs`.
#[derive(Debug, clap::Args)]
pub struct FsBenchArgs {
    /// Runs of each (a VM boot per run in the container).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn gcc_static(src: &Path, out: &Path) -> Result<()> {
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(out)
        .arg(src)
        .status()
        .context("running gcc (apt-get install -y gcc libc6-dev)")?;
    ensure!(status.success(), "compiling {} failed", src.display());
    Ok(())
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Parses `key=value` lines.
fn values(out: &str) -> Vec<(String, f64)> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| Some((k.trim().to_string(), v.trim().parse().ok()?)))
        .collect()
}

fn get(vals: &[(String, f64)], key: &str) -> Result<f64> {
    vals.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .with_context(|| format!("fsprobe printed no {key}"))
}

/// Runs the benchmark.
pub fn run(args: &FsBenchArgs) -> Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    let root = crate::workspace::root();
    let work = std::env::temp_dir().join(format!("husk-bench-fs-{}", std::process::id()));
    let bundle = work.join("bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    gcc_static(
        &root.join("xtask/assets/fsprobe.c"),
        &rootfs.join("fsprobe"),
    )?;
    gcc_static(&root.join("xtask/assets/big.c"), &rootfs.join("big"))?;
    let data: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(rootfs.join("data"), &data)?;
    std::fs::write(
        bundle.join("config.json"),
        r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
            "process":{"args":["/fsprobe"],"cwd":"/","user":{"uid":0,"gid":0},"env":["PATH=/"]},
            "linux":{"namespaces":[{"type":"pid"},{"type":"mount"}]}}"#,
    )?;
    let big_size = std::fs::metadata(rootfs.join("big"))?.len();
    println!("building husk (release)");
    let husk = super::build_husk(&root)?;
    let state = work.join("state");

    let mut vm = Vec::new();
    let mut host = Vec::new();
    for run in 1..=args.runs {
        drop_caches();
        let out = Command::new(&husk)
            .arg("--root")
            .arg(&state)
            .args(["run", &format!("fsbench{run}"), "--bundle"])
            .arg(&bundle)
            .stdin(Stdio::null())
            .output()
            .context("running husk")?;
        if !out.status.success() {
            bail!(
                "husk run failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v = values(&String::from_utf8_lossy(&out.stdout));
        println!(
            "  run {run}: VM   exec cold {:>9.2} ms, warm {:>9.2} ms, read {:>8.1} MB/s",
            get(&v, "exec_first_ms")?,
            get(&v, "exec_warm_ms")?,
            get(&v, "read_mb_s")?
        );
        vm.push(v);
        drop_caches();
        let out = Command::new(rootfs.join("fsprobe"))
            .arg(&rootfs)
            .output()
            .context("running fsprobe on the host")?;
        ensure!(out.status.success(), "fsprobe failed on the host");
        let v = values(&String::from_utf8_lossy(&out.stdout));
        println!(
            "  run {run}: host exec cold {:>9.2} ms, warm {:>9.2} ms, read {:>8.1} MB/s",
            get(&v, "exec_first_ms")?,
            get(&v, "exec_warm_ms")?,
            get(&v, "read_mb_s")?
        );
        host.push(v);
    }
    let med = |samples: &[Vec<(String, f64)>], key: &str| -> Result<f64> {
        let vals: Result<Vec<f64>> = samples.iter().map(|s| get(s, key)).collect();
        Ok(median(vals?.into_iter()))
    };
    println!();
    println!(
        "medians of {} runs; the binary is {big_size} bytes, the file 64 MiB",
        args.runs
    );
    println!(
        "{:<28} {:>14} {:>14} {:>10}",
        "", "VM (virtio-fs)", "host", "VM/host"
    );
    for (name, key) in [
        ("first exec of the binary (ms)", "exec_first_ms"),
        ("second exec (ms)", "exec_warm_ms"),
        ("sequential read (MB/s)", "read_mb_s"),
    ] {
        let (a, b) = (med(&vm, key)?, med(&host, key)?);
        println!("{name:<28} {a:>14.2} {b:>14.2} {:>10.2}", a / b);
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
