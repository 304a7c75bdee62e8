//! What an engine leaves behind that a test's teardown must undo or wait for: mounts under the
//! test's directory, and processes (a podman cleanup run by conmon) still naming it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Unmounts everything mounted at or under `dir` (deepest first), lazily: what a crashed
/// engine left there must not keep the directory from being removed.
pub fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 reads the NUL-terminated path we own; MNT_DETACH has no
            // memory effects.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Waits (at most `limit`) until no process has `dir` on its command line.
pub(super) fn wait_for_processes_naming(dir: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && !processes_naming(dir, &[]).is_empty() {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The processes (other than this one and `except`) that have `dir` on their command line.
pub fn processes_naming(dir: &Path, except: &[u32]) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes().to_vec();
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            (pid != me
                && !except.contains(&pid)
                && cmdline
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice()))
            .then_some(pid)
        })
        .collect()
}
