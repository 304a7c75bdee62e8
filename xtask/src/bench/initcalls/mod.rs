//! `cargo xtask bench boot --initcall-debug`: where the guest kernel's boot to husk-init goes.
//!
//! Boots husk's VM with `initcall_debug printk.time=1` and reads the guest kernel's log out of
//! guest memory after the VM ends (`husk vm boot --kernel-log`). Not through the serial
//! console: on kvm_pvm every console byte costs ~0.35 ms of guest time, which would land in the
//! very gaps measured here. From the log's timestamps (the kernel's clock, kvm-clock: ns since
//! the VM was created, less the offset the kernel prints when it starts the clock):
//!
//! - the phases: before the kernel clock starts, `start_kernel()` up to the first initcall,
//!   the initcalls (inside them and between them), the last initcall to `Run /init`, and from
//!   there to husk-init's first instruction (its `init-started` boot marker, on the host's
//!   clock);
//! - the slowest initcalls (`initcall_debug`'s own "returned after N usecs");
//! - the largest gaps between two consecutive kernel messages outside any initcall, which
//!   locate the slow steps of `start_kernel()` and of the end of boot;
//! - the initramfs: its size and the time from "Unpacking initramfs..." to "Freeing initrd
//!   memory".
//!
//! Each run also boots once without `initcall_debug` (same log reading), so the report says
//! what the instrument itself costs. Medians over the runs; every kernel log is kept.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

use super::median;

/// What `--initcall-debug` adds to the guest's command line. `initramfs_async=0` unpacks the
/// initramfs inside its initcall (`populate_rootfs`): by default a kworker unpacks it, and on a
/// 1-vCPU guest that kworker runs whenever an initcall yields, so its seconds would land in
/// whichever initcalls ran meanwhile. `--cmdline initramfs_async=1` measures the default.
const DEBUG_PARAMS: &str = "initcall_debug printk.time=1 initramfs_async=0";
/// Rows of the initcall and gap tables.
const TOP: usize = 15;

/// One kernel log line: its timestamp (ms on the kernel clock) and text.
#[derive(Debug, Clone, PartialEq)]
struct Line {
    ms: f64,
    text: String,
}

/// Parses `dmesg`-format lines (`[    1.234567] text`); other lines (continuations of a
/// multi-line message) are skipped.
fn parse_log(log: &str) -> Vec<Line> {
    log.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('[')?;
            let (ts, text) = rest.split_once("] ")?;
            Some(Line {
                ms: ts.trim().parse::<f64>().ok()? * 1000.0,
                text: text.to_string(),
            })
        })
        .collect()
}

/// `populate_rootfs+0x0/0x37` -> `populate_rootfs`.
fn function_name(symbol: &str) -> &str {
    symbol.split('+').next().unwrap_or(symbol)
}

/// "calling  F+0x0/0x37 @ 1" -> F.
fn initcall_start(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("calling  ")?;
    Some(function_name(rest.split_whitespace().next()?))
}

/// "initcall F+0x0/0x37 returned 0 after 2620 usecs" -> (F, ms).
fn initcall_end(text: &str) -> Option<(&str, f64)> {
    let rest = text.strip_prefix("initcall ")?;
    let mut f = rest.split_whitespace();
    let name = function_name(f.next()?);
    let after = rest.split(" after ").nth(1)?;
    let us: f64 = after.strip_suffix(" usecs")?.trim().parse().ok()?;
    Some((name, us / 1000.0))
}

/// The kernel clock's lost time, put back.
///
/// printk stamps records with `local_clock()`. From `sched_clock_init()` (just before
/// "Calibrating delay loop") until `sched_clock_init_late()` marks the clock stable (a late
/// initcall), that clock follows timekeeping, and timekeeping runs on the jiffies clocksource
/// until the switch to kvm-clock (an fs initcall). On kvm_pvm the guest misses most timer
/// ticks meanwhile, so jiffies, and with them the log's stamps and `initcall_debug`'s
/// durations, fall seconds behind. The kernel says by how much when it marks the clock stable:
/// the last number of "sched_clock: Marking stable (...)->(..., -N)" is -N ns. Stamps after the
/// switch are then late by exactly that much; in between, the loss is spread evenly over the
/// window (an estimate: where in it the ticks went missing is unknown).
#[derive(Debug, Clone, Copy, PartialEq)]
struct ClockFix {
    /// Log time of "Calibrating delay loop", the first message after `sched_clock_init()`.
    start: f64,
    /// Log time of "clocksource: Switched to clocksource".
    end: f64,
    /// What the clock lost in between, ms.
    lost: f64,
}

