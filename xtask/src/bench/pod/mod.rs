//! `cargo xtask bench pod`: the time to a running pod of two containers through the CRI, as
//! kubelet makes one, with `husk` and with `runc` as the runtime handler, in one run.
//!
//! - The harness is the end-to-end tests' (`husk_e2e::cri::Cri`): a containerd of its own with
//!   the CRI plugin, the handlers `runc` and `husk` (the runc v2 shim with husk as its binary),
//!   a pause image built here, the busybox-static test image, a CNI bridge of its own.
//! - Each pod, as kubelet: RunPodSandbox, then CreateContainer and StartContainer of one
//!   container, then of the second (both run an idle shell), then a first ExecSync (`true`) in
//!   the second. Each call is timed from the harness; each includes one status call the harness
//!   makes after it (PodSandboxStatus for the pod's IP, ContainerStatus for the pid it watches),
//!   a few ms. Then StopPodSandbox and RemovePodSandbox, each timed, and the harness waits
//!   until nothing of the pod is left (process, mount, state, CNI lease, cgroup), or fails.
//! - One warm-up pod per handler first, not counted: page caches fill, and husk makes the VM
//!   template of the pod's shape if its cache (husk's own: `$HUSK_TEMPLATE_DIR`, default
//!   `/var/cache/husk/templates`) has none, as the first pod of a shape on a node would. Then
//!   `--runs` pods per handler, husk and runc in turns, so that drift of the machine's load
//!   hits both alike. Every husk pod after the warm-up restores its VM from the template.
//! - husk's side: the `husk` handler runs husk through a wrapper that records each command's
//!   phases (`HUSK_PHASES`, see `calls`): each CRI call is split into the husk commands it
//!   caused (a `create`'s own phases below it: the VM restored from the template, the guest
//!   building the container) and the rest (containerd, the shim, CNI). The wrapper costs one
//!   `sh` exec per husk command (about a millisecond).
//! - husk's limit for its VM's answers (`HUSK_REPLY_TIMEOUT`) is the harness's limit for a CRI
//!   call unless given: on a loaded machine a container takes longer than husk's default to
//!   build, and the benchmark times that rather than failing.
//! - Output: a table on stdout and `<out>/pod.json` with every run's values, each husk
//!   command's phases, the machine and its load average before and after.

mod calls;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use husk_e2e::cri::api::ContainerState;
use husk_e2e::cri::{CALL_LIMIT, Cri, Handler, IDLE};
use serde_json::{Value, json};

use self::calls::{Call, Recorder, Step, breakdown, calls_json, ms};
use super::{Scratch, median, round};

/// How long a pod's teardown may take to leave nothing behind.
const CLEAN_LIMIT: Duration = Duration::from_secs(180);

/// The rows of the table, in order: `(name, from, to, own)`, from one of [`pod`]'s timestamps
/// to another (their indices); `own` when the row is one step of its own, which husk's
/// breakdown splits (a total is not: its steps are rows). [`PodRun::steps`] has one value
/// for each.
const ROWS: [(&str, usize, usize, bool); 12] = [
    ("RunPodSandbox", 0, 1, true),
    ("CreateContainer 1", 1, 2, true),
    ("StartContainer 1", 2, 3, true),
    ("CreateContainer 2", 3, 4, true),
    ("StartContainer 2", 4, 5, true),
    (RUNNING, 0, 5, false),
    ("ExecSync `true` in 2", 5, 6, true),
    (EXECUTED, 0, 6, false),
    ("StopPodSandbox", 7, 8, true),
    ("RemovePodSandbox", 8, 9, true),
    ("until nothing is left", 9, 10, true),
    (TEARDOWN, 7, 10, false),
];

/// From RunPodSandbox to the second StartContainer's answer.
const RUNNING: &str = "both running (total)";
/// From RunPodSandbox to the first ExecSync's answer.
const EXECUTED: &str = "first ExecSync answered (total)";
/// StopPodSandbox, RemovePodSandbox and the wait until nothing is left.
const TEARDOWN: &str = "teardown (total)";

/// The handlers, in the order they take turns.
const HANDLERS: [Handler; 2] = [Handler::Husk, Handler::Runc];

