//! husk's phase files (`HUSK_PHASES`, JSON lines, host/src/phases.rs): which phases a run
//! must record, read into ms since `cli-start`, and the table and JSON of each phase's
//! duration over the runs. `bench pod` reads the same files ([`phase_lines`]).

use std::collections::HashMap;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::bench::{Stats, round};

/// The phases of a cold `husk run` (templates off) in causal order (host/src/phases.rs
/// documents each one).
pub(super) const PHASES_COLD: [&str; 17] = [
    "cli-start",
    "monitor-start",
    "monitor-confined",
    "vm-created",
    "first-vcpu-entry",
    "init-started",
    "host-connected",
    "spec-received",
    "container-created",
    "create-returned",
    "process-started",
    "process-exited",
    "process-exit-seen",
    "guest-shut-down",
    "vm-torn-down",
    "monitor-exit",
    "cli-exit",
];

/// The phases of `husk run` from a template: no kernel boots, so no `init-started`; husk-init
/// reconnects (`host-connected`) once the restored VM runs.
pub(super) const PHASES_TEMPLATE: [&str; 16] = [
    "cli-start",
    "monitor-start",
    "monitor-confined",
    "vm-created",
    "first-vcpu-entry",
    "host-connected",
    "spec-received",
    "container-created",
    "create-returned",
    "process-started",
    "process-exited",
    "process-exit-seen",
    "guest-shut-down",
    "vm-torn-down",
    "monitor-exit",
    "cli-exit",
];

/// A phase of the chain (`from → to`): its stats over the runs and its values.
pub(super) type Segment = (String, Stats, Vec<f64>);

/// Prints the phase table of `what`'s runs; returns each phase's duration (each phase minus
/// the one before it in `chain`).
pub(super) fn print_phases(
    what: &str,
    chain: &[&str],
    runs: &[HashMap<String, f64>],
) -> Vec<Segment> {
    let segments: Vec<Segment> = chain
        .windows(2)
        .map(|w| {
            let values: Vec<f64> = runs.iter().map(|p| p[w[1]] - p[w[0]]).collect();
            (format!("{} → {}", w[0], w[1]), Stats::of(&values), values)
        })
        .collect();
    println!();
    println!(
        "{what} phases over {} runs (ms; from husk's own timestamps):",
        runs.len()
    );
    println!(
        "{:<42} {:>10} {:>10} {:>10} {:>12}",
        "phase", "min", "median", "p90", "at (median)"
    );
    for (name, s, _) in &segments {
        let end = name.rsplit(' ').next().unwrap_or("");
        let at = Stats::of(&runs.iter().map(|p| p[end]).collect::<Vec<_>>()).median;
        println!(
            "{name:<42} {:>10.1} {:>10.1} {:>10.1} {at:>12.1}",
            s.min, s.median, s.p90
        );
    }
    segments
}

pub(super) fn phases_json(segments: &[Segment]) -> Value {
    json!(
        segments
            .iter()
            .map(|(name, s, v)| {
                let mut j = s.json();
                j["phase"] = json!(name);
                j["values_ms"] = json!(v.iter().map(|x| round(*x)).collect::<Vec<_>>());
                j
            })
            .collect::<Vec<_>>()
    )
}

/// Reads a phase file (JSON lines) into ms since `cli-start`; every phase of `chain` must be
/// there, once.
pub(super) fn parse_phases(text: &str, chain: &[&str]) -> Result<HashMap<String, f64>> {
    let mut ns: HashMap<String, u64> = HashMap::new();
    for (phase, t, _) in phase_lines(text)? {
        if ns.insert(phase.clone(), t).is_some() {
            bail!("phase {phase} recorded twice");
        }
    }
    let missing: Vec<&str> = chain
        .iter()
        .copied()
        .filter(|p| !ns.contains_key(*p))
        .collect();
    ensure!(missing.is_empty(), "husk recorded no {missing:?}");
    let origin = ns["cli-start"];
    Ok(ns
        .into_iter()
        .map(|(p, t)| (p, (t as f64 - origin as f64) / 1e6))
        .collect())
}

/// The lines of a phase file (JSON lines, host/src/phases.rs) in file order: each phase, when
/// it happened (CLOCK_MONOTONIC ns) and the pid of the process that recorded it.
pub(in crate::bench) fn phase_lines(text: &str) -> Result<Vec<(String, u64, u64)>> {
    text.lines()
        .enumerate()
        .map(|(n, line)| {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("phase file line {}: {line:?}", n + 1))?;
            let (Some(phase), Some(t), Some(pid)) = (
                v["phase"].as_str(),
                v["mono_ns"].as_u64(),
                v["pid"].as_u64(),
            ) else {
                bail!(
                    "phase file line {}: no phase, mono_ns or pid: {line}",
                    n + 1
                );
            };
            Ok((phase.to_string(), t, pid))
        })
        .collect()
}