impl ClockFix {
    fn find(lines: &[Line]) -> Option<ClockFix> {
        let at = |prefix: &str| lines.iter().find(|l| l.text.starts_with(prefix));
        let start = at("Calibrating delay loop")?.ms;
        let end = at("clocksource: Switched to clocksource")?.ms;
        let stable = at("sched_clock: Marking stable")?;
        let offset_ns: f64 = stable
            .text
            .rsplit([',', ' '])
            .next()?
            .trim_end_matches(')')
            .parse()
            .ok()?;
        (end > start).then_some(ClockFix {
            start,
            end,
            lost: (-offset_ns / 1e6).max(0.0),
        })
    }

    /// A log time as kvm-clock time.
    fn apply(&self, ms: f64) -> f64 {
        if ms <= self.start {
            ms
        } else if ms >= self.end {
            ms + self.lost
        } else {
            ms + self.lost * (ms - self.start) / (self.end - self.start)
        }
    }

    /// How much longer the window was than the log says: what a duration measured on the
    /// jiffies clock inside it is multiplied by, for an estimate.
    fn stretch(&self) -> f64 {
        (self.end - self.start + self.lost) / (self.end - self.start)
    }

    /// Whether the span from `a` to `b` (log times) overlaps the window, where times are
    /// estimates.
    fn overlaps(&self, a: f64, b: f64) -> bool {
        b > self.start && a < self.end
    }
}

/// One initcall's time, in ms (summed if the function ran more than once).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Initcall {
    /// `initcall_debug`'s "after N usecs".
    measured: f64,
    /// The best estimate: `measured`, or for a call timed on the jiffies clock `measured`
    /// times the window's [`ClockFix::stretch`].
    ms: f64,
    /// Timed on the jiffies clock (it started before the switch to kvm-clock), whose
    /// measurement is too low.
    on_jiffies: bool,
}

/// A gap between two consecutive messages outside initcalls.
#[derive(Debug, Clone, PartialEq)]
struct Gap {
    /// "first message -> second message".
    label: String,
    ms: f64,
    /// In the window where the clock's loss is spread by estimate.
    estimated: bool,
}

/// What one boot's kernel log says: kernel-clock times in ms, the clock's loss put back.
#[derive(Debug, Clone, Default, PartialEq)]
struct Breakdown {
    /// VM creation to the kernel clock's 0 (kvm-clock's "sched offset").
    before_clock: Option<f64>,
    /// "Calibrating delay loop": just after `sched_clock_init()`, near the end of
    /// `start_kernel()`.
    calibrate: Option<f64>,
    /// The first initcall starts.
    first_initcall: Option<f64>,
    /// Timekeeping leaves the jiffies clocksource.
    switch: Option<f64>,
    /// The last initcall returns.
    last_initcall_end: Option<f64>,
    /// "Run /init".
    run_init: Option<f64>,
    /// "Unpacking initramfs..." and "Freeing initrd memory".
    unpack_start: Option<f64>,
    unpack_end: Option<f64>,
    /// What the clock lost and was put back ([`ClockFix`]).
    clock_lost: Option<f64>,
    /// Time inside initcalls, summed (their [`Initcall::ms`]).
    in_initcalls: f64,
    initcalls: BTreeMap<String, Initcall>,
    /// In log order, up to "Run /init".
    gaps: Vec<Gap>,
}

/// A message shortened for a table, numbers kept (they tell the messages apart).
fn short(text: &str) -> String {
    const MAX: usize = 60;
    let text = text.trim();
    if text.chars().count() <= MAX {
        text.to_string()
    } else {
        let cut: String = text.chars().take(MAX - 3).collect();
        format!("{cut}...")
    }
}

