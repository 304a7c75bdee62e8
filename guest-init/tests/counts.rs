//! How many system calls and page faults husk-init's work on a container costs, per phase:
//! what `cargo xtask bench counts` reports next to runc's and crun's (issue 21). Ignored in a
//! plain `cargo test`: the benchmark runs it (`--ignored`), and it needs root and strace.
//!
//! husk-init runs here as a host process (`--connect unix:`, as in `engine.rs`), building the
//! same container it builds in the VM: the counts are of its code, not of a machine's speed,
//! and counting needs no tracing in the guest kernel. Two runs of each scenario: one under
//! `strace -f -ttt` for the system calls (every process husk-init starts included), one
//! without for the page faults, read from `/proc/PID/stat` (husk-init's own, its reaped
//! children's, and the live container process's) at each phase boundary.
//!
//! Phases, as the guest's boot markers cut them:
//! - `create`: `Create` sent until `Created` answered (spec-received → container-created);
//! - `start`: `Start` sent until answered (→ process-started);
//! - `run`: until the container's process (`true`) has exited and been reaped
//!   (→ process-exited);
//! - `exec`: in a running container, `Exec` of `true` sent until its exit is reported.

mod common;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{Host, Options, Want, config, skip_unless_root};
use husk_proto::{ContainerRef, ExecId, ProcessRef, Request, WaitStatus};
use serde_json::{Value, json};

/// Seconds since the epoch: the clock strace's `-ttt` timestamps use.
fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs_f64()
}

/// Minor and major page faults of `pid` and of its reaped children (fields 10–13 of
/// `/proc/PID/stat`); zero when it is gone.
fn faults(pid: u32) -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0, 0);
    };
    // The fields after the command name, which may hold spaces, in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // minflt, cminflt, majflt, cmajflt are fields 10 to 13; `f[0]` is field 4.
    (f[6] + f[7], f[8] + f[9])
}

/// The page faults so far of husk-init and the processes it runs: its own and its reaped
/// children's, and those of `live` processes (created, not yet reaped).
fn faults_now(husk_init: u32, live: &[u32]) -> (u64, u64) {
    [husk_init]
        .iter()
        .chain(live)
        .map(|&p| faults(p))
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
}

/// One phase boundary: the time, and the faults until then.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: f64,
    minor: u64,
    major: u64,
}

fn mark(h: &Host, live: &[u32]) -> Mark {
    let (minor, major) = faults_now(h.pid(), live);
    Mark {
        at: now(),
        minor,
        major,
    }
}

/// The system calls in strace's `-f -ttt` output `trace` that began in `[from, to)`: lines
/// `PID SECONDS name(...`, an unfinished call counted where it began, its `<... resumed>`
/// not again; signals and exits are not calls.
fn syscalls_between(trace: &str, from: f64, to: f64) -> u64 {
    let mut n = 0;
    for line in trace.lines() {
        // strace pads the pid: `1234  100.5 read(...`.
        let Some((_pid, rest)) = line.trim_start().split_once(' ') else {
            continue;
        };
        let Some((at, call)) = rest.trim_start().split_once(' ') else {
            continue;
        };
        let Ok(at) = at.parse::<f64>() else { continue };
        let is_call = call.split_once('(').is_some_and(|(name, _)| {
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        });
        if is_call && at >= from && at < to {
            n += 1;
        }
    }
    n
}

/// The container `true` of the runtime benchmarks: created, started, run to its exit. The
/// marks at the phase boundaries.
fn run_true(h: &mut Host) -> Vec<(&'static str, Mark, Mark)> {
    let cfg = config(&["true"]);
    let before_create = mark(h, &[]);
    let (pid, _io) = h
        .create(&cfg, Want::OUTPUT)
        .unwrap_or_else(|e| panic!("Create: {e}"));
    let created = mark(h, &[pid]);
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    let started = mark(h, &[pid]);
    let status = h.wait_exit(ProcessRef::Init(ContainerRef::FIRST));
    assert_eq!(status, WaitStatus::Exited(0), "true's status");
    let exited = mark(h, &[]);
    vec![
        ("create", before_create, created),
        ("start", created, started),
        ("run", started, exited),
    ]
}

/// `true` exec'd in a running container, until its exit is reported.
fn exec_true(h: &mut Host) -> Vec<(&'static str, Mark, Mark)> {
    let (pid, _io) = h
        .create(&config(&["sleep", "1000"]), Want::OUTPUT)
        .unwrap_or_else(|e| panic!("Create: {e}"));
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    let before = mark(h, &[pid]);
    let process =
        json!({"args": ["true"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    let (_, _io) = h
        .exec(1, &process, Want::OUTPUT)
        .unwrap_or_else(|e| panic!("Exec: {e}"));
    let status = h.wait_exit(ProcessRef::Exec(ExecId(1)));
    assert_eq!(status, WaitStatus::Exited(0), "exec'd true's status");
    let after = mark(h, &[pid]);
    vec![("exec", before, after)]
}

/// A husk-init past the handshake with a cgroup v2 root (as in the VM), under strace when
/// `trace` is given.
fn host(trace: Option<&Path>) -> Host {
    Host::start_with(Options {
        cgroup: true,
        trace: trace.map(Path::to_path_buf),
    })
}

/// One scenario twice: under strace for the calls, then alone for the faults.
fn count(scenario: fn(&mut Host) -> Vec<(&'static str, Mark, Mark)>) -> Vec<Value> {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = dir.path().join("strace.out");
    let traced = {
        let mut h = host(Some(&trace));
        let marks = scenario(&mut h);
        // husk-init ends when the host goes; strace then finishes its file.
        h.close_control();
        h.wait_husk_exit();
        marks
    };
    let text = std::fs::read_to_string(&trace).expect("reading strace's output");
    let untraced = {
        let mut h = host(None);
        scenario(&mut h)
    };
    traced
        .iter()
        .zip(&untraced)
        .map(|((name, from, to), (_, f, t))| {
            json!({
                "phase": name,
                "syscalls": syscalls_between(&text, from.at, to.at),
                "minor_faults": t.minor - f.minor,
                "major_faults": t.major - f.major,
                "ms": (t.at - f.at) * 1000.0,
            })
        })
        .collect()
}

#[test]
#[ignore = "a benchmark: `cargo xtask bench counts` runs it"]
fn counts_per_phase() {
    if skip_unless_root() {
        return;
    }
    let mut phases = count(run_true);
    phases.extend(count(exec_true));
    let out = json!({ "husk-init": phases });
    println!("HUSK_COUNTS {out}");
    if let Some(file) = std::env::var_os("HUSK_COUNTS_OUT") {
        std::fs::write(file, out.to_string()).expect("writing HUSK_COUNTS_OUT");
    }
}

#[test]
fn strace_lines_are_counted_once_where_they_began() {
    let trace = "\
10 100.5 execve(\"/bin/true\", [\"true\"], 0x7ffd /* 1 vars */) = 0
10 101.0 read(3,  <unfinished ...>
11 101.2 +++ exited with 0 +++
10 101.5 <... read resumed>\"x\", 1) = 1
10 101.6 --- SIGCHLD {si_signo=SIGCHLD} ---
10 102.0 exit_group(0) = ?
";
    assert_eq!(syscalls_between(trace, 100.0, 101.9), 2);
    assert_eq!(syscalls_between(trace, 101.1, 103.0), 1);
    assert_eq!(syscalls_between(trace, 0.0, 100.0), 0);
}
