//! `cargo xtask fuzz`: runs each cargo-fuzz target in `fuzz/` for a while, one after the other,
//! and reports executions and crashes per target.
//!
//! The targets are built once (`cargo +nightly fuzz build`: optimised, with ASan, overflow
//! checks and debug assertions) and their binaries run directly, one process on one core
//! each. Each target starts from its checked-in corpus (`fuzz/corpus/<target>/`, read only)
//! and writes what it discovers to `fuzz/target/corpus/<target>/` (kept between runs, not
//! checked in). libFuzzer's output goes to `fuzz/target/fuzz-logs/<target>.log`; the summary
//! comes from its final statistics. A crash, leak, timeout (an input running over 10 s) or
//! out-of-memory fails the run with the path of the input that caused it, under
//! `fuzz/artifacts/<target>/`: replay it with `cargo +nightly fuzz run -a <target> <path>` in
//! `fuzz/`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;

/// `cargo xtask fuzz` arguments.
#[derive(Debug, Args)]
pub struct FuzzArgs {
    /// How long to run each target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run only this target (repeatable); default: every target `cargo fuzz list` names.
    #[arg(long = "target")]
    targets: Vec<String>,
}

/// What one target's run did.
#[derive(Debug, Default, PartialEq)]
struct Outcome {
    executions: Option<u64>,
    execs_per_sec: Option<u64>,
    new_units: Option<u64>,
    peak_rss_mb: Option<u64>,
    /// The input libFuzzer saved because it crashed, leaked, timed out or ran out of memory.
    artifact: Option<String>,
    /// The first line of the report (`ERROR: AddressSanitizer: ...`, `deadly signal`, ...).
    failure: Option<String>,
}

/// Runs the targets; fails if any crashed.
pub fn run(args: &FuzzArgs) -> Result<()> {
    let fuzz_dir = crate::workspace::root().join("fuzz");
    check_tools(&fuzz_dir)?;
    let targets = if args.targets.is_empty() {
        list_targets(&fuzz_dir)?
    } else {
        args.targets.clone()
    };
    ensure!(
        !targets.is_empty(),
        "no fuzz targets in {}",
        fuzz_dir.display()
    );

    println!("== building {} fuzz targets", targets.len());
    // Overflow checks and debug assertions on: an arithmetic overflow on guest input is a bug
    // even where release builds would wrap silently.
    let status = cargo_fuzz(&fuzz_dir)
        .args(["build", "--debug-assertions"])
        .status()
        .context("running cargo fuzz build")?;
    ensure!(status.success(), "cargo fuzz build failed");

    let logs = fuzz_dir.join("target/fuzz-logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut failed = Vec::new();
    println!(
        "{:<16} {:>12} {:>10} {:>6} {:>8}  result",
        "target", "executions", "exec/s", "new", "rss MiB"
    );
    for target in &targets {
        let outcome = run_target(&fuzz_dir, &logs, target, args.seconds)?;
        let show = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
        let result = match (&outcome.failure, &outcome.artifact) {
            (None, None) => "0 crashes".to_owned(),
            (failure, artifact) => {
                failed.push(target.clone());
                format!(
                    "CRASH: {} (input: {})",
                    failure.as_deref().unwrap_or("libFuzzer failed"),
                    artifact.as_deref().unwrap_or("none saved")
                )
            }
        };
        println!(
            "{target:<16} {:>12} {:>10} {:>6} {:>8}  {result}",
            show(outcome.executions),
            show(outcome.execs_per_sec),
            show(outcome.new_units),
            show(outcome.peak_rss_mb),
        );
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (logs in {})",
            failed.join(", "),
            logs.display()
        );
    }
    Ok(())
}

fn cargo_fuzz(fuzz_dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    // The toolchain is chosen by the rustup proxy: `cargo +nightly`, whatever cargo runs xtask.
    cmd.current_dir(fuzz_dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .args(["+nightly", "fuzz"]);
    cmd
}

fn check_tools(fuzz_dir: &Path) -> Result<()> {
    let ok = cargo_fuzz(fuzz_dir)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ensure!(
        ok,
        "`cargo +nightly fuzz` does not run: install with \
         `rustup toolchain install nightly --profile minimal && cargo install cargo-fuzz --locked` \
         (./scripts/test.sh does both)"
    );
    Ok(())
}

fn list_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let out = cargo_fuzz(fuzz_dir)
        .arg("list")
        .output()
        .context("running cargo fuzz list")?;
    ensure!(out.status.success(), "cargo fuzz list failed");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The binary `cargo fuzz build` made for `target` (under `fuzz/target/<triple>/release/`).
fn target_binary(fuzz_dir: &Path, target: &str) -> Result<PathBuf> {
    let build_dir = fuzz_dir.join("target");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&build_dir)
        .with_context(|| format!("reading {}", build_dir.display()))?
        .filter_map(|entry| Some(entry.ok()?.path().join("release").join(target)))
        .filter(|path| path.is_file())
        .collect();
    // The newest, should several target triples have been built.
    found.sort_by_key(|path| path.metadata().and_then(|m| m.modified()).ok());
    found
        .pop()
        .with_context(|| format!("cargo fuzz build made no binary for {target}"))
}

