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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use super::boot::{self, guest_cmdline, is_kvm_pvm, qemu_kvm_cpu, which};

/// The phases of `husk run` in causal order (host/src/phases.rs documents each one).
const PHASES: [&str; 17] = [
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
    "power-off",
    "vm-torn-down",
    "monitor-exit",
    "cli-exit",
];

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

/// min / median / p90 of some milliseconds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stats {
    pub(super) min: f64,
    pub(super) median: f64,
    pub(super) p90: f64,
}

impl Stats {
    pub(super) fn of(values: &[f64]) -> Stats {
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
            median: super::median(v.iter().copied()),
            p90: v[rank.clamp(1, n) - 1],
        }
    }

    pub(super) fn json(&self) -> Value {
        json!({"min_ms": round(self.min), "median_ms": round(self.median), "p90_ms": round(self.p90)})
    }
}

fn round(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// Runs the benchmark.
pub fn run(args: &StartupBenchArgs) -> Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    let root = crate::workspace_root();
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
        "machine: {}\n{} iterations of: husk run, runc run, crun run (busybox `true`), QEMU microvm boot to init",
        machine["summary"].as_str().unwrap_or(""),
        args.runs
    );

    let mut husk_phases: Vec<HashMap<String, f64>> = Vec::new();
    let mut uid_phases: Vec<HashMap<String, f64>> = Vec::new();
    let mut walls: HashMap<&str, Vec<f64>> = HashMap::new();
    for i in 1..=args.runs {
        let id = format!("bench-{}-{i}", std::process::id());
        let phases_file = work.0.join(format!("phases-{i}.jsonl"));
        let husk_root = work.0.join("husk-root");
        let (ms, phases) = husk_run(&husk, &[], &husk_root, &bundle, &id, &phases_file)
            .with_context(|| format!("iteration {i}: husk run"))?;
        husk_phases.push(phases);
        walls.entry("husk run").or_default().push(ms);
        if let Some(base) = args.monitor_uid {
            let flags = ["--monitor-uid".to_string(), base.to_string()];
            let file = work.0.join(format!("phases-uid-{i}.jsonl"));
            let (ms, phases) = husk_run(&husk, &flags, &husk_root, &bundle, &id, &file)
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
        let husk_boot = husk_phases[i - 1]["init-started"] - husk_phases[i - 1]["monitor-start"];
        walls
            .entry("husk boot-to-init")
            .or_default()
            .push(husk_boot);
        println!(
            "  iteration {i}: husk run {ms:>9.1} ms  runc run {runc:>7.1} ms  crun run {crun:>7.1} ms  boot-to-init husk {husk_boot:>9.1} ms, QEMU {:>9.1} ms",
            qemu.to_init
        );
    }

    let segments = print_phases("husk run", &husk_phases);
    let uid_segments = (!uid_phases.is_empty()).then(|| print_phases(UID_RUN, &uid_phases));

    let order: Vec<&str> = [
        "husk run",
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
    if walls.contains_key(UID_RUN) {
        ratios.push((UID_RATIO, med(UID_RUN) / med("husk run")));
    }
    println!();
    for (name, r) in &ratios {
        println!("ratio of medians, {name}: {r:.3}x");
    }

    let memory = if args.density > 0 {
        println!();
        println!("memory: starting {} idle husk containers", args.density);
        let m = measure_density(&husk, &work.0, args.density)?;
        print_memory(&m);
        Some(m)
    } else {
        None
    };

    let report = json!({
        "machine": machine,
        "runs": args.runs,
        "bundle": "busybox-static, runc spec defaults, args [/bin/true], terminal false",
        "husk_phases": phases_json(&segments),
        "husk_monitor_uid_phases": uid_segments.as_deref().map(phases_json),
        "wall": totals.iter().map(|(name, s)| {
            let mut j = s.json();
            j["what"] = json!(name);
            j["values_ms"] = json!(walls[name].iter().map(|x| round(*x)).collect::<Vec<_>>());
            j
        }).collect::<Vec<_>>(),
        "ratios_of_medians": ratios.iter().map(|(n, r)| json!({"pair": n, "ratio": round(*r)})).collect::<Vec<_>>(),
        "memory": memory.as_ref().map(Density::json),
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
    write_svg(&svg_path, &husk_bar, &others, args.runs)?;
    println!();
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}

/// Fails with the install command for whatever the benchmark needs and is missing.
pub(super) fn check_tools() -> Result<()> {
    ensure!(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
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
pub(super) struct Scratch(PathBuf);

impl Scratch {
    /// The directory.
    pub(super) fn path(&self) -> &Path {
        &self.0
    }

    pub(super) fn new(path: &Path) -> Result<Scratch> {
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
pub(super) fn make_bundle(dir: &Path, args: &[&str], rootfs: Option<&Path>) -> Result<PathBuf> {
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

/// The name of the `--monitor-uid` variant's runs, and of its ratio to `husk run`.
const UID_RUN: &str = "husk run --monitor-uid";
const UID_RATIO: &str = "husk run --monitor-uid / husk run";

/// A phase of the chain (`from → to`): its stats over the runs and its values.
type Segment = (String, Stats, Vec<f64>);

/// Prints the phase table of `what`'s runs; returns each phase's duration (each phase minus
/// the one before it in the chain).
fn print_phases(what: &str, runs: &[HashMap<String, f64>]) -> Vec<Segment> {
    let segments: Vec<Segment> = PHASES
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

fn phases_json(segments: &[Segment]) -> Value {
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

/// One `husk FLAGS run`: wall time (ms) and the phases it recorded, as ms since `cli-start`.
fn husk_run(
    husk: &Path,
    flags: &[String],
    root: &Path,
    bundle: &Path,
    id: &str,
    phases_file: &Path,
) -> Result<(f64, HashMap<String, f64>)> {
    let _ = std::fs::remove_file(phases_file);
    let start = Instant::now();
    let out = Command::new(husk)
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
    Ok((ms, parse_phases(&text)?))
}

/// Reads a phase file (JSON lines) into ms since `cli-start`; every phase of [`PHASES`] must be
/// there, once.
fn parse_phases(text: &str) -> Result<HashMap<String, f64>> {
    let mut ns: HashMap<String, u64> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("phase file line {}: {line:?}", n + 1))?;
        let (Some(phase), Some(t)) = (v["phase"].as_str(), v["mono_ns"].as_u64()) else {
            bail!("phase file line {}: no phase or mono_ns: {line}", n + 1);
        };
        if ns.insert(phase.to_string(), t).is_some() {
            bail!("phase {phase} recorded twice");
        }
    }
    let missing: Vec<&str> = PHASES
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

/// One `runc run` / `crun run`: wall time, ms.
fn oci_run(runtime: &str, root: &Path, bundle: &Path, id: &str) -> Result<f64> {
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

/// The machine and tool versions, for the report.
fn machine(husk: &Path, kvm_pvm: bool) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = meminfo("MemTotal").unwrap_or(0) as f64 / 1048576.0;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let version = |cmd: &Path| -> String {
        Command::new(cmd)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(String::from)
            })
            .unwrap_or_default()
    };
    let kvm = if kvm_pvm {
        "kvm_pvm (nested, page-table based: guest kernel mode is emulated)"
    } else {
        "KVM"
    };
    json!({
        "summary": format!("{cpu}, {cores} cores, {mem_gib:.1} GiB, Linux {kernel}, {kvm}"),
        "cpu": cpu, "cores": cores, "mem_gib": round(mem_gib), "kernel": kernel, "kvm": kvm,
        "husk": version(husk), "runc": version(Path::new("runc")), "crun": version(Path::new("crun")),
        "qemu": version(Path::new("qemu-system-x86_64")),
    })
}

/// A field of /proc/meminfo, KiB.
fn meminfo(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The memory figures of idle containers.
#[derive(Debug)]
struct Density {
    containers: usize,
    /// First `run --detach` to the last one returning (as many at once as there are cores), ms.
    start_all_ms: f64,
    rss_kib: Vec<u64>,
    pss_kib: Vec<u64>,
    guest_touched_kib: Vec<u64>,
    guest_ram_mib: u64,
    mem_available_drop_kib: i64,
    /// CPU use of each idle monitor (VM included) over a 10 s window, % of one core.
    idle_cpu_percent: Vec<f64>,
}

impl Density {
    fn median(v: &[u64]) -> f64 {
        super::median(v.iter().map(|x| *x as f64))
    }

    /// Idle containers per GiB of host memory, from the median PSS.
    fn per_gib(&self) -> f64 {
        1048576.0 / Self::median(&self.pss_kib)
    }

    fn json(&self) -> Value {
        json!({
            "containers": self.containers,
            "start_all_ms": round(self.start_all_ms),
            "guest_ram_mib": self.guest_ram_mib,
            "monitor_rss_kib": self.rss_kib,
            "monitor_pss_kib": self.pss_kib,
            "guest_touched_kib": self.guest_touched_kib,
            "median_monitor_rss_kib": Self::median(&self.rss_kib),
            "median_monitor_pss_kib": Self::median(&self.pss_kib),
            "median_guest_touched_kib": Self::median(&self.guest_touched_kib),
            "median_monitor_overhead_kib": Self::median(&self.rss_kib) - Self::median(&self.guest_touched_kib),
            "mem_available_drop_kib": self.mem_available_drop_kib,
            "idle_containers_per_gib": round(self.per_gib()),
            "idle_cpu_percent_of_a_core": self.idle_cpu_percent,
        })
    }
}

fn print_memory(m: &Density) {
    let mib = |kib: f64| kib / 1024.0;
    let rss = Density::median(&m.rss_kib);
    let touched = Density::median(&m.guest_touched_kib);
    println!(
        "  {} containers running after {:.1} s (started as many at once as there are cores)",
        m.containers,
        m.start_all_ms / 1000.0
    );
    println!(
        "  per monitor, median: RSS {:.1} MiB = guest RAM touched {:.1} MiB (of {} MiB) + monitor {:.1} MiB; PSS {:.1} MiB",
        mib(rss),
        mib(touched),
        m.guest_ram_mib,
        mib(rss - touched),
        mib(Density::median(&m.pss_kib))
    );
    println!(
        "  MemAvailable dropped {:.1} MiB for {} containers ({:.1} MiB each)",
        mib(m.mem_available_drop_kib as f64),
        m.containers,
        mib(m.mem_available_drop_kib as f64 / m.containers as f64)
    );
    println!(
        "  density: {:.1} idle containers per GiB of host memory (from PSS)",
        m.per_gib()
    );
    println!(
        "  idle CPU per container (monitor + VM), median: {:.1} % of a core",
        super::median(m.idle_cpu_percent.iter().copied())
    );
}

/// Idle containers that are force-deleted when dropped, whatever happened.
struct IdleContainers<'a> {
    husk: &'a Path,
    root: PathBuf,
    ids: Vec<String>,
}

impl Drop for IdleContainers<'_> {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = Command::new(self.husk)
                .arg("--root")
                .arg(&self.root)
                .args(["delete", "--force", id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Starts `n` idle containers and measures their memory at steady state.
fn measure_density(husk: &Path, work: &Path, n: usize) -> Result<Density> {
    let rootfs = work.join("bundle/rootfs");
    let bundle = make_bundle(
        &work.join("bundle-idle"),
        &["/bin/sleep", "100000"],
        Some(&rootfs),
    )?;
    let idle = IdleContainers {
        husk,
        root: work.join("husk-idle-root"),
        ids: (1..=n)
            .map(|i| format!("idle-{}-{i}", std::process::id()))
            .collect(),
    };
    let available_before = meminfo("MemAvailable").context("reading MemAvailable")?;
    let start = Instant::now();
    // As many boots at once as there are cores: booting is CPU-bound (on kvm_pvm hosts tens of
    // seconds each), and more at once only makes each slower, up to the monitor's boot timeout.
    let at_once = std::thread::available_parallelism().map_or(1, |n| n.get());
    for batch in idle.ids.chunks(at_once) {
        // stderr goes to a file, not a pipe: the monitor inherits it as the container's
        // stderr and keeps it open after `run --detach` returns.
        let children = batch
            .iter()
            .map(|id| {
                let log = work.join(format!("{id}.stderr"));
                let stderr = std::fs::File::create(&log)?;
                let child = Command::new(husk)
                    .arg("--root")
                    .arg(&idle.root)
                    .args(["run", "--detach", "--bundle"])
                    .arg(&bundle)
                    .arg(id)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(stderr)
                    .spawn()
                    .context("running husk run --detach")?;
                Ok((child, log))
            })
            .collect::<Result<Vec<_>>>()?;
        for (id, (mut child, log)) in batch.iter().zip(children) {
            let status = child.wait()?;
            ensure!(
                status.success(),
                "husk run --detach {id} failed: {}",
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            );
        }
    }
    let start_all_ms = start.elapsed().as_secs_f64() * 1000.0;
    // Let the guests settle (husk-init waits, the container sleeps) before measuring.
    std::thread::sleep(Duration::from_secs(5));
    let pids = idle
        .ids
        .iter()
        .map(|id| monitor_pid(husk, &idle.root, id))
        .collect::<Result<Vec<_>>>()?;
    // What an idle VM costs in CPU: the monitors' CPU time over a quiet window.
    let window = Duration::from_secs(10);
    let cpu_before = pids
        .iter()
        .map(|p| cpu_ticks(*p))
        .collect::<Result<Vec<_>>>()?;
    std::thread::sleep(window);
    let cpu_after = pids
        .iter()
        .map(|p| cpu_ticks(*p))
        .collect::<Result<Vec<_>>>()?;
    let mut m = Density {
        containers: n,
        start_all_ms,
        rss_kib: Vec::new(),
        pss_kib: Vec::new(),
        guest_touched_kib: Vec::new(),
        guest_ram_mib: 0,
        mem_available_drop_kib: 0,
        idle_cpu_percent: Vec::new(),
    };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    for (before, after) in cpu_before.iter().zip(&cpu_after) {
        let secs = (after - before) as f64 / hz;
        m.idle_cpu_percent
            .push(round(secs / window.as_secs_f64() * 100.0));
    }
    for pid in pids {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        let field = |name: &str| -> Result<u64> {
            rollup
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("no {name} in /proc/{pid}/smaps_rollup"))
        };
        m.rss_kib.push(field("Rss")?);
        m.pss_kib.push(field("Pss")?);
        let (ram_mib, touched) = guest_ram(pid)?;
        m.guest_ram_mib = ram_mib;
        m.guest_touched_kib.push(touched);
    }
    let available_after = meminfo("MemAvailable").context("reading MemAvailable")?;
    for id in &idle.ids {
        let pid = monitor_pid(husk, &idle.root, id)?;
        ensure!(
            pids_alive(pid),
            "container {id}'s monitor died while being measured"
        );
    }
    m.mem_available_drop_kib = available_before as i64 - available_after as i64;
    drop(idle);
    Ok(m)
}

/// The monitor pid of a running container, from `husk state`.
fn monitor_pid(husk: &Path, root: &Path, id: &str) -> Result<u64> {
    let out = Command::new(husk)
        .arg("--root")
        .arg(root)
        .args(["state", id])
        .output()?;
    let state: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("husk state {id}: {}", String::from_utf8_lossy(&out.stderr)))?;
    ensure!(
        state["status"] == "running",
        "container {id} is not running: {state}"
    );
    state["pid"].as_u64().context("state has no pid")
}

fn pids_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u64) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad /proc/{pid}/stat"))
    };
    // utime and stime are fields 14 and 15: indices 11 and 12 after the name.
    Ok(get(11)? + get(12)?)
}

/// The guest RAM mapping of a monitor: the largest anonymous mapping (the guest's memory is
/// one mapping per RAM region; below 3 GiB there is one). Returns (its size in MiB, its RSS in
/// KiB: what the guest touched).
fn guest_ram(pid: u64) -> Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut best: Option<(u64, u64)> = None;
    let mut current: Option<u64> = None;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            // "start-end perms offset dev inode [path]": anonymous when there is no path.
            current = (f.nth(4).is_none()).then_some(b - a);
            continue;
        }
        if let (Some(size), Some(rss)) = (current, line.strip_prefix("Rss:"))
            && best.is_none_or(|(s, _)| size > s)
        {
            let rss = rss.split_whitespace().next().unwrap_or("0").parse()?;
            best = Some((size, rss));
        }
    }
    let (size, rss) = best.with_context(|| format!("no anonymous mapping in /proc/{pid}/smaps"))?;
    Ok((size >> 20, rss))
}

/// The SVG: one horizontal bar per runtime; husk's stacked by phase (medians).
fn write_svg(
    path: &Path,
    husk: &[(String, f64)],
    others: &[(&str, f64)],
    runs: usize,
) -> Result<()> {
    use plotters::prelude::*;
    let husk_total: f64 = husk.iter().map(|(_, ms)| ms).sum();
    let max = others.iter().map(|(_, ms)| *ms).fold(husk_total, f64::max);
    let rows = 1 + others.len();
    let (rows_px, phases_px) = (u32::try_from(rows)?, u32::try_from(husk.len())?);
    let height = 140 + 60 * rows_px + 18 * phases_px;
    let area = SVGBackend::new(path, (1100, height)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    area.fill(&WHITE).map_err(|e| draw(&e))?;
    let (chart_area, legend_area) = area.split_vertically(100 + 60 * rows_px);
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(
            format!("husk run vs runc / crun; boot-to-init vs QEMU (median of {runs})"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .build_cartesian_2d(0f64..max * 1.25, 0f64..rows as f64)
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc("milliseconds")
        .draw()
        .map_err(|e| draw(&e))?;
    let row_y = |row: usize| (rows - 1 - row) as f64;
    let label = |row: usize, x: f64, text: String| {
        Text::new(text, (x, row_y(row) + 0.8), ("sans-serif", 14).into_font())
    };
    // husk: stacked phases.
    let mut x = 0.0;
    for (i, (_, ms)) in husk.iter().enumerate() {
        let color = Palette99::pick(i).filled();
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x, row_y(0) + 0.15), (x + ms, row_y(0) + 0.6)],
                color,
            )))
            .map_err(|e| draw(&e))?;
        x += ms;
    }
    chart
        .draw_series(std::iter::once(label(
            0,
            0.0,
            format!("husk run: {husk_total:.1} ms (sum of phase medians)"),
        )))
        .map_err(|e| draw(&e))?;
    for (row, (name, ms)) in others.iter().enumerate() {
        let row = row + 1;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, row_y(row) + 0.15), (*ms, row_y(row) + 0.6)],
                BLACK.mix(0.6).filled(),
            )))
            .map_err(|e| draw(&e))?;
        chart
            .draw_series(std::iter::once(label(
                row,
                0.0,
                format!("{name}: {ms:.1} ms"),
            )))
            .map_err(|e| draw(&e))?;
    }
    // The legend: one line per husk phase, with its colour and median.
    for (i, (name, ms)) in husk.iter().enumerate() {
        let y = 10 + 18 * i32::try_from(i)?;
        legend_area
            .draw(&Rectangle::new(
                [(60, y), (74, y + 12)],
                Palette99::pick(i).filled(),
            ))
            .map_err(|e| draw(&e))?;
        legend_area
            .draw(&Text::new(
                format!("{name}: {ms:.1} ms"),
                (82, y),
                ("sans-serif", 13).into_font(),
            ))
            .map_err(|e| draw(&e))?;
    }
    area.present().map_err(|e| draw(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_use_nearest_rank_p90() {
        let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.min, s.median, s.p90), (1.0, 3.0, 5.0));
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(Stats::of(&v).p90, 9.0);
        assert!(Stats::of(&[]).median.is_nan());
    }

    #[test]
    fn phases_are_ms_since_cli_start_and_all_required() {
        let line = |p: &str, ns: u64| format!("{{\"phase\":\"{p}\",\"mono_ns\":{ns},\"pid\":1}}\n");
        let mut text = String::new();
        for (i, p) in PHASES.iter().enumerate() {
            text += &line(p, 1_000_000_000 + i as u64 * 1_500_000);
        }
        text += &line("start-returned", 1_000_000_000);
        let p = parse_phases(&text).unwrap();
        assert_eq!(p["cli-start"], 0.0);
        assert_eq!(p["cli-exit"], 16.0 * 1.5);
        let without: String = text
            .lines()
            .filter(|l| !l.contains("power-off"))
            .map(|l| format!("{l}\n"))
            .collect();
        let err = parse_phases(&without).unwrap_err().to_string();
        assert!(err.contains("power-off"), "{err}");
        let twice = format!("{text}{}", line("vm-created", 5));
        assert!(
            parse_phases(&twice)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(parse_phases("not json\n").is_err());
    }

    #[test]
    fn cpu_ticks_of_a_process_that_works_grow() {
        let me = u64::from(std::process::id());
        let before = cpu_ticks(me).unwrap();
        // Spin until a tick is charged (a loaded machine may take a while to give us one).
        let start = Instant::now();
        let mut x = 0u64;
        while cpu_ticks(me).unwrap() == before {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no CPU time charged"
            );
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
    }

    #[test]
    fn guest_ram_is_the_largest_anonymous_mapping() {
        // Our own process: map 256 MiB anonymous (larger than any other mapping of a test
        // process), touch 3 pages, find it.
        let len = 256 << 20;
        // SAFETY: a fresh private anonymous mapping, unmapped below; no aliasing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        for page in 0..3 {
            // SAFETY: inside the mapping just made.
            unsafe { *p.cast::<u8>().add(page * 4096) = 1 };
        }
        let (size, rss) = guest_ram(u64::from(std::process::id())).unwrap();
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, len) };
        assert_eq!(size, 256);
        // 3 pages, or more if transparent huge pages backed them.
        assert!((12..256 * 1024).contains(&rss), "rss {rss} KiB");
    }
}
