//! Compiles `filters/<arch>-<env>.json` into one BPF program per thread and mode, written to
//! `OUT_DIR` as raw little-endian `sock_filter` records (8 bytes each) that `src/lib.rs`
//! embeds with `include_bytes!`.
//!
//! Before compiling, the JSON is held to the rules the crate relies on; a violation fails the
//! build, so an empty or permissive filter can never ship:
//! - the filter names are exactly the thread kinds plus the companions `openat_eacces` and
//!   `clone3_enosys`;
//! - a thread filter allows on match and kills the process otherwise, and has rules;
//! - a companion answers its one syscall with its errno (`openat`: EACCES, `clone3`: ENOSYS)
//!   and allows everything else;
//! - every rule carries a non-empty `comment` saying who needs the syscall;
//! - a syscall is not listed both with and without argument conditions in one filter
//!   (seccompiler would silently keep only the conditional rules);
//! - the value `"own_tgid"` (the installing process's own pid, known only then) is only
//!   compared for equality, as a 32-bit value. It is compiled as [`OWN_TGID`], a number no
//!   pid can be, which must come out of seccompiler only in the comparisons it was given for;
//!   `src/lib.rs` puts the pid there when it installs the filter.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::{env, fs};

use seccompiler::{BpfProgram, TargetArch};
use serde_json::{Value, json};

/// The thread filters, by name; `src/lib.rs` embeds `<name>.<mode>.bpf` for each.
const THREADS: [&str; 8] = [
    "vmm", "vcpu", "vm_wait", "monitor", "guest", "commands", "relay", "member",
];
/// Stacked under thread filters, in both modes: (name, its one syscall, the errno it answers).
const COMPANIONS: [(&str, &str, u64); 2] = [
    ("openat_eacces", "openat", 13),
    ("clone3_enosys", "clone3", 38),
];
/// What `"own_tgid"` is compiled as: above any pid (pid_max is at most 2^22).
const OWN_TGID: u32 = 0x4f57_4e54;
/// A `BPF_JMP | BPF_JEQ | BPF_K` instruction: how seccompiler compares an argument.
const BPF_JEQ_K: u16 = 0x15;

fn main() {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let target_env = env::var("CARGO_CFG_TARGET_ENV").expect("cargo sets CARGO_CFG_TARGET_ENV");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    // The syscalls a thread makes depend on the libc (malloc, thread exit, abort) as much as
    // on the architecture, so each (arch, libc) pair has its own, reviewed, file.
    let path = manifest.join(format!("filters/{arch}-{target_env}.json"));
    println!("cargo::rerun-if-changed={}", path.display());
    println!("cargo::rerun-if-changed=build.rs");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "no seccomp filters for target {arch}-{target_env}: {}: {e}. \
             Write one by starting from a supported target and checking every thread's \
             syscalls with the log mode (see the crate docs).",
            path.display()
        )
    });
    let target = TargetArch::try_from(arch.as_str())
        .unwrap_or_else(|e| panic!("seccompiler does not support {arch}: {e:?}"));

    let mut filters: BTreeMap<String, Value> =
        serde_json::from_str(&text).unwrap_or_else(|e| fail(&path, &format!("bad JSON: {e}")));
    check(&path, &filters);
    let own_tgid = fill_in_own_tgid(&path, &mut filters);
    fs::write(
        out.join("own_tgid.rs"),
        format!(
            "/// What `\"own_tgid\"` of the filter file is compiled as (see build.rs).\n\
             pub(crate) const OWN_TGID: u32 = {OWN_TGID:#x};\n"
        ),
    )
    .unwrap_or_else(|e| panic!("cannot write own_tgid.rs: {e}"));

    write_programs(&out, &path, &filters, target, "enforce", &own_tgid);
    // The diagnostic mode: the same rules, but a syscall outside them is logged and allowed.
    for name in THREADS {
        filters.get_mut(name).expect("checked")["mismatch_action"] = json!("log");
    }
    write_programs(&out, &path, &filters, target, "log", &own_tgid);
}

