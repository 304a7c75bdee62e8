//! Running an engine's commands under [`ENGINE_LIMIT`]: an engine that hangs fails the test
//! with its output, rather than hanging it.

use std::process::Command;
use std::time::Duration;

use crate::{Outcome, run_with_timeout};

/// How long one engine command may take: a container start boots a VM (~35 s on nested
/// kvm_pvm, several times that when the machine is busy).
pub const ENGINE_LIMIT: Duration = Duration::from_secs(600);

/// Runs `cmd` with the engine time limit and returns how it ended; panics when it cannot be
/// started or runs past the limit (an engine that hangs is a failure, with its output).
pub fn run(cmd: Command) -> Outcome {
    let shown = format!("{cmd:?}");
    let out = run_with_timeout(cmd, ENGINE_LIMIT).unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        !out.timed_out,
        "{shown} ran past {} s:\n{}",
        ENGINE_LIMIT.as_secs(),
        out.output
    );
    out
}

/// Runs `cmd` and asserts it exits with `code`; returns its output.
pub fn expect_code(cmd: Command, code: i32) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd);
    assert_eq!(
        out.code,
        Some(code),
        "{shown} exited {:?}, not {code}:\n{}",
        out.code,
        out.output
    );
    out.output
}

/// Runs `cmd` and asserts it succeeds; returns its output.
pub fn expect_ok(cmd: Command) -> String {
    expect_code(cmd, 0)
}
