//! husk's side of a pod: every `husk` command the runc shim ran, with the phases it recorded.
//!
//! The husk runtime handler runs [`Recorder::wrapper`], a shell script that execs husk with
//! `HUSK_PHASES` naming a file of its own per call (`<pid>.jsonl`, the command line beside it
//! in `<pid>.args`), so that each command's phases, and those of the monitor or member it
//! starts (they inherit the variable), can be told apart. After a pod is gone (its monitor
//! writes the VM's phases when the VM ends) [`Recorder::take`] reads and removes them, and
//! [`breakdown`] places them in the CRI calls that caused them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::bench::startup::phase_lines;

/// The phases of the sandbox's `husk create` in causal order, each with what the time up to
/// it was spent on (host/src/phases.rs). A VM restored from a template has no `init-started`.
const SANDBOX_CHAIN: [(&str, &str); 11] = [
    ("cli-start", ""),
    ("monitor-start", "the CLI spawns the monitor"),
    ("monitor-confined", "share, network, jail"),
    (
        "vm-created",
        "VM restored from the template, or set up to boot",
    ),
    ("first-vcpu-entry", ""),
    ("init-started", "the kernel boots: NO TEMPLATE"),
    ("host-connected", "the guest runs, husk-init connects"),
    ("spec-received", ""),
    ("container-created", "husk-init builds the pause container"),
    ("create-returned", ""),
    ("cli-exit", ""),
];

/// The phases of a later container's `husk create` (a member of the sandbox's VM).
const MEMBER_CHAIN: [(&str, &str); 6] = [
    ("cli-start", ""),
    ("monitor-start", "the CLI spawns the member"),
    (
        "member-placed",
        "hooks; rootfs and mounts into the pod's share",
    ),
    ("member-added", "husk-init builds the container in the VM"),
    ("create-returned", ""),
    ("cli-exit", ""),
];

/// Where the wrapper's files go, and the wrapper itself.
#[derive(Debug)]
pub struct Recorder {
    dir: PathBuf,
    /// The script the `husk` runtime handler runs.
    pub wrapper: PathBuf,
}

impl Recorder {
    /// Writes the wrapper of `husk` into `work`, its calls to be recorded in `work/calls`.
    pub fn new(work: &Path, husk: &Path) -> Result<Recorder> {
        let dir = work.join("calls");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for p in [&dir, husk] {
            ensure!(
                !p.to_string_lossy().contains('\''),
                "{}: a path with a single quote cannot go into the wrapper script",
                p.display()
            );
        }
        let wrapper = work.join("husk-recorded");
        // noclobber: a pid reused within one pod gets a file of its own, not another's.
        let script = format!(
            "#!/bin/sh\n\
             # cargo xtask bench pod: husk with its phases recorded, one file per call.\n\
             d='{dir}'\n\
             n=$$\n\
             set -C\n\
             {{ printf '%s\\n' \"$@\" > \"$d/$n.args\"; }} 2>/dev/null || {{\n\
             \x20 n=$$-$(date +%s%N); printf '%s\\n' \"$@\" > \"$d/$n.args\"; }}\n\
             HUSK_PHASES=\"$d/$n.jsonl\" exec '{husk}' \"$@\"\n",
            dir = dir.display(),
            husk = husk.display(),
        );
        std::fs::write(&wrapper, script)
            .with_context(|| format!("writing {}", wrapper.display()))?;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", wrapper.display()))?;
        Ok(Recorder { dir, wrapper })
    }

    /// Every call recorded since the last `take`, in the order they started; their files
    /// removed.
    pub fn take(&self) -> Result<Vec<Call>> {
        let mut calls = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?;
        for e in entries {
            let path = e?.path();
            if path.extension().is_none_or(|x| x != "args") {
                continue;
            }
            let args = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let phases_file = path.with_extension("jsonl");
            // A command that failed before its first phase has none.
            let phases = std::fs::read_to_string(&phases_file).unwrap_or_default();
            calls.push(
                Call::parse(&args, &phases)
                    .with_context(|| format!("the husk call recorded in {}", path.display()))?,
            );
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(&phases_file);
        }
        calls.sort_by_key(|c| c.at("cli-start").unwrap_or(u64::MAX));
        Ok(calls)
    }
}