/// Replaces every `"own_tgid"` value by [`OWN_TGID`]; returns how many each filter has.
fn fill_in_own_tgid(path: &Path, filters: &mut BTreeMap<String, Value>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (name, filter) in filters.iter_mut() {
        let mut count = 0;
        let rules = filter["filter"].as_array_mut().expect("checked");
        for arg in rules
            .iter_mut()
            .filter_map(|r| r.get_mut("args").and_then(Value::as_array_mut))
            .flatten()
        {
            if arg["val"] != "own_tgid" {
                continue;
            }
            if arg["op"] != "eq" || arg["type"] != "dword" {
                fail(
                    path,
                    &format!("{name}: own_tgid is only compared with op eq, type dword"),
                );
            }
            arg["val"] = json!(OWN_TGID);
            count += 1;
        }
        counts.insert(name.clone(), count);
    }
    counts
}

/// Compiles `filters` and writes each program as `<name>.<mode>.bpf` into `out`.
fn write_programs(
    out: &Path,
    path: &Path,
    filters: &BTreeMap<String, Value>,
    target: TargetArch,
    mode: &str,
    own_tgid: &BTreeMap<String, usize>,
) {
    let json = serde_json::to_vec(filters).expect("a Value map serialises");
    let programs = seccompiler::compile_from_json(json.as_slice(), target).unwrap_or_else(|e| {
        fail(
            path,
            &format!("seccompiler rejected the {mode} filters: {e}"),
        )
    });
    for (name, program) in &programs {
        let placeholders = program.iter().filter(|i| i.k == OWN_TGID).count();
        let comparisons = program
            .iter()
            .filter(|i| i.k == OWN_TGID && i.code == BPF_JEQ_K)
            .count();
        if placeholders != comparisons || comparisons != own_tgid[name] {
            fail(
                path,
                &format!(
                    "{name} ({mode}): own_tgid came out as {placeholders} instructions, \
                     {comparisons} of them comparisons, for {} conditions",
                    own_tgid[name]
                ),
            );
        }
        let file = out.join(format!("{name}.{mode}.bpf"));
        fs::write(&file, encode(program))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
    }
}

/// Raw little-endian `struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }` records.
fn encode(program: &BpfProgram) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(program.len() * 8);
    for insn in program {
        bytes.extend_from_slice(&insn.code.to_le_bytes());
        bytes.push(insn.jt);
        bytes.push(insn.jf);
        bytes.extend_from_slice(&insn.k.to_le_bytes());
    }
    bytes
}

fn check(path: &Path, filters: &BTreeMap<String, Value>) {
    let expected: BTreeSet<&str> = THREADS
        .iter()
        .copied()
        .chain(COMPANIONS.iter().map(|(name, _, _)| *name))
        .collect();
    let found: BTreeSet<&str> = filters.keys().map(String::as_str).collect();
    if found != expected {
        fail(
            path,
            &format!("filters must be exactly {expected:?}, found {found:?}"),
        );
    }
    for (name, filter) in filters {
        let rules = filter["filter"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if rules.is_empty() {
            fail(path, &format!("{name}: no rules"));
        }
        if let Some((_, syscall, errno)) = COMPANIONS.iter().find(|(c, _, _)| c == name) {
            let only = rules.iter().all(|r| r["syscall"] == *syscall);
            if filter["mismatch_action"] != "allow"
                || filter["match_action"] != json!({ "errno": errno })
                || !only
            {
                fail(
                    path,
                    &format!("{name}: must only answer {syscall} with errno {errno}"),
                );
            }
        } else if filter["mismatch_action"] != "kill_process" || filter["match_action"] != "allow" {
            fail(
                path,
                &format!("{name}: must allow listed syscalls and kill_process the rest"),
            );
        }

        // For each syscall: whether it has an unconditional rule, and how many rules.
        let mut seen: BTreeMap<&str, (bool, usize)> = BTreeMap::new();
        for rule in rules {
            let syscall = rule["syscall"].as_str().unwrap_or("?");
            let has_comment = rule["comment"]
                .as_str()
                .is_some_and(|c| !c.trim().is_empty());
            if !has_comment {
                fail(
                    path,
                    &format!("{name}: {syscall}: say who needs it in a \"comment\""),
                );
            }
            let entry = seen.entry(syscall).or_default();
            entry.0 |= rule.get("args").is_none();
            entry.1 += 1;
        }
        for (syscall, (unconditional, count)) in seen {
            if unconditional && count > 1 {
                fail(
                    path,
                    &format!(
                        "{name}: {syscall} is listed without args and again with args; \
                         seccompiler would keep only the conditional rules"
                    ),
                );
            }
        }
    }
}

fn fail(path: &Path, message: &str) -> ! {
    panic!("{}: {message}", path.display())
}
