//! `cargo xtask bench ...`: benchmarks that print numbers, each next to a reference measured
//! on the same machine in the same run.

pub mod boot;
pub mod counts;
pub mod fs;
mod initcalls;
pub mod pod;
pub mod podman;
pub mod startup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

/// Builds the husk binary (release) and returns its path.
pub fn build_husk(root: &Path) -> Result<std::path::PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release", "--quiet", "--package", "husk"])
        .status()
        .context("running cargo")?;
    ensure!(status.success(), "building husk failed");
    Ok(root.join("target/release/husk"))
}

/// The guest image the benchmarks boot: `(vmlinux, initramfs)` in `dir` (default
/// `target/husk-image`), both checked to exist.
pub fn guest_image(dir: Option<&Path>) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let dir = dir.map_or_else(
        || crate::workspace::root().join("target/husk-image"),
        Path::to_path_buf,
    );
    let vmlinux = dir.join("vmlinux");
    let initrd = dir.join("initramfs.cpio");
    for f in [&vmlinux, &initrd] {
        ensure!(
            f.is_file(),
            "{} missing: run `cargo xtask build-image` first",
            f.display()
        );
    }
    Ok((vmlinux, initrd))
}

/// The median of some values (NaN for none).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Whether `program` is on the `PATH`.
fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// Whether this process may use `/dev/kvm` (every benchmark that boots compares on KVM).
fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// min / median / p90 of some milliseconds.
#[derive(Debug, Clone, Copy)]
struct Stats {
    min: f64,
    median: f64,
    p90: f64,
}

impl Stats {
    fn of(values: &[f64]) -> Stats {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Stats {
                min: f64::NAN,
                median: f64::NAN,
                p90: f64::NAN,
            };
        }
        // Nearest rank: the smallest value with at least 90 % of the values at or below it.
        let rank = (9 * n).div_ceil(10);
        Stats {
            min: v[0],
            median: median(v.iter().copied()),
            p90: v[rank.clamp(1, n) - 1],
        }
    }

    fn json(&self) -> Value {
        json!({"min_ms": round(self.min), "median_ms": round(self.median), "p90_ms": round(self.p90)})
    }
}

fn round(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// Fails with the install command for whatever the benchmark needs and is missing.
fn check_tools() -> Result<()> {
    ensure!(
        kvm_available(),
        "/dev/kvm is not available: husk and QEMU are compared on KVM"
    );
    let mut missing = Vec::new();
    for (tool, package) in [
        ("runc", "runc"),
        ("crun", "crun"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ] {
        if !which(tool) {
            missing.push(package);
        }
    }
    match std::fs::read("/bin/busybox") {
        // A dynamic busybox cannot run in a rootfs without its libraries.
        Ok(b) if !b.windows(7).any(|w| w == b"ld-linux") => {}
        _ => missing.push("busybox-static"),
    }
    if !missing.is_empty() {
        bail!(
            "missing tools: apt-get install -y {} (or run scripts/setup.sh)",
            missing.join(" ")
        );
    }
    // crun 1.8 refuses a hybrid cgroup v1 host unless the hugetlb hierarchy is mounted.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = |p: &str| mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(p));
    if mounted("/sys/fs/cgroup/unified") && !mounted("/sys/fs/cgroup/hugetlb") {
        bail!(
            "crun needs the cgroup v1 hugetlb hierarchy on this hybrid host: mkdir -p /sys/fs/cgroup/hugetlb && mount -t cgroup -o hugetlb hugetlb /sys/fs/cgroup/hugetlb"
        );
    }
    Ok(())
}

/// A scratch directory removed at the end, even on errors.
struct Scratch(PathBuf);

impl Scratch {
    /// The directory.
    fn path(&self) -> &Path {
        &self.0
    }

    fn new(path: &Path) -> Result<Scratch> {
        let _ = std::fs::remove_dir_all(path);
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Scratch(path.to_path_buf()))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An OCI bundle in `dir`: `runc spec`'s config.json running `args`, with a busybox-static
/// rootfs (or the rootfs at `rootfs`, by absolute path).
fn make_bundle(dir: &Path, args: &[&str], rootfs: Option<&Path>) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let rootfs = match rootfs {
        Some(r) => r.to_path_buf(),
        None => {
            let r = dir.join("rootfs");
            for d in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
                std::fs::create_dir_all(r.join(d))?;
            }
            std::fs::copy("/bin/busybox", r.join("bin/busybox")).context("copying busybox")?;
            for applet in ["sh", "true", "sleep"] {
                std::os::unix::fs::symlink("busybox", r.join("bin").join(applet))?;
            }
            r
        }
    };
    let status = Command::new("runc")
        .arg("spec")
        .current_dir(dir)
        .status()
        .context("running runc spec")?;
    ensure!(status.success(), "runc spec failed");
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    config["process"]["terminal"] = json!(false);
    config["process"]["args"] = json!(args);
    config["root"]["path"] = json!(rootfs);
    std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
    Ok(dir.to_path_buf())
}
