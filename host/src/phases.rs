//! Startup phases: the timestamps husk records so that `cargo xtask bench startup` can say
//! where each millisecond of `husk run` goes.
//!
//! Off unless the environment variable `HUSK_PHASES` names a file. Then every husk process of a
//! container's life (the CLI and the monitor it spawns, which inherits the variable) appends
//! one JSON line per phase to that file:
//!
//! ```text
//! {"phase":"cli-start","mono_ns":1234567890123,"pid":4242}
//! ```
//!
//! `mono_ns` is `CLOCK_MONOTONIC` in nanoseconds, one clock for every process on the host, so
//! lines from the CLI and the monitor can be subtracted from each other. Lines are appended with
//! `O_APPEND` (each one write, well under `PIPE_BUF`), so processes do not interleave. Each
//! process opens the file once, at its first phase: the monitor keeps writing to it from its
//! jail, where the file is not (and, under `--monitor-uid`, could not be opened). Phases the
//! monitor learns only when the VM has ended (first vCPU entry, the guest's boot markers) are
//! written then, with the time they happened.
//!
//! The phases of `husk run`, in the order they happen (each causally follows the one before):
//!
//! | phase | recorded by | when |
//! |---|---|---|
//! | `cli-start` | CLI | `main` entered (also for every other command but `monitor`) |
//! | `monitor-start` | monitor | its `main` entered (spawned by `create`) |
//! | `monitor-confined` | monitor | share, network and hooks set up, jail entered |
//! | `vm-created` | monitor | memory, kernel, devices and vCPUs set up; about to run |
//! | `first-vcpu-entry` | monitor | the boot vCPU's first `KVM_RUN` |
//! | `init-started` | guest marker | husk-init's `main`: the kernel has booted |
//! | `host-connected` | guest marker | the control connection's handshake is done |
//! | `spec-received` | guest marker | the create request arrived |
//! | `container-created` | guest marker | the container is built, waiting for start |
//! | `create-returned` | CLI | the monitor reported "created" |
//! | `process-started` | guest marker | the container's process was exec'd |
//! | `process-exited` | guest marker | it exited |
//! | `process-exit-seen` | monitor | its exit status reached the host |
//! | `power-off` | guest marker | husk-init finished; the VM may stop |
//! | `vm-torn-down` | monitor | every VM thread is joined |
//! | `monitor-exit` | monitor | about to exit with the container's status |
//! | `cli-exit` | CLI | about to exit (`run`: after deleting the state) |
//!
//! Besides: `start-returned` (CLI; not in the chain because a short process may end before
//! `start` returns). A pod's later container (a *member*, `crate::monitor::member`) has no VM
//! of its own: its `create` records `cli-start`, `monitor-start` (the member process),
//! `member-placed` (hooks run, its rootfs and mounts attached to the pod's share),
//! `member-added` (the sandbox's monitor replied: husk-init built the container in the VM),
//! `create-returned` and `cli-exit`; the guest markers are the sandbox's only. Guest markers
//! are timestamped by the monitor when the vCPU exits on the marker port. `cargo xtask bench
//! startup` and `cargo xtask bench pod` read this file.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

/// The environment variable naming the phase file.
pub const ENV: &str = "HUSK_PHASES";

/// Where phases go, and how to turn an [`Instant`] into `CLOCK_MONOTONIC` nanoseconds.
struct Recorder {
    /// The phase file, opened for appending (`None` if it could not be).
    file: Option<std::fs::File>,
    anchor: Instant,
    anchor_ns: u64,
}

fn recorder() -> Option<&'static Recorder> {
    static RECORDER: OnceLock<Option<Recorder>> = OnceLock::new();
    RECORDER
        .get_or_init(|| {
            let path = std::env::var_os(ENV).filter(|p| !p.is_empty())?;
            // Read both clocks back to back: std's Instant is CLOCK_MONOTONIC on Linux, so the
            // anchor converts any Instant of this process with the error of these two calls.
            let anchor = Instant::now();
            let anchor_ns = monotonic_ns();
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok();
            Some(Recorder {
                file,
                anchor,
                anchor_ns,
            })
        })
        .as_ref()
}

fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    let secs = u64::try_from(now.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec()).unwrap_or(0);
    secs * 1_000_000_000 + nanos
}

/// The descriptor of the phase file, if this process opened it (kept by whatever closes
/// inherited descriptors).
pub fn fd() -> Option<std::os::fd::RawFd> {
    use std::os::fd::AsRawFd;
    recorder()?.file.as_ref().map(AsRawFd::as_raw_fd)
}

/// Whether phases are being recorded (callers skip gathering what would not be written).
pub fn enabled() -> bool {
    recorder().is_some()
}

/// Records that `phase` happened at `at`. Failures to write are ignored: timing must never
/// change what the runtime does.
pub fn record(phase: &str, at: Instant) {
    let Some(r) = recorder() else { return };
    let ns = if at >= r.anchor {
        r.anchor_ns
            .saturating_add(u64::try_from(at.duration_since(r.anchor).as_nanos()).unwrap_or(0))
    } else {
        r.anchor_ns
            .saturating_sub(u64::try_from(r.anchor.duration_since(at).as_nanos()).unwrap_or(0))
    };
    let line = format!(
        "{{\"phase\":{},\"mono_ns\":{ns},\"pid\":{}}}\n",
        serde_json::Value::from(phase),
        crate::pid::host_pid()
    );
    if let Some(mut f) = r.file.as_ref() {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Records that `phase` happens now.
pub fn record_now(phase: &str) {
    record(phase, Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the recorder reads the environment once per process.
    #[test]
    fn lines_are_json_with_monotonic_times_in_order() {
        let dir = std::env::temp_dir().join(format!("husk-phases-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("phases.jsonl");
        // SAFETY: set before any other thread of this test binary reads HUSK_PHASES (only
        // this test does), and the variable is not read concurrently by libc.
        unsafe { std::env::set_var(ENV, &file) };
        let before = Instant::now();
        let start_ns = monotonic_ns();
        record_now("cli-start");
        record(
            "earlier",
            before
                .checked_sub(std::time::Duration::from_millis(5))
                .unwrap(),
        );
        record("with \"quotes\"", Instant::now());
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["phase"], "cli-start");
        assert_eq!(lines[0]["pid"], std::process::id());
        assert_eq!(lines[2]["phase"], "with \"quotes\"");
        let ns = |i: usize| lines[i]["mono_ns"].as_u64().unwrap();
        // Within a millisecond of the clock read around it, and in the order of the Instants.
        assert!(ns(0).abs_diff(start_ns) < 1_000_000, "{text}");
        assert!(ns(1) + 4_000_000 < ns(0), "{text}");
        assert!(ns(2) >= ns(0));
    }
}