/// Options of `bench pod`.
#[derive(Debug, clap::Args)]
pub struct PodBenchArgs {
    /// Pods per runtime handler (husk and runc in turns), after one warm-up pod each.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Directory for the report (`pod.json`) [default: target/bench/pod]
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One pod's times.
#[derive(Debug)]
struct PodRun {
    /// ms, one per [`ROWS`] entry.
    steps: Vec<f64>,
    /// husk's breakdown (`calls::breakdown`'s rows), empty for runc.
    breakdown: Vec<(u8, String, f64)>,
    /// husk's commands and their phases (JSON), null for runc.
    calls: Value,
    /// Whether the pod's VM booted a kernel (husk had no template for it).
    cold: bool,
}

/// Runs the benchmark.
pub fn run(args: &PodBenchArgs) -> Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!(
        husk_e2e::is_root(),
        "needs root: containerd's CRI plugin makes namespaces, mounts and a CNI bridge"
    );
    ensure!(
        super::kvm_available(),
        "/dev/kvm is not available: husk's pods are VMs"
    );
    super::guest_image(None)?;
    let root = crate::workspace::root();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench/pod"));
    println!("building husk (release)");
    let husk = super::build_husk(&root)?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let work = Scratch::new(&out.join("work"))?;
    let recorder = Recorder::new(work.path(), &husk)?;
    // The harness force-deletes, with `$HUSK_BINARY`, what husk containers a failure leaves.
    // husk waits for its VM's answers up to `$HUSK_REPLY_TIMEOUT` (120 s by default); a
    // loaded machine can take longer to build a container, and a benchmark is to time that,
    // not to fail on it: the harness's limit for a CRI call, unless given (containerd, its
    // shims and husk inherit the environment).
    let reply_timeout = std::env::var_os("HUSK_REPLY_TIMEOUT")
        .unwrap_or_else(|| CALL_LIMIT.as_secs().to_string().into());
    // SAFETY: no other thread runs yet (the harness's runtime and containerd start below), so
    // nothing reads the environment while it changes.
    unsafe {
        std::env::set_var("HUSK_BINARY", &husk);
        std::env::set_var("HUSK_REPLY_TIMEOUT", &reply_timeout);
    }
    let machine = super::startup::machine(&husk, super::boot::is_kvm_pvm());
    let load_before = loadavg();
    println!(
        "machine: {}\nload average (1, 5, 15 min): {load_before}",
        machine["summary"].as_str().unwrap_or("")
    );
    println!(
        "starting containerd with the CRI plugin (handlers husk and runc), the images, a CNI bridge"
    );
    let cri = Cri::start(Some(&recorder.wrapper))
        .ok_or_else(|| anyhow!("the CRI harness cannot run here (the reason is above)"))?;

    println!("warm-up: one pod per handler, not counted (husk makes the pod's VM template)");
    let mut warmups = Vec::new();
    for handler in HANDLERS {
        let name = format!("warmup-{}", handler.name());
        let r = pod(&cri, &recorder, handler, &name).with_context(|| format!("pod {name}"))?;
        report_line("warm-up", handler, &r);
        warmups.push(r);
    }
    println!(
        "{} pods per handler, in turns: RunPodSandbox, CreateContainer + StartContainer x2, ExecSync, teardown",
        args.runs
    );
    let mut runs: Vec<Vec<PodRun>> = HANDLERS.iter().map(|_| Vec::new()).collect();
    for i in 1..=args.runs {
        for (handler, done) in HANDLERS.iter().zip(runs.iter_mut()) {
            let name = format!("bench-{}-{i}", handler.name());
            let r = pod(&cri, &recorder, *handler, &name).with_context(|| format!("pod {name}"))?;
            report_line(&format!("run {i}"), *handler, &r);
            done.push(r);
        }
    }
    drop(cri);
    let load_after = loadavg();

    let table = print_table(&runs);
    let husk_rows = merge_breakdowns(&runs[0]);
    print_breakdown(&husk_rows, args.runs);
    let cold = runs[0].iter().filter(|r| r.cold).count();
    if cold > 0 {
        println!(
            "\nwarning: {cold} of the husk pods booted their VM cold (no template: see the log of husk's monitor)"
        );
    }
    println!("\nload average (1, 5, 15 min): before {load_before}, after {load_after}");

