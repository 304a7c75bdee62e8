//! `cargo xtask bench startup`: where every millisecond of `husk run` goes, next to runc, crun
//! and QEMU on the same machine in the same run.
//!
//! - Each iteration runs, in this order, so that drift of the machine over the run affects all
//!   of them alike (A B C D A B C D ...): `husk run`, `runc run` and `crun run` of one
//!   busybox-static bundle running `/bin/true` (its config.json is `runc spec`'s default with
//!   only the args and `terminal` changed), then QEMU microvm booting husk's vmlinux +
//!   initramfs to init on the same KVM (as `bench boot` does).
//! - husk's phases come from the timestamps husk itself records (`HUSK_PHASES`, documented in
//!   host/src/phases.rs): the time between consecutive phases of [`PHASES`], min/median/p90.
//!   Wall times of all three runtimes are measured here, spawn to exit.
//! - husk boot-to-init is `monitor-start` → `init-started`; QEMU's is spawn → husk-init's
//!   first console line (QEMU has no marker port). husk's misses the monitor's exec (~1 ms).
//! - Memory: `--density N` idle containers (`sleep`) started with `husk run --detach`, as many
//!   at once as there are cores;
//!   per monitor at steady state: RSS and PSS (/proc/PID/smaps_rollup) and the guest RAM the
//!   guest actually touched (the RSS of the guest-memory mapping). Density = idle containers per
//!   GiB of host memory, from the median PSS; the drop of MemAvailable is the cross-check.
//! - Output: a table on stdout, `<out>/startup.json` and `<out>/startup.svg` (stacked phase
//!   bars per runtime). docs/performance.md explains how to read them.
//!
//! This file runs the iterations and reports them; `runs` times one run of each runtime,
//! `phases` reads and tabulates husk's phase files, `density` starts and measures the idle
//! containers, `machine` describes the machine for the report, `svg` draws the chart.

mod density;
mod machine;
mod phases;
mod runs;
mod svg;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde_json::json;

use self::density::{Density, measure_density, print_memory};
pub(super) use self::machine::machine;
pub(super) use self::phases::phase_lines;
use self::phases::{PHASES_COLD, PHASES_TEMPLATE, phases_json, print_phases};
use self::runs::{husk_run, oci_run};
use super::boot::{self, guest_cmdline, is_kvm_pvm, qemu_kvm_cpu};
use super::{Scratch, Stats, check_tools, make_bundle, round};

/// The name of the cold runs, and of their ratio to runs from a template.
const COLD_RUN: &str = "husk run (cold boot)";
const COLD_RATIO: &str = "husk run (cold boot) / husk run (template)";

/// Options of `bench startup`.
#[derive(Debug, clap::Args)]
pub struct StartupBenchArgs {
    /// Iterations (each: husk run, runc run, crun run, QEMU boot).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where to write startup.json and startup.svg [default: target/bench/startup]
    #[arg(long)]
    out: Option<PathBuf>,
    /// Idle husk containers to start for the memory and density figures (0: skip).
    #[arg(long, default_value_t = 10)]
    density: usize,
    /// Directory with vmlinux and initramfs.cpio [default: target/husk-image]
    #[arg(long)]
    image: Option<PathBuf>,
    /// Also run `husk --monitor-uid BASE run` in each iteration (after `husk run`): its wall
    /// time, phases and ratio to `husk run`.
    #[arg(long, value_name = "BASE")]
    monitor_uid: Option<u32>,
}

