//! `cargo xtask bench ...`: benchmarks that print numbers, each next to a reference measured
//! on the same machine in the same run.

pub mod boot;
pub mod fs;
pub mod podman;
pub mod startup;

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};

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
        || crate::workspace_root().join("target/husk-image"),
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