/// One `husk` command and the phases it (and a monitor or member it spawned) recorded.
#[derive(Debug, Clone)]
pub struct Call {
    /// Its command line (without the program).
    pub args: Vec<String>,
    /// The subcommand (`create`, `start`, `state`, ...).
    pub verb: String,
    /// Each phase, when (CLOCK_MONOTONIC ns) and which process recorded it, in file order.
    phases: Vec<(String, u64, u64)>,
}

impl Call {
    /// A call from its `.args` file (one argument a line) and its phase file (JSON lines).
    fn parse(args: &str, phases: &str) -> Result<Call> {
        let args: Vec<String> = args.lines().map(String::from).collect();
        let mut verb = None;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                // husk's global options that take a value.
                "--root" | "--log" | "--log-format" | "--monitor-uid" => {
                    it.next();
                }
                a if a.starts_with('-') => {}
                a => {
                    verb = Some(a.to_string());
                    break;
                }
            }
        }
        Ok(Call {
            verb: verb.unwrap_or_else(|| "(none)".into()),
            args,
            phases: phase_lines(phases)?,
        })
    }

    /// When `phase` was recorded (CLOCK_MONOTONIC ns): by the command itself where it did
    /// (husk commands that it or its monitor runs record their own `cli-start` and `cli-exit`
    /// in the same file), else first by any process.
    pub fn at(&self, phase: &str) -> Option<u64> {
        // The command's own pid: the first line is its `cli-start`.
        let own = self.phases.first().map(|(_, _, pid)| *pid);
        let mut matching = self.phases.iter().filter(|(p, _, _)| p == phase);
        let first = matching.clone().next();
        matching
            .find(|(_, _, pid)| Some(*pid) == own)
            .or(first)
            .map(|(_, t, _)| *t)
    }

    /// Whether its VM booted a kernel (a `create` of a VM that had no template).
    pub fn booted_cold(&self) -> bool {
        self.at("init-started").is_some()
    }

    /// Whether `id` is one of its arguments.
    fn names(&self, id: &str) -> bool {
        self.args.iter().any(|a| a == id)
    }

    /// The CLI's own wall time (`cli-start` → `cli-exit`), ms.
    fn wall(&self) -> Option<f64> {
        Some(ms(self.at("cli-start")?, self.at("cli-exit")?))
    }
}

/// Milliseconds from `a` to `b` (CLOCK_MONOTONIC ns).
pub fn ms(a: u64, b: u64) -> f64 {
    (b as f64 - a as f64) / 1e6
}

/// One interval of a pod's life: a CRI call (or what the harness waits for), from..to in
/// CLOCK_MONOTONIC ns.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Its name in the tables.
    pub name: &'static str,
    /// When it began.
    pub from: u64,
    /// When it ended.
    pub to: u64,
}