/// Runs the built binary of `target` directly (no rebuild check between targets), with the
/// options `cargo fuzz run` would pass and ours.
fn run_target(fuzz_dir: &Path, logs: &Path, target: &str, seconds: u64) -> Result<Outcome> {
    let binary = target_binary(fuzz_dir, target)?;
    let scratch = fuzz_dir.join("target/corpus").join(target);
    let seeds = fuzz_dir.join("corpus").join(target);
    let artifacts = fuzz_dir.join("artifacts").join(target);
    for dir in [&scratch, &seeds, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let started = Instant::now();
    eprintln!("-- {target}: {seconds} s, log {}", log_path.display());
    let status = Command::new(&binary)
        .current_dir(fuzz_dir)
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(format!("-max_total_time={seconds}"))
        .args(["-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048"])
        // New inputs go to the first directory; the checked-in corpus is only read.
        .arg(&scratch)
        .arg(&seeds)
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("running {}", binary.display()))?;
    let text = std::fs::read_to_string(&log_path)
        .with_context(|| format!("reading {}", log_path.display()))?;
    let mut outcome = parse_log(&text);
    if !status.success() && outcome.failure.is_none() {
        outcome.failure = Some(format!(
            "{target} exited with {status} after {} s",
            started.elapsed().as_secs()
        ));
    }
    Ok(outcome)
}

/// Reads libFuzzer's output: the `stat::` lines of `-print_final_stats`, or else the last
/// `#N` status line, and the report and saved input of a failure.
fn parse_log(text: &str) -> Outcome {
    let mut outcome = Outcome::default();
    let mut last_status = None;
    for line in text.lines() {
        if let Some((key, value)) = line
            .strip_prefix("stat::")
            .and_then(|rest| rest.split_once(':'))
        {
            let value = value.trim().parse().ok();
            match key {
                "number_of_executed_units" => outcome.executions = value,
                "average_exec_per_sec" => outcome.execs_per_sec = value,
                "new_units_added" => outcome.new_units = value,
                "peak_rss_mb" => outcome.peak_rss_mb = value,
                _ => {}
            }
        } else if let Some(n) = line
            .strip_prefix('#')
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<u64>().ok())
        {
            last_status = Some(n);
        } else if let Some(path) = line.split("Test unit written to ").nth(1) {
            outcome.artifact = Some(path.trim().to_owned());
        } else if outcome.failure.is_none()
            && (line.contains("ERROR: libFuzzer")
                || line.contains("ERROR: AddressSanitizer")
                || line.contains("ERROR: LeakSanitizer")
                || line.contains("panicked at"))
        {
            outcome.failure = Some(line.trim_start_matches('=').trim().to_owned());
        }
    }
    // The final statistics are exact; without them (a crash), the last status line.
    outcome.executions = outcome.executions.or(last_status);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_final_stats() {
        let log = "INFO: Seed: 1\n#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #4096\tpulse  cov: 10\nDone 81234 runs in 11 second(s)\n\
                   stat::number_of_executed_units: 81234\nstat::average_exec_per_sec:     7384\n\
                   stat::new_units_added:          17\nstat::slowest_unit_time_sec:    0\n\
                   stat::peak_rss_mb:              41\n";
        assert_eq!(
            parse_log(log),
            Outcome {
                executions: Some(81234),
                execs_per_sec: Some(7384),
                new_units: Some(17),
                peak_rss_mb: Some(41),
                artifact: None,
                failure: None,
            }
        );
    }

    #[test]
    fn parses_a_crash() {
        let log = "#1024\tpulse  cov: 10\n#1500\tNEW cov: 12\n\
                   thread '<unnamed>' panicked at host/src/x.rs:1:2:\nboom\n\
                   ==123== ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='/f/artifacts/t/'; Test unit written to /f/artifacts/t/crash-abc\n\
                   Base64: AAAA\n";
        let outcome = parse_log(log);
        assert_eq!(outcome.executions, Some(1500), "the last status line");
        assert_eq!(
            outcome.artifact.as_deref(),
            Some("/f/artifacts/t/crash-abc")
        );
        assert_eq!(
            outcome.failure.as_deref(),
            Some("thread '<unnamed>' panicked at host/src/x.rs:1:2:")
        );
    }
}