fn analyze(lines: &[Line]) -> Breakdown {
    let fix = ClockFix::find(lines);
    let at = |ms: f64| fix.map_or(ms, |f| f.apply(ms));
    let estimated = |a: f64, b: f64| fix.is_some_and(|f| f.overlaps(a, b));
    let mut b = Breakdown {
        clock_lost: fix.map(|f| f.lost),
        ..Breakdown::default()
    };
    // Inside an initcall: the time between its messages is counted as the initcall's.
    let mut inside: Option<(String, f64)> = None;
    for (i, line) in lines.iter().enumerate() {
        let t = line.text.as_str();
        let ms = at(line.ms);
        if let Some(rest) = t.strip_prefix("kvm-clock: using sched offset of ") {
            // The kernel says "cycles" but prints kvm_clock_read(): ns since the VM was made.
            b.before_clock = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<f64>().ok())
                .map(|ns| ns / 1e6);
        } else if t.starts_with("Calibrating delay loop") {
            b.calibrate.get_or_insert(ms);
        } else if t.starts_with("clocksource: Switched to clocksource") {
            b.switch.get_or_insert(ms);
        } else if t.starts_with("Unpacking initramfs") {
            b.unpack_start = Some(ms);
        } else if t.starts_with("Freeing initrd memory") {
            b.unpack_end = Some(ms);
        } else if t.starts_with("Run /init as init process") {
            b.run_init.get_or_insert(ms);
        }
        if let Some(name) = initcall_start(t) {
            b.first_initcall.get_or_insert(ms);
            inside = Some((name.to_string(), line.ms));
        } else if let Some((name, took)) = initcall_end(t) {
            let started = inside.take().map_or(line.ms, |(_, at)| at);
            let jiffies = fix.filter(|f| started < f.end);
            let call = b.initcalls.entry(name.to_string()).or_default();
            call.measured += took;
            call.ms += took * jiffies.map_or(1.0, |f| f.stretch());
            call.on_jiffies |= jiffies.is_some();
            b.in_initcalls += took * jiffies.map_or(1.0, |f| f.stretch());
            b.last_initcall_end = Some(ms);
        }
        // Up to "Run /init": after it the time is husk-init's.
        if inside.is_none()
            && b.run_init.is_none()
            && let Some(next) = lines.get(i + 1)
            && initcall_end(&next.text).is_none()
        {
            b.gaps.push(Gap {
                label: format!("{} -> {}", short(t), short(&next.text)),
                ms: at(next.ms) - ms,
                estimated: estimated(line.ms, next.ms),
            });
        }
    }
    b
}

/// One boot: husk's host-side phases (ms since its process started) and the kernel's log.
struct Boot {
    /// `marker init-started`: husk-init's first instruction.
    init_started: f64,
    /// `first vCPU entry`.
    first_entry: Option<f64>,
    log: Vec<Line>,
}

/// Boots the image once with `husk vm boot --kernel-log`, keeping the log at `log_path`.
fn boot(
    husk: &Path,
    vmlinux: &Path,
    initrd: &Path,
    cmdline: &str,
    log_path: &Path,
) -> Result<Boot> {
    let out = Command::new(husk)
        .args(["vm", "boot", "--json", "--timeout", "600", "--kernel"])
        .arg(vmlinux)
        .arg("--initrd")
        .arg(initrd)
        .arg("--cmdline")
        .arg(cmdline)
        .arg("--kernel-log")
        .arg(log_path)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", husk.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "husk vm boot failed ({}): {stdout}",
        out.status
    );
    let json: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("husk vm boot's JSON: {stdout}"))?;
    let phase = |name: &str| {
        json["phases"]
            .as_array()?
            .iter()
            .find(|p| p["phase"] == name)?["ms"]
            .as_f64()
    };
    let Some(init_started) = phase("marker init-started") else {
        bail!("husk vm boot reported no init-started marker: {stdout}");
    };
    let log = std::fs::read_to_string(log_path)
        .with_context(|| format!("reading {}", log_path.display()))?;
    let log = parse_log(&log);
    ensure!(
        !log.is_empty(),
        "the guest kernel's log in {} is empty",
        log_path.display()
    );
    Ok(Boot {
        init_started,
        first_entry: phase("first vCPU entry"),
        log,
    })
}