/// Where husk's time went in one pod: for each step, the husk commands that started in it
/// (their wall time; a `create`'s phases below it) and the rest of the step (containerd, the
/// shim, CNI). Rows are `(level, label, ms)`; `ids` names the sandbox and the containers, in
/// order, for the labels.
pub fn breakdown(steps: &[Step], calls: &[Call], ids: &[(&str, &str)]) -> Vec<(u8, String, f64)> {
    let role = |c: &Call| -> &str {
        ids.iter()
            .find(|(_, id)| c.names(id))
            .map_or("other", |(role, _)| role)
    };
    let mut rows = Vec::new();
    for step in steps {
        rows.push((0, step.name.to_string(), ms(step.from, step.to)));
        let inside: Vec<&Call> = calls
            .iter()
            .filter(|c| {
                c.at("cli-start")
                    .is_some_and(|t| (step.from..step.to).contains(&t))
            })
            .collect();
        let mut husk_ms = 0.0;
        // One row per command and container; several calls of one kind are summed.
        let mut kinds: Vec<(String, f64, usize, Option<&Call>)> = Vec::new();
        for c in &inside {
            let Some(wall) = c.wall() else { continue };
            husk_ms += wall;
            let label = format!("husk {} ({})", c.verb, role(c));
            match kinds.iter_mut().find(|k| k.0 == label) {
                Some(k) => {
                    k.1 += wall;
                    k.2 += 1;
                }
                None => kinds.push((label, wall, 1, Some(c))),
            }
        }
        for (label, wall, n, first) in kinds {
            let label = if n > 1 {
                format!("{label}, {n} calls")
            } else {
                label
            };
            rows.push((1, label, wall));
            let Some(c) = first.filter(|c| c.verb == "create" && n == 1) else {
                continue;
            };
            let chain: &[(&str, &str)] = if role(c) == "sandbox" {
                &SANDBOX_CHAIN
            } else {
                &MEMBER_CHAIN
            };
            let present: Vec<(&str, &str, u64)> = chain
                .iter()
                .filter_map(|(p, what)| Some((*p, *what, c.at(p)?)))
                .collect();
            for w in present.windows(2) {
                let ((from, _, a), (to, what, b)) = (w[0], w[1]);
                let what = if what.is_empty() {
                    String::new()
                } else {
                    format!(" ({what})")
                };
                rows.push((2, format!("{from} → {to}{what}"), ms(a, b)));
            }
        }
        if !inside.is_empty() {
            rows.push((
                1,
                "not in husk (containerd, shim, CNI)".into(),
                ms(step.from, step.to) - husk_ms,
            ));
        }
    }
    rows
}

