//! Environment the host has every container process run with: on kvm_pvm hosts, the settings
//! that keep glibc and Go off the vector registers the guest kernel cannot switch.
//!
//! On kvm_pvm, guest user code runs natively and sees the host's CPUID and XCR0 (AVX, AVX-512
//! enabled), but the guest kernel can only switch the x87/SSE state between processes: it
//! boots with `noxsave`, since that host cannot run XSAVE/XRSTOR in guest kernel mode. The
//! upper halves of the YMM/ZMM registers then pass from one guest process to the next, and a
//! program that copies memory with them copies another process's bytes (busybox died of
//! SIGSEGV in its first thread-local read: glibc's AVX `memcpy` of the TLS image had been
//! switched out mid-copy; `kernel-config/README.md`). The VMM therefore puts `GLIBC_TUNABLES`
//! and `GODEBUG` values on such a guest's kernel command line (`kernel-config/cmdline-kvm-pvm`);
//! the kernel gives parameters it does not know to init as environment, so they are
//! husk-init's own (and keep husk-init off AVX too), and [`apply`] adds them to every
//! container process's environment, merged with the values the spec gives: glibc's hwcaps
//! lists are joined, Go's settings appended (the last one wins there). Elsewhere husk-init's
//! environment has neither, and processes get exactly the spec's environment.
//!
//! Code that uses AVX by itself (not through glibc or Go's runtime) is not covered: on those
//! hosts it can still see and disturb other guest processes' vector registers (`docs/security.md`).

use std::ffi::CString;
use std::sync::OnceLock;

/// The variables passed on, and how each one's value is a list.
const FORWARDED: [(&str, Syntax); 2] = [("GLIBC_TUNABLES", Syntax::Glibc), ("GODEBUG", Syntax::Go)];

#[derive(Debug, Clone, Copy)]
enum Syntax {
    /// `name=value:name=value`, where a repeated name's value lists (`a,b`) are joined.
    Glibc,
    /// `name=value,name=value`, where the last of a repeated name wins.
    Go,
}

static CAPTURED: OnceLock<Vec<(&'static str, Syntax, String)>> = OnceLock::new();

/// Reads the forwarded variables from husk-init's environment, once, at start.
pub fn capture() {
    let _ = CAPTURED.set(
        FORWARDED
            .iter()
            .filter_map(|&(name, syntax)| {
                let v = std::env::var(name).ok().filter(|v| !v.is_empty())?;
                Some((name, syntax, v))
            })
            .collect(),
    );
}

/// Adds the captured variables to `env` (a process's `NAME=value` list, as the spec gives
/// it), merged with what it has. Done once per process, when husk-init plans it.
pub fn apply(env: &mut Vec<CString>) {
    for (name, syntax, ours) in CAPTURED.get().into_iter().flatten() {
        let prefix = format!("{name}=");
        let at = env
            .iter()
            .position(|e| e.as_bytes().starts_with(prefix.as_bytes()));
        let theirs =
            at.map(|i| String::from_utf8_lossy(&env[i].as_bytes()[prefix.len()..]).into_owned());
        let value = match theirs {
            Some(t) => merge(*syntax, &t, ours),
            None => ours.clone(),
        };
        let Ok(entry) = CString::new(format!("{prefix}{value}")) else {
            continue;
        };
        match at {
            Some(i) => env[i] = entry,
            None => env.push(entry),
        }
    }
}

/// `theirs` with `ours` added, in `syntax`.
fn merge(syntax: Syntax, theirs: &str, ours: &str) -> String {
    match syntax {
        Syntax::Go => {
            if theirs.is_empty() {
                ours.to_string()
            } else {
                format!("{theirs},{ours}")
            }
        }
        Syntax::Glibc => {
            let mut entries: Vec<String> = theirs
                .split(':')
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect();
            for add in ours.split(':').filter(|e| !e.is_empty()) {
                let key = add.split_once('=').map_or(add, |(k, _)| k);
                let same = entries
                    .iter_mut()
                    .find(|e| e.split_once('=').is_some_and(|(k, _)| k == key));
                match (same, add.split_once('=')) {
                    (Some(e), Some((_, v))) => {
                        e.push(',');
                        e.push_str(v);
                    }
                    _ => entries.push(add.to_string()),
                }
            }
            entries.join(":")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HWCAPS: &str = "glibc.cpu.hwcaps=-AVX,-AVX2";

    #[test]
    fn glibc_hwcaps_lists_are_joined_and_other_tunables_kept() {
        assert_eq!(
            merge(
                Syntax::Glibc,
                "glibc.malloc.check=3:glibc.cpu.hwcaps=-ERMS",
                HWCAPS
            ),
            "glibc.malloc.check=3:glibc.cpu.hwcaps=-ERMS,-AVX,-AVX2"
        );
        assert_eq!(
            merge(Syntax::Glibc, "glibc.malloc.check=3", HWCAPS),
            "glibc.malloc.check=3:glibc.cpu.hwcaps=-AVX,-AVX2"
        );
        assert_eq!(merge(Syntax::Glibc, "", HWCAPS), HWCAPS);
    }

    #[test]
    fn go_settings_are_appended_so_that_ours_win() {
        assert_eq!(
            merge(Syntax::Go, "cpu.avx=on,http2client=0", "cpu.avx=off"),
            "cpu.avx=on,http2client=0,cpu.avx=off"
        );
        assert_eq!(merge(Syntax::Go, "", "cpu.avx=off"), "cpu.avx=off");
    }

    #[test]
    fn nothing_captured_leaves_the_environment_as_it_is() {
        // No test calls `capture`: as on a host that asks for nothing.
        let mut env = vec![CString::new("PATH=/bin").unwrap()];
        apply(&mut env);
        assert_eq!(env, vec![CString::new("PATH=/bin").unwrap()]);
    }
}
