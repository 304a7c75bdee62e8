//! The memory figures of `bench startup`: idle containers (`sleep`) started with `husk run
//! --detach`, as many at once as there are cores, then per monitor at steady state its RSS and
//! PSS, the guest RAM the guest touched, and its CPU use over a quiet window.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::bench::{make_bundle, median, round};

/// The memory figures of idle containers.
#[derive(Debug)]
pub(super) struct Density {
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
        median(v.iter().map(|x| *x as f64))
    }

    /// Idle containers per GiB of host memory, from the median PSS.
    fn per_gib(&self) -> f64 {
        1048576.0 / self.median_pss_kib()
    }

    /// The median PSS of a monitor (VM included), KiB.
    pub(super) fn median_pss_kib(&self) -> f64 {
        Self::median(&self.pss_kib)
    }

    pub(super) fn json(&self) -> Value {
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

pub(super) fn print_memory(m: &Density) {
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
        median(m.idle_cpu_percent.iter().copied())
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

/// Starts `n` idle containers (`husk` run with `env`) and measures their memory at steady
/// state. `label` names this round's bundle, state root and ids in `work`, so that rounds
/// (from a template, cold) do not meet.
pub(super) fn measure_density(
    husk: &Path,
    env: &[(&str, &std::ffi::OsStr)],
    work: &Path,
    label: &str,
    n: usize,
) -> Result<Density> {
    let rootfs = work.join("bundle/rootfs");
    let bundle = make_bundle(
        &work.join(format!("bundle-idle-{label}")),
        &["/bin/sleep", "100000"],
        Some(&rootfs),
    )?;
    let idle = IdleContainers {
        husk,
        root: work.join(format!("husk-idle-root-{label}")),
        ids: (1..=n)
            .map(|i| format!("idle-{label}-{}-{i}", std::process::id()))
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
                    .envs(env.iter().copied())
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
pub(super) fn cpu_ticks(pid: u64) -> Result<u64> {
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

/// The guest RAM mapping of a monitor: the largest mapping that is anonymous (a booted VM's
/// memory) or of a template's memory file (a restored one's, copy on write); one per RAM
/// region, and below 3 GiB there is one. Returns (its size in MiB, its RSS in KiB: what the
/// guest touched, the template's page-cache pages included).
pub(super) fn guest_ram(pid: u64) -> Result<(u64, u64)> {
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
            let path = f.nth(4);
            current = path.is_none_or(|p| p.ends_with("/memory")).then_some(b - a);
            continue;
        }
        if let (Some(size), Some(rss)) = (current, line.strip_prefix("Rss:"))
            && best.is_none_or(|(s, _)| size > s)
        {
            let rss = rss.split_whitespace().next().unwrap_or("0").parse()?;
            best = Some((size, rss));
        }
    }
    let (size, rss) =
        best.with_context(|| format!("no guest memory mapping in /proc/{pid}/smaps"))?;
    Ok((size >> 20, rss))
}

/// A field of /proc/meminfo, KiB.
pub(super) fn meminfo(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