/// The host's load average (1, 5, 15 min): the VM competes with it for the CPUs.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Runs `--runs` pairs of boots (without, then with `initcall_debug`) and prints the report.
pub(super) fn run(
    runs: usize,
    husk: &Path,
    vmlinux: &Path,
    initrd: &Path,
    cmdline_extra: &str,
) -> Result<()> {
    let logs = crate::workspace::root().join("target/bench-boot-initcalls");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let initrd_bytes = std::fs::metadata(initrd)
        .with_context(|| format!("reading {}", initrd.display()))?
        .len();
    let debug_cmdline = format!("{DEBUG_PARAMS} {cmdline_extra}");
    let plain_params = if cmdline_extra.trim().is_empty() {
        String::new()
    } else {
        format!(" with `{}`", cmdline_extra.trim())
    };
    println!(
        "{runs} run(s), each a plain boot{plain_params} and one with `{}`; kernel logs in {}",
        debug_cmdline.trim(),
        logs.display()
    );
    println!("load average before: {}", loadavg());
    let mut plain = Vec::new();
    let mut debug = Vec::new();
    for run in 1..=runs {
        let path = logs.join(format!("run{run}-plain.log"));
        let b = boot(husk, vmlinux, initrd, cmdline_extra, &path)?;
        println!(
            "  run {run}: plain:          init at {:>9.1} ms",
            b.init_started
        );
        plain.push(b);
        let path = logs.join(format!("run{run}-initcall_debug.log"));
        let b = boot(husk, vmlinux, initrd, &debug_cmdline, &path)?;
        println!(
            "  run {run}: initcall_debug: init at {:>9.1} ms",
            b.init_started
        );
        debug.push(b);
    }
    println!("load average after: {}", loadavg());
    print!("{}", report(&plain, &debug, initrd_bytes));
    Ok(())
}

/// The median of what `f` gives for the boots where it gives something.
fn median_of(boots: &[(&Boot, Breakdown)], f: impl Fn(&Boot, &Breakdown) -> Option<f64>) -> f64 {
    median(boots.iter().filter_map(|(boot, b)| f(boot, b)))
}

fn analyzed(boots: &[Boot]) -> Vec<(&Boot, Breakdown)> {
    boots.iter().map(|b| (b, analyze(&b.log))).collect()
}