/// The calls of one pod as JSON: each command, the container it named, and when it ran (ms
/// from `origin`).
pub fn calls_json(calls: &[Call], origin: u64, ids: &[(&str, &str)]) -> Value {
    json!(
        calls
            .iter()
            .map(|c| {
                let role = ids
                    .iter()
                    .find(|(_, id)| c.names(id))
                    .map_or("other", |(r, _)| r);
                let rel = |p: &str| c.at(p).map(|t| (ms(origin, t) * 1000.0).round() / 1000.0);
                json!({
                    "verb": c.verb,
                    "container": role,
                    "cli_start_ms": rel("cli-start"),
                    "cli_exit_ms": rel("cli-exit"),
                    "phases_ms": c.phases.iter().map(|(p, t, pid)| {
                        json!({"phase": p, "at_ms": (ms(origin, *t) * 1000.0).round() / 1000.0, "pid": pid})
                    }).collect::<Vec<_>>(),
                })
            })
            .collect::<Vec<_>>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(p: &str, ms: u64) -> String {
        format!(
            "{{\"phase\":\"{p}\",\"mono_ns\":{},\"pid\":1}}\n",
            ms * 1_000_000
        )
    }

    #[test]
    fn the_wrapper_records_each_call_apart() {
        let work = std::env::temp_dir().join(format!("xtask-pod-calls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        // A stand-in for husk: records one phase, echoes its arguments.
        let fake = work.join("fake-husk");
        std::fs::write(
            &fake,
            "#!/bin/sh\nprintf '{\"phase\":\"cli-start\",\"mono_ns\":7,\"pid\":1}\\n' >> \"$HUSK_PHASES\"\necho \"$@\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let rec = Recorder::new(&work, &fake).unwrap();
        for id in ["a", "b"] {
            let out = std::process::Command::new(&rec.wrapper)
                .args(["--root", "/r", "create", "--bundle", "/b b", id])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                format!("--root /r create --bundle /b b {id}")
            );
        }
        let calls = rec.take().unwrap();
        assert_eq!(calls.len(), 2);
        for c in &calls {
            assert_eq!(c.verb, "create");
            assert_eq!(c.at("cli-start"), Some(7));
            assert!(c.names("/b b"));
        }
        assert!(rec.take().unwrap().is_empty(), "take removes what it read");
        let _ = std::fs::remove_dir_all(&work);
    }

    #[test]
    fn the_verb_comes_after_the_global_options() {
        let c = Call::parse(
            "--root\n/run/x\n--log\n/l\n--log-format\njson\n--debug\ncreate\n--bundle\n/b\nsb1\n",
            "",
        )
        .unwrap();
        assert_eq!(c.verb, "create");
        assert!(c.names("sb1"));
        assert!(!c.names("sb"));
        assert!(Call::parse("create\n", "not json\n").is_err());
        // A husk command that the monitor runs writes to the same file: the command's own
        // phases are the ones of the first line's pid.
        let nested = "{\"phase\":\"cli-start\",\"mono_ns\":1,\"pid\":10}\n\
             {\"phase\":\"cli-start\",\"mono_ns\":2,\"pid\":12}\n\
             {\"phase\":\"cli-exit\",\"mono_ns\":3,\"pid\":12}\n\
             {\"phase\":\"cli-exit\",\"mono_ns\":9,\"pid\":10}\n";
        let c = Call::parse("create\nx\n", nested).unwrap();
        assert_eq!((c.at("cli-start"), c.at("cli-exit")), (Some(1), Some(9)));
    }

    #[test]
    fn calls_are_placed_in_their_steps_and_the_rest_is_the_engines() {
        let mut sandbox = String::new();
        for (i, (p, _)) in SANDBOX_CHAIN.iter().enumerate() {
            if *p != "init-started" {
                sandbox += &line(p, 100 + 10 * i as u64);
            }
        }
        let calls = vec![
            Call::parse("create\nsb\n", &sandbox).unwrap(),
            Call::parse(
                "start\nsb\n",
                &(line("cli-start", 200) + &line("cli-exit", 205)),
            )
            .unwrap(),
            Call::parse(
                "create\nc1\n",
                &(line("cli-start", 300)
                    + &line("monitor-start", 301)
                    + &line("member-placed", 310)
                    + &line("member-added", 350)
                    + &line("create-returned", 351)
                    + &line("cli-exit", 352)),
            )
            .unwrap(),
        ];
        let step = |name, from: u64, to: u64| Step {
            name,
            from: from * 1_000_000,
            to: to * 1_000_000,
        };
        let steps = [
            step("RunPodSandbox", 50, 250),
            step("CreateContainer 1", 250, 400),
        ];
        let rows = breakdown(&steps, &calls, &[("sandbox", "sb"), ("container 1", "c1")]);
        let get = |label: &str| {
            rows.iter()
                .find(|r| r.1 == label)
                .unwrap_or_else(|| panic!("no {label} in {rows:?}"))
                .2
        };
        assert_eq!(get("RunPodSandbox"), 200.0);
        assert_eq!(get("husk create (sandbox)"), 100.0);
        assert!(!calls[0].booted_cold());
        assert_eq!(get("husk start (sandbox)"), 5.0);
        assert_eq!(
            get("monitor-confined → vm-created (VM restored from the template, or set up to boot)"),
            10.0
        );
        assert_eq!(
            get("first-vcpu-entry → host-connected (the guest runs, husk-init connects)"),
            20.0
        );
        assert_eq!(get("husk create (container 1)"), 52.0);
        assert_eq!(
            get("member-placed → member-added (husk-init builds the container in the VM)"),
            40.0
        );
        let rest: Vec<f64> = rows
            .iter()
            .filter(|r| r.1.starts_with("not in husk"))
            .map(|r| r.2)
            .collect();
        assert_eq!(rest, vec![95.0, 98.0]);
    }
}