    let report = json!({
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "runs": args.runs,
        "pod": "RunPodSandbox; CreateContainer + StartContainer of two busybox-static containers running an idle shell; ExecSync `true` in the second; StopPodSandbox + RemovePodSandbox",
        "handlers": HANDLERS.iter().zip(&runs).zip(&warmups).map(|((h, rs), w)| {
            json!({
                "handler": h.name(),
                "steps": ROWS.iter().enumerate().map(|(k, (row, ..))| {
                    let values: Vec<f64> = rs.iter().map(|r| r.steps[k]).collect();
                    let (min, med, max) = spread(&values);
                    json!({"step": row, "values_ms": values.iter().map(|v| round(*v)).collect::<Vec<_>>(),
                           "min_ms": round(min), "median_ms": round(med), "max_ms": round(max),
                           "warmup_ms": round(w.steps[k])})
                }).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
        "ratios_of_medians_husk_to_runc": table,
        "husk_breakdown": husk_rows.iter().map(|(level, label, values)| {
            let (min, med, max) = spread(values);
            json!({"level": level, "what": label, "values_ms": values.iter().map(|v| round(*v)).collect::<Vec<_>>(),
                   "min_ms": round(min), "median_ms": round(med), "max_ms": round(max)})
        }).collect::<Vec<_>>(),
        "husk_calls": runs[0].iter().map(|r| r.calls.clone()).collect::<Vec<_>>(),
        "husk_booted_cold": runs[0].iter().map(|r| r.cold).collect::<Vec<_>>(),
    });
    let path = out.join("pod.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// One pod under `handler`, named `name`, from RunPodSandbox until nothing of it is left.
fn pod(cri: &Cri, recorder: &Recorder, handler: Handler, name: &str) -> Result<PodRun> {
    // The timestamps ROWS refer to, in order.
    let mut t = vec![mono_ns()];
    let pod = cri.run_pod(name, handler)?;
    t.push(mono_ns());
    let c1 = cri.create_container(&pod, cri.container_config("one", IDLE))?;
    t.push(mono_ns());
    cri.start_container(&c1)?;
    t.push(mono_ns());
    let c2 = cri.create_container(&pod, cri.container_config("two", IDLE))?;
    t.push(mono_ns());
    cri.start_container(&c2)?;
    t.push(mono_ns());
    // The harness's limit for a call, not a shorter one: on a loaded machine a husk exec can
    // take minutes, and containerd kills an exec that outlives its timeout.
    let exec = cri.exec_sync(&c2, &["true"], CALL_LIMIT)?;
    t.push(mono_ns());
    ensure!(
        exec.exit_code == 0,
        "ExecSync `true` in container two exited {}: {}{}",
        exec.exit_code,
        exec.stdout,
        exec.stderr
    );
    for id in [&c1, &c2] {
        cri.wait_container_state(id, ContainerState::ContainerRunning, CALL_LIMIT)?;
    }
    t.push(mono_ns());
    cri.stop_pod(&pod)?;
    t.push(mono_ns());
    cri.remove_pod(&pod)?;
    t.push(mono_ns());
    cri.wait_clean(CLEAN_LIMIT)
        .map_err(|left| anyhow!("after StopPodSandbox and RemovePodSandbox, {left}"))?;
    t.push(mono_ns());
    let steps = ROWS.iter().map(|(_, a, b, _)| ms(t[*a], t[*b])).collect();
    // The monitor writes the VM's phases when the VM ends: all are there once the pod is gone.
    let calls = recorder.take()?;
    if handler != Handler::Husk {
        ensure!(
            calls.is_empty(),
            "husk ran in a {} pod: {:?}",
            handler.name(),
            calls[0].args
        );
        return Ok(PodRun {
            steps,
            breakdown: Vec::new(),
            calls: Value::Null,
            cold: false,
        });
    }
    let ids = [
        ("sandbox", pod.id.as_str()),
        ("container 1", c1.as_str()),
        ("container 2", c2.as_str()),
    ];
    let intervals: Vec<Step> = ROWS
        .iter()
        .filter(|row| row.3)
        .map(|(name, a, b, _)| Step {
            name,
            from: t[*a],
            to: t[*b],
        })
        .collect();
    Ok(PodRun {
        steps,
        breakdown: breakdown(&intervals, &calls, &ids),
        calls: calls_json(&calls, t[0], &ids),
        cold: calls.iter().any(Call::booted_cold),
    })
}

/// A progress line for one pod.
fn report_line(what: &str, handler: Handler, r: &PodRun) {
    let at = |row: &str| r.steps[ROWS.iter().position(|x| x.0 == row).unwrap_or(0)];
    println!(
        "  {what}: {:<4} RunPodSandbox {:>9.1} ms, both running {:>9.1} ms, ExecSync answered {:>9.1} ms, teardown {:>9.1} ms{}",
        handler.name(),
        at(ROWS[0].0),
        at(RUNNING),
        at(EXECUTED),
        at(TEARDOWN),
        if r.cold {
            " (the VM booted cold: no template)"
        } else {
            ""
        }
    );
}

/// Prints the table of both handlers; returns the ratios of medians as JSON.
fn print_table(runs: &[Vec<PodRun>]) -> Value {
    println!();
    println!(
        "time to a running pod of 2 containers through the CRI, {} pods per handler (ms)",
        runs[0].len()
    );
    println!(
        "{:<34} {:>10} {:>21} {:>10} {:>21} {:>10}",
        "step", "husk med.", "husk min – max", "runc med.", "runc min – max", "husk/runc"
    );
    let mut ratios = serde_json::Map::new();
    for (k, (row, ..)) in ROWS.iter().enumerate() {
        let s: Vec<(f64, f64, f64)> = runs
            .iter()
            .map(|rs| spread(&rs.iter().map(|r| r.steps[k]).collect::<Vec<_>>()))
            .collect();
        let ratio = s[0].1 / s[1].1;
        ratios.insert((*row).into(), json!(round(ratio)));
        println!(
            "{row:<34} {:>10.1} {:>21} {:>10.1} {:>21} {:>9.1}x",
            s[0].1,
            format!("{:.1} – {:.1}", s[0].0, s[0].2),
            s[1].1,
            format!("{:.1} – {:.1}", s[1].0, s[1].2),
            ratio
        );
    }
    println!();
    for row in [RUNNING, EXECUTED] {
        println!(
            "ratio of medians, husk / runc, {row}: {:.1}x",
            ratios[row].as_f64().unwrap_or(f64::NAN)
        );
    }
    Value::Object(ratios)
}

/// husk's breakdown rows of all runs with every run's value, in the order first seen; a row
/// is the same row in another run when its label and those of the rows above it (its CRI call,
/// its command) are.
fn merge_breakdowns(runs: &[PodRun]) -> Vec<(u8, String, Vec<f64>)> {
    let mut rows: Vec<(Vec<String>, u8, String, Vec<f64>)> = Vec::new();
    for r in runs {
        let mut path: Vec<String> = Vec::new();
        for (level, label, v) in &r.breakdown {
            path.truncate(usize::from(*level));
            path.push(label.clone());
            match rows.iter_mut().find(|x| x.0 == path) {
                Some(x) => x.3.push(*v),
                None => rows.push((path.clone(), *level, label.clone(), vec![*v])),
            }
        }
    }
    rows.into_iter()
        .map(|(_, level, label, values)| (level, label, values))
        .collect()
}

fn print_breakdown(rows: &[(u8, String, Vec<f64>)], runs: usize) {
    println!();
    println!(
        "where husk's time goes, over {runs} pods (ms; husk's own phases, a sub-row's medians need not add up to its row's):"
    );
    println!(
        "{:<80} {:>10} {:>10} {:>10}",
        "CRI call / husk command / phase", "median", "min", "max"
    );
    for (level, label, values) in rows {
        let (min, med, max) = spread(values);
        let label = format!("{}{label}", "  ".repeat(usize::from(*level)));
        println!("{label:<80} {med:>10.1} {min:>10.1} {max:>10.1}");
    }
}

/// min, median, max (NaN for none).
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let min = values.iter().copied().fold(f64::NAN, f64::min);
    let max = values.iter().copied().fold(f64::NAN, f64::max);
    (min, median(values.iter().copied()), max)
}

/// The load average (1, 5, 15 minutes) as /proc/loadavg gives it.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// CLOCK_MONOTONIC in ns: the clock of husk's phase files.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which is valid and ours.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_MONOTONIC is always available");
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_span_forward_between_the_timestamps() {
        // pod() takes 11 timestamps; each row goes forward from one to a later one.
        for (name, a, b, _) in ROWS {
            assert!(a < b && b <= 10, "{name}: {a}..{b}");
        }
        // The steps of their own follow each other, but for the wait for both running.
        let own: Vec<(usize, usize)> = ROWS.iter().filter(|r| r.3).map(|r| (r.1, r.2)).collect();
        for w in own.windows(2) {
            assert!(w[0].1 == w[1].0 || (w[0].1, w[1].0) == (6, 7), "{own:?}");
        }
    }

    #[test]
    fn spread_is_min_median_max() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert!(spread(&[]).1.is_nan());
    }

    #[test]
    fn breakdowns_merge_by_label() {
        let run = |v: f64| PodRun {
            steps: Vec::new(),
            breakdown: vec![
                (0, "a".into(), v),
                (1, "b".into(), v * 2.0),
                (0, "c".into(), 0.5),
                (1, "b".into(), v * 3.0),
            ],
            calls: Value::Null,
            cold: false,
        };
        let rows = merge_breakdowns(&[run(1.0), run(3.0)]);
        assert_eq!(rows[0], (0, "a".into(), vec![1.0, 3.0]));
        assert_eq!(rows[1], (1, "b".into(), vec![2.0, 6.0]));
        // The same label under another row is another row.
        assert_eq!(rows[3], (1, "b".into(), vec![3.0, 9.0]));
        assert_eq!(rows.len(), 4);
    }

    #[test]
    fn the_monotonic_clock_never_goes_back() {
        let a = mono_ns();
        assert!(a > 0);
        assert!(mono_ns() >= a);
    }
}
