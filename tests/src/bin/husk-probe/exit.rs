//! How the probe ends before its report is complete: [`die`] (status 2) when something it
//! needs fails, [`GONE`] when the thread it was to stand for no longer exists.

/// Prints `what` failed, with the last OS error, and exits with status 2.
pub(crate) fn die(what: &str) -> ! {
    eprintln!("husk-probe: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(2)
}

/// The exit status when the thread is gone before the probe could take its place (a relay
/// that finished, a command's reader): the caller skips it.
pub(crate) const GONE: i32 = 3;