/// A phase of the boot: its name and how to find it in one boot (`None`: this boot's log
/// cannot show it, e.g. initcalls without `initcall_debug`).
type Phase = (&'static str, fn(&Boot, &Breakdown) -> Option<f64>);

/// The phases, in order; those not indented add up to the host's time to husk-init's main.
/// The host's times count from husk's process start, which is within a millisecond or two of
/// KVM_CREATE_VM (the first thing `husk vm boot` does), where kvm-clock starts.
const PHASES: [Phase; 10] = [
    (
        "husk: process start -> first vCPU entry (host clock)",
        |boot, _| boot.first_entry,
    ),
    (
        "first vCPU entry -> kernel clock starts (kvm-clock init)",
        |boot, b| Some(b.before_clock? - boot.first_entry?),
    ),
    (
        "kernel clock 0 -> sched_clock_init (start_kernel)",
        |_, b| b.calibrate,
    ),
    (
        "sched_clock_init -> clocksource switch (fs initcall)",
        |_, b| Some(b.switch? - b.calibrate?),
    ),
    (
        "  of which to the first initcall (rest of start_kernel)~",
        |_, b| Some(b.first_initcall? - b.calibrate?),
    ),
    ("  of which the clock's loss, put back", |_, b| b.clock_lost),
    ("clocksource switch -> \"Run /init\"", |_, b| {
        Some(b.run_init? - b.switch?)
    }),
    ("  of which the last initcall -> \"Run /init\"", |_, b| {
        Some(b.run_init? - b.last_initcall_end?)
    }),
    ("\"Run /init\" -> husk-init's main", |boot, b| {
        Some(boot.init_started - b.before_clock? - b.run_init?)
    }),
    (
        "total: process start -> husk-init's main (host clock)",
        |boot, _| Some(boot.init_started),
    ),
];

/// The report: phases, initramfs, slowest initcalls, largest gaps.
fn report(plain: &[Boot], debug: &[Boot], initrd_bytes: u64) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let (plain, debug) = (analyzed(plain), analyzed(debug));
    // A phase a boot's log cannot show is "-".
    let cell = |ms: f64| {
        if ms.is_nan() {
            "-".to_string()
        } else {
            format!("{ms:.1}")
        }
    };
    let _ = writeln!(
        o,
        "\nWhere the boot goes (ms, medians of {} boots each; guest kernel clock unless noted; \
         ~ estimated)",
        debug.len()
    );
    let _ = writeln!(
        o,
        "{:<58} {:>10} {:>14}",
        "phase", "plain", "initcall_debug"
    );
    for (name, f) in PHASES {
        let _ = writeln!(
            o,
            "{name:<58} {:>10} {:>14}",
            cell(median_of(&plain, f)),
            cell(median_of(&debug, f))
        );
    }
    // Two more views of the same boot, outside the sum above.
    let _ = writeln!(
        o,
        "{:<58} {:>10} {:>14}",
        "(kernel clock 0 -> first initcall~)",
        "-",
        cell(median_of(&debug, |_, b| b.first_initcall))
    );
    let _ = writeln!(
        o,
        "{:<58} {:>10} {:>14}",
        "(time inside initcalls, summed~)",
        "-",
        cell(median_of(&debug, |_, b| b
            .first_initcall
            .map(|_| b.in_initcalls)))
    );

    let unpack = |b: &Breakdown| Some(b.unpack_end? - b.unpack_start?);
    let _ = writeln!(
        o,
        "\ninitramfs: {initrd_bytes} bytes ({:.2} MiB); \"Unpacking initramfs...\" -> \"Freeing \
         initrd memory\": plain {}, initcall_debug {} ms; populate_rootfs initcall {} ms",
        initrd_bytes as f64 / f64::from(1 << 20),
        cell(median_of(&plain, |_, b| unpack(b))),
        cell(median_of(&debug, |_, b| unpack(b))),
        cell(median_of(&debug, |_, b| b
            .initcalls
            .get("populate_rootfs")
            .map(|c| c.ms))),
    );

    // Per function: the estimates, the measurements, whether any was on the jiffies clock.
    let mut per_call: BTreeMap<&str, (Vec<f64>, Vec<f64>, bool)> = BTreeMap::new();
    for (_, b) in &debug {
        for (name, call) in &b.initcalls {
            let e = per_call.entry(name).or_default();
            e.0.push(call.ms);
            e.1.push(call.measured);
            e.2 |= call.on_jiffies;
        }
    }
    let mut calls: Vec<(&str, f64, f64, bool)> = per_call
        .into_iter()
        .map(|(name, (ms, measured, jiffies))| {
            (
                name,
                median(ms.into_iter()),
                median(measured.into_iter()),
                jiffies,
            )
        })
        .collect();
    calls.sort_by(|a, b| b.1.total_cmp(&a.1));
    let _ = writeln!(
        o,
        "\nslowest initcalls (ms, median; {} initcalls; ~ timed on the jiffies clock before the \
         clocksource switch, estimated from what it measured)",
        calls.len()
    );
    for (name, ms, measured, jiffies) in calls.iter().take(TOP) {
        if *jiffies {
            let _ = writeln!(o, "{ms:>10.1}~ {name} (measured {measured:.1})");
        } else {
            let _ = writeln!(o, "{ms:>10.1}  {name}");
        }
    }

    // Gaps matched across runs by their label with the numbers blanked out (a message's
    // numbers may differ between boots); shown with the first run's label.
    let key = |label: &str| -> String {
        label
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .collect()
    };
    let mut per_gap: BTreeMap<String, (String, Vec<f64>, bool)> = BTreeMap::new();
    for (_, b) in &debug {
        for gap in &b.gaps {
            let e = per_gap
                .entry(key(&gap.label))
                .or_insert_with(|| (gap.label.clone(), Vec::new(), false));
            e.1.push(gap.ms);
            e.2 |= gap.estimated;
        }
    }
    let mut gaps: Vec<(String, f64, bool)> = per_gap
        .into_values()
        .map(|(label, v, estimated)| (label, median(v.into_iter()), estimated))
        .collect();
    gaps.sort_by(|a, b| b.1.total_cmp(&a.1));
    let _ = writeln!(
        o,
        "\nlargest gaps between consecutive kernel messages outside initcalls (ms, median, \
         initcall_debug boots; ~ estimated)"
    );
    for (label, ms, estimated) in gaps.iter().take(TOP) {
        let mark = if *estimated { "~" } else { " " };
        let _ = writeln!(o, "{ms:>10.1}{mark} {label}");
    }
    o
}

#[cfg(test)]
mod tests;
