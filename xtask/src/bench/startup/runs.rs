//! One timed run of each runtime the benchmark compares: `husk run` (wall time and the
//! phases it recorded) and `runc run` / `crun run` (wall time), each spawn to exit.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, ensure};

use super::phases::parse_phases;

/// One `husk FLAGS run` with `env`: wall time (ms) and the phases it recorded, as ms since
/// `cli-start` (each of `chain` must be there).
#[allow(clippy::too_many_arguments)] // One call site, in a closure that names them all.
pub(super) fn husk_run(
    husk: &Path,
    flags: &[String],
    env: &[(&str, &std::ffi::OsStr)],
    root: &Path,
    bundle: &Path,
    id: &str,
    phases_file: &Path,
    chain: &[&str],
) -> Result<(f64, HashMap<String, f64>)> {
    let _ = std::fs::remove_file(phases_file);
    let start = Instant::now();
    let out = Command::new(husk)
        .envs(env.iter().copied())
        .args(flags)
        .arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .env("HUSK_PHASES", phases_file)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", husk.display()))?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    ensure!(
        out.status.success(),
        "husk run failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = std::fs::read_to_string(phases_file)
        .with_context(|| format!("husk recorded no phases in {}", phases_file.display()))?;
    Ok((ms, parse_phases(&text, chain)?))
}

/// One `runc run` / `crun run`: wall time, ms.
pub(super) fn oci_run(runtime: &str, root: &Path, bundle: &Path, id: &str) -> Result<f64> {
    let start = Instant::now();
    let out = Command::new(runtime)
        .arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {runtime}"))?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    ensure!(
        out.status.success(),
        "{runtime} run failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(ms)
}
