//! The check of a container whose monitor runs as a uid of its own (husk's default): what the
//! container writes as root lands in the engine's upper directory with the container's ids,
//! while the monitor's uids are a range of husk's pool.

use std::path::Path;

/// The first uid of husk's default pool of monitor uid ranges (`--monitor-uid-pool`), from
/// which every monitor the engines start gets a range of its own.
pub const MONITOR_UID_POOL_FIRST: u32 = 0x7000_0000;

/// What the engine tests exec in a container whose monitor runs as a uid of its own (the
/// default): as its root, a new file given to 1000 and a lower layer's file appended to (a
/// copy-up); then its uid.
pub const UID_WRITES: &str =
    "echo x > /made && chown 1000:1000 /made && echo y >> /etc/passwd && id -u";

/// Checks a container after [`UID_WRITES`] printed `exec_out`: it ran as root, its monitor
/// (`pid`) as a uid of its own (the first of a range of husk's default pool), and its writes
/// are in the engine's `upper` directory with the container's ids.
pub fn check_uid_writes(exec_out: &str, pid: &str, upper: &str) {
    use std::os::unix::fs::MetadataExt;
    assert_eq!(exec_out.trim(), "0", "exec: {exec_out}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let ids: Vec<u32> = uid
        .split_whitespace()
        .skip(1)
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(
        ids.len() == 4
            && ids.iter().all(|u| *u == ids[0])
            && ids[0] >= MONITOR_UID_POOL_FIRST
            && (ids[0] - MONITOR_UID_POOL_FIRST).is_multiple_of(65_536),
        "the monitor's uids: {uid}"
    );
    let upper = Path::new(upper.trim());
    let owner = |name: &str| {
        let m = std::fs::metadata(upper.join(name)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("made"), (1000, 1000));
    assert_eq!(owner("etc/passwd"), (0, 0));
    assert!(
        std::fs::read_to_string(upper.join("etc/passwd"))
            .unwrap()
            .ends_with("y\n")
    );
}