/// Runs the benchmark.
pub fn run(args: &StartupBenchArgs) -> Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    let root = crate::workspace::root();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench/startup"));
    let (vmlinux, initrd) = super::guest_image(args.image.as_deref())?;
    check_tools()?;
    let kvm_pvm = is_kvm_pvm();
    let cmdline = guest_cmdline(&root, kvm_pvm)?;

    println!("building husk (release)");
    let husk = super::build_husk(&root)?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let work = Scratch::new(&out.join("work"))?;
    let bundle = make_bundle(&work.0.join("bundle"), &["/bin/true"], None)?;
    let machine = machine(&husk, kvm_pvm);
    println!(
        "machine: {}\n{} iterations of: husk run from a template and cold, runc run, crun run (busybox `true`), QEMU microvm boot to init",
        machine["summary"].as_str().unwrap_or(""),
        args.runs
    );
    // The template of the bundle's shape (the default: 1 vCPU, 256 MiB), made before the runs
    // (what the first `create` of the shape would do).
    let templates = work.0.join("templates");
    let started = Instant::now();
    let built = Command::new(&husk)
        .args(["template", "build"])
        .env("HUSK_TEMPLATE_DIR", &templates)
        .output()
        .context("running husk template build")?;
    ensure!(
        built.status.success(),
        "husk template build: {}",
        String::from_utf8_lossy(&built.stderr).trim()
    );
    let template_build_ms = started.elapsed().as_secs_f64() * 1000.0;
    println!(
        "template: {} ({:.1} s)",
        String::from_utf8_lossy(&built.stdout).trim(),
        template_build_ms / 1000.0
    );
    let template_env = [("HUSK_TEMPLATE_DIR", templates.as_os_str())];
    let cold_env = [
        ("HUSK_TEMPLATE_DIR", templates.as_os_str()),
        ("HUSK_TEMPLATES", std::ffi::OsStr::new("off")),
    ];

    let mut husk_phases: Vec<HashMap<String, f64>> = Vec::new();
    let mut cold_phases: Vec<HashMap<String, f64>> = Vec::new();
    let mut uid_phases: Vec<HashMap<String, f64>> = Vec::new();
    let mut walls: HashMap<&str, Vec<f64>> = HashMap::new();
    for i in 1..=args.runs {
        let id = format!("bench-{}-{i}", std::process::id());
        let phases_file = work.0.join(format!("phases-{i}.jsonl"));
        let husk_root = work.0.join("husk-root");
        let run = |flags: &[String], env: &[(&str, &std::ffi::OsStr)], file: &Path, phases| {
            husk_run(&husk, flags, env, &husk_root, &bundle, &id, file, phases)
        };
        let (ms, phases) = run(&[], &template_env, &phases_file, &PHASES_TEMPLATE[..])
            .with_context(|| format!("iteration {i}: husk run"))?;
        husk_phases.push(phases);
        walls.entry("husk run").or_default().push(ms);
        let file = work.0.join(format!("phases-cold-{i}.jsonl"));
        let (cold_ms, phases) = run(&[], &cold_env, &file, &PHASES_COLD[..])
            .with_context(|| format!("iteration {i}: husk run, templates off"))?;
        cold_phases.push(phases);
        walls.entry(COLD_RUN).or_default().push(cold_ms);
        println!("  iteration {i}: husk run {ms:>9.1} ms (template), {cold_ms:>9.1} ms (cold)");
        if let Some(base) = args.monitor_uid {
            let flags = ["--monitor-uid".to_string(), base.to_string()];
            let file = work.0.join(format!("phases-uid-{i}.jsonl"));
            let (ms, phases) = run(&flags, &template_env, &file, &PHASES_TEMPLATE[..])
                .with_context(|| format!("iteration {i}: husk --monitor-uid {base} run"))?;
            uid_phases.push(phases);
            walls.entry(UID_RUN).or_default().push(ms);
            println!("  iteration {i}: husk --monitor-uid {base} run {ms:>9.1} ms");
        }
        let runc = oci_run("runc", &work.0.join("runc-root"), &bundle, &id)
            .with_context(|| format!("iteration {i}: runc run"))?;
        walls.entry("runc run").or_default().push(runc);
        let crun = oci_run("crun", &work.0.join("crun-root"), &bundle, &id)
            .with_context(|| format!("iteration {i}: crun run"))?;
        walls.entry("crun run").or_default().push(crun);
        let qemu = boot::qemu_boot("kvm", qemu_kvm_cpu(kvm_pvm), &vmlinux, &initrd, &cmdline)
            .with_context(|| format!("iteration {i}: QEMU boot"))?;
        walls
            .entry("QEMU microvm boot-to-init")
            .or_default()
            .push(qemu.to_init);
        let husk_boot = cold_phases[i - 1]["init-started"] - cold_phases[i - 1]["monitor-start"];
        walls
            .entry("husk boot-to-init")
            .or_default()
            .push(husk_boot);
        println!(
            "  iteration {i}: runc run {runc:>7.1} ms  crun run {crun:>7.1} ms  boot-to-init husk {husk_boot:>9.1} ms, QEMU {:>9.1} ms",
            qemu.to_init
        );
    }

    let segments = print_phases("husk run (template)", &PHASES_TEMPLATE, &husk_phases);
    let cold_segments = print_phases(COLD_RUN, &PHASES_COLD, &cold_phases);
    let uid_segments =
        (!uid_phases.is_empty()).then(|| print_phases(UID_RUN, &PHASES_TEMPLATE, &uid_phases));
    // The host's share of a start from a template: from the command to the restored guest
    // running.
    let host_side: Vec<f64> = husk_phases.iter().map(|p| p["first-vcpu-entry"]).collect();
    walls.insert(HOST_SIDE, host_side);

    let order: Vec<&str> = [
        "husk run",
        COLD_RUN,
        HOST_SIDE,
        UID_RUN,
        "runc run",
        "crun run",
        "husk boot-to-init",
        "QEMU microvm boot-to-init",
    ]
    .into_iter()
    .filter(|n| walls.contains_key(n))
    .collect();
    let totals: Vec<(&str, Stats)> = order.iter().map(|n| (*n, Stats::of(&walls[n]))).collect();
    println!();
    println!(
        "{:<28} {:>12} {:>12} {:>12}",
        "wall time (ms)", "min", "median", "p90"
    );
    for (name, s) in &totals {
        println!(
            "{name:<28} {:>12.1} {:>12.1} {:>12.1}",
            s.min, s.median, s.p90
        );
    }
    let med = |n: &str| Stats::of(&walls[n]).median;
    let mut ratios = vec![
        ("husk run / runc run", med("husk run") / med("runc run")),
        ("husk run / crun run", med("husk run") / med("crun run")),
        (
            "husk boot-to-init / QEMU microvm boot-to-init",
            med("husk boot-to-init") / med("QEMU microvm boot-to-init"),
        ),
    ];
    ratios.push((COLD_RATIO, med(COLD_RUN) / med("husk run")));
    if walls.contains_key(UID_RUN) {
        ratios.push((UID_RATIO, med(UID_RUN) / med("husk run")));
    }
    println!();
    for (name, r) in &ratios {
        println!("ratio of medians, {name}: {r:.3}x");
    }

    let (memory, cold_memory) = if args.density > 0 {
        println!();
        println!(
            "memory: starting {} idle husk containers from one template",
            args.density
        );
        let m = measure_density(&husk, &template_env, &work.0, "template", args.density)?;
        print_memory(&m);
        println!();
        println!(
            "memory: starting {} idle husk containers, cold",
            args.density
        );
        let cold = measure_density(&husk, &cold_env, &work.0, "cold", args.density)?;
        print_memory(&cold);
        println!();
        println!(
            "ratio of median PSS, cold / template: {:.2}x",
            cold.median_pss_kib() / m.median_pss_kib()
        );
        (Some(m), Some(cold))
    } else {
        (None, None)
    };

    let report = json!({
        "machine": machine,
        "runs": args.runs,
        "bundle": "busybox-static, runc spec defaults, args [/bin/true], terminal false",
        "template_build_ms": round(template_build_ms),
        "husk_phases": phases_json(&segments),
        "husk_cold_phases": phases_json(&cold_segments),
        "husk_monitor_uid_phases": uid_segments.as_deref().map(phases_json),
        "wall": totals.iter().map(|(name, s)| {
            let mut j = s.json();
            j["what"] = json!(name);
            j["values_ms"] = json!(walls[name].iter().map(|x| round(*x)).collect::<Vec<_>>());
            j
        }).collect::<Vec<_>>(),
        "ratios_of_medians": ratios.iter().map(|(n, r)| json!({"pair": n, "ratio": round(*r)})).collect::<Vec<_>>(),
        "memory": memory.as_ref().map(Density::json),
        "memory_cold": cold_memory.as_ref().map(Density::json),
    });
    let json_path = out.join("startup.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let svg_path = out.join("startup.svg");
    let husk_bar: Vec<(String, f64)> = segments
        .iter()
        .map(|(name, s, _)| (name.clone(), s.median))
        .collect();
    let others: Vec<(&str, f64)> = totals[1..]
        .iter()
        .map(|(name, s)| (*name, s.median))
        .collect();
    svg::write(&svg_path, &husk_bar, &others, args.runs)?;
    println!();
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}

/// The host's share of a start from a template: `cli-start` → `first-vcpu-entry`.
const HOST_SIDE: &str = "husk cli-start → restored vCPU";

/// The name of the `--monitor-uid` variant's runs, and of its ratio to `husk run`.
const UID_RUN: &str = "husk run --monitor-uid";
const UID_RATIO: &str = "husk run --monitor-uid / husk run";
