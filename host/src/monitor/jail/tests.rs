use std::process::Command;

use super::*;

/// Set in the copy of the test binary that enters the jail: the scratch directory.
const CHILD: &str = "HUSK_JAIL_TEST_CHILD";

/// Set with [`CHILD`] for a jail with `--monitor-uid` (the base).
const CHILD_UID: &str = "HUSK_JAIL_TEST_UID";

/// Set with [`CHILD_UID`] when the share's rootfs is an overlay (the scratch's `merged`).
const CHILD_OVERLAY: &str = "HUSK_JAIL_TEST_OVERLAY";

/// The base the uid-mode test maps.
const TEST_BASE: u32 = 200_000;

/// What the child reports, one `key=value` line each.
fn report(key: &str, value: impl std::fmt::Display) {
    println!("{key}={value}");
}

/// The child: a private mount namespace (as `share::prepare` makes), the jail, then what
/// it can and cannot see and do.
fn child(scratch: &Path, user: Option<IdMap>) {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    crate::mount_ns::enter().unwrap();
    let state = scratch.join("state");
    let share = state.join("share");
    let kernel = scratch.join("image/vmlinux");
    // As the monitor leaves them: some records written, the socket bound, others absent.
    std::fs::write(state.join(hooks::HOOKS_FILE), b"").unwrap();
    std::fs::write(state.join(state::FIXED_FILE), b"{}").unwrap();
    let _socket =
        std::os::unix::net::UnixListener::bind(state.join(sockets::MONITOR_SOCKET)).unwrap();
    let rootfs = share.join("rootfs");
    let overlay = std::env::var_os(CHILD_OVERLAY).is_some();
    if overlay {
        // The engine's overlay, bound as `share::prepare` binds a rootfs.
        std::fs::create_dir(&rootfs).unwrap();
        mount(
            Some(&scratch.join("layers/c/merged")),
            &rootfs,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .unwrap();
    }
    let netns_before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let id = unit_id(scratch);
    enter(&Jail {
        id: &id,
        cgroup: &super::super::cgroup::Placement::Own { id: id.clone() },
        state_dir: &state,
        read_only: vec![&kernel],
        network: false,
        leave_network_namespace: true,
        user: user.map(|m| (m, share.as_path())),
    })
    .unwrap();
    // Ends libtest's "test ... " line, which has no newline yet.
    println!();
    let mut top: Vec<String> = std::fs::read_dir("/")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    report("root", top.join(","));
    report("state_write", std::fs::write(state.join("w"), b"x").is_ok());
    // A file of an id outside the namespace's range, mode 0600: root may read it, the
    // namespace's root may not.
    report(
        "unmapped_read",
        std::fs::read(share.join("unmapped")).is_ok(),
    );
    report(
        "root_write",
        std::fs::write("/new", b"x")
            .map_err(|e| e.raw_os_error() == Some(libc::EROFS))
            .unwrap_err(),
    );
    report(
        "kernel_read",
        std::fs::read(&kernel).is_ok_and(|k| k == b"elf"),
    );
    report(
        "kernel_write",
        std::fs::OpenOptions::new()
            .write(true)
            .open(&kernel)
            .is_err(),
    );
    // The share: its root-owned file is the monitor's root's; what it creates and chowns
    // lands on disk with the ids it gave.
    report(
        "share_owner",
        std::fs::metadata(share.join("owned")).unwrap().uid(),
    );
    report(
        "share_create",
        std::fs::write(share.join("new"), b"x").is_ok(),
    );
    std::fs::write(share.join("given"), b"x").unwrap();
    report(
        "share_chown",
        std::os::unix::fs::chown(share.join("given"), Some(1000), Some(1000)).is_ok(),
    );
    // Each pinned record: no write, no unlink, no rename over it, no replacing.
    let decoy = state.join("decoy");
    std::fs::write(&decoy, b"{}").unwrap();
    let mut changed = Vec::new();
    for name in PINNED {
        let path = state.join(name);
        let write = std::fs::OpenOptions::new().append(true).open(&path);
        let remove = std::fs::remove_file(&path);
        let rename = std::fs::rename(&decoy, &path);
        if write.is_ok() || remove.is_ok() || rename.is_ok() || !path.exists() {
            changed.push(format!("{name}: {write:?} {remove:?} {rename:?}"));
        }
    }
    report("pinned_changed", changed.join(";"));
    // /proc: the process's own entries, none of the kernel's knobs. Writing a sysctl needs
    // euid 0, not a capability: a root monitor without capabilities could still rewrite
    // kernel.core_pattern (a program run as root at the next crash) through a full procfs.
    report(
        "proc_sys_write",
        std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/sys/kernel/core_pattern")
            .is_ok(),
    );
    let mut proc_top: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    proc_top.sort();
    report("proc_top", proc_top.join(","));
    report(
        "proc_self_fd",
        std::fs::read_dir("/proc/self/fd").is_ok_and(|d| d.count() > 0),
    );
    // A network namespace of its own: not the host's, whose abstract Unix sockets any process
    // in it may connect to (they have no owner, no mode).
    report(
        "netns_left",
        std::fs::read_link("/proc/thread-self/ns/net").unwrap() != netns_before,
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    for field in ["CapEff", "CapBnd", "NoNewPrivs"] {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        report(field, line.split_whitespace().nth(1).unwrap());
    }
    if overlay {
        // Through the new overlay: the layers' files with their owners, a lower layer's
        // opaque directory honoured (a trusted xattr), a file of uid 1000 readable by the
        // namespace's root, and writes: a new file, a chown, a copy-up.
        let r = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_default();
        report("ovl_read", r("file"));
        report(
            "ovl_dir_owner",
            std::fs::metadata(rootfs.join("dir1000")).unwrap().uid(),
        );
        report("ovl_read_1000", r("dir1000/f"));
        report("ovl_opaque", !rootfs.join("opaque/hidden").exists());
        report(
            "ovl_create",
            std::fs::write(rootfs.join("made"), b"x").is_ok(),
        );
        std::fs::write(rootfs.join("made1000"), b"x").unwrap();
        report(
            "ovl_chown",
            std::os::unix::fs::chown(rootfs.join("made1000"), Some(1000), Some(1000)).is_ok(),
        );
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .mode(0o644)
            .open(rootfs.join("file"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"+guest"));
        report("ovl_copy_up", appended.is_ok());
    }
    let uid_map = std::fs::read_to_string("/proc/self/uid_map").unwrap();
    report(
        "uid_map",
        uid_map.split_whitespace().collect::<Vec<_>>().join(" "),
    );
}

/// In the copy of the test binary: runs [`child`] in a single-threaded fork.
fn as_child(scratch: &std::ffi::OsStr) {
    let user = std::env::var(CHILD_UID)
        .ok()
        .map(|b| b.parse::<IdMap>().unwrap());
    // libtest runs the test on a thread of its own: fork, so that the jail gets a
    // process with one thread, as the monitor is when it enters it.
    // SAFETY: the child only runs the test body and _exits; glibc's fork keeps malloc
    // usable in the child, and libtest's main thread only waits for this one.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let ok = std::panic::catch_unwind(|| child(Path::new(scratch), user)).is_ok();
            let _ = std::io::Write::flush(&mut std::io::stdout());
            // SAFETY: _exit ends the forked process without running the parent's
            // exit handlers twice.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
        }
    }
}

/// The container id the jailed child uses (names its cgroup and overlay work directory).
fn unit_id(scratch: &Path) -> String {
    scratch.file_name().unwrap().to_string_lossy().into_owned()
}

/// What a jail run in a fresh copy of this binary reported, and what it left on disk.
struct Outcome {
    /// The child's `key=value` lines, then those of what the parent saw after it.
    stdout: String,
    wrote: std::io::Result<Vec<u8>>,
    /// (uid, gid) on disk of the share's `new` and `given`, and of the state directory.
    owners: [(u32, u32); 3],
}

impl Outcome {
    fn get(&self, key: &str) -> String {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in {}", self.stdout))
            .to_owned()
    }
}

/// Runs test `name` as the jailed child (with `--monitor-uid` `user`), on a scratch tree
/// of a state directory (with a share) and a kernel; with `overlay`, the share's rootfs is
/// an overlay mounted on the host (as an engine's).
fn run_jailed(name: &str, user: Option<u32>, overlay: bool) -> Option<Outcome> {
    use std::os::unix::fs::MetadataExt;
    if let Some(scratch) = std::env::var_os(CHILD) {
        as_child(&scratch);
        return None;
    }
    if !husk_e2e::is_root() || !Path::new("/dev/kvm").exists() {
        return husk_e2e::skip("needs root and /dev/kvm");
    }
    let scratch = std::env::temp_dir().join(format!(
        "husk-jail-unit-{}-{}-{overlay}",
        std::process::id(),
        user.is_some()
    ));
    let state = scratch.join("state");
    std::fs::create_dir_all(state.join("share")).unwrap();
    std::fs::write(state.join("share/owned"), b"root's").unwrap();
    let unmapped = state.join("share/unmapped");
    std::fs::write(&unmapped, b"70000's").unwrap();
    std::os::unix::fs::chown(&unmapped, Some(70_000), Some(70_000)).unwrap();
    std::fs::set_permissions(
        &unmapped,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::create_dir_all(scratch.join("image")).unwrap();
    std::fs::write(scratch.join("image/vmlinux"), b"elf").unwrap();
    // Only root may search it, as containerd's state root: the jail is built as root.
    std::fs::set_permissions(
        &scratch,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let engine = overlay.then(|| engine_overlay(&scratch));
    // One test alone on the main thread of a fresh copy of this binary: the jail needs a
    // single-threaded process.
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        &format!("monitor::jail::tests::{name}"),
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD, &scratch);
    if let Some(base) = user {
        cmd.env(CHILD_UID, base.to_string());
    }
    if overlay {
        cmd.env(CHILD_OVERLAY, "1");
    }
    let out = cmd.output().unwrap();
    let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if let Some(engine) = engine {
        stdout.push_str(&after_overlay(&scratch, engine));
    }
    let cgroups_removed = cgroup::remove(&state);
    let wrote = std::fs::read(state.join("w"));
    let owner = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| (m.uid(), m.gid()))
            .unwrap_or((u32::MAX, u32::MAX))
    };
    let owners = [
        owner(&state.join("share/new")),
        owner(&state.join("share/given")),
        owner(&state),
    ];
    std::fs::remove_dir_all(&scratch).unwrap();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cgroups_removed.unwrap();
    let outcome = Outcome {
        stdout,
        wrote,
        owners,
    };
    let tmp_top = first_name(&scratch);
    let mut expected = vec!["dev".to_string(), "proc".into(), tmp_top];
    expected.sort();
    expected.dedup();
    assert_eq!(outcome.get("root"), expected.join(","));
    assert_eq!(outcome.get("state_write"), "true");
    assert_eq!(
        outcome.wrote.as_deref().unwrap(),
        b"x",
        "the write went to the real state directory"
    );
    assert_eq!(outcome.get("pinned_changed"), "", "a pinned record changed");
    assert_eq!(outcome.get("root_write"), "true", "/ must be read-only");
    assert_eq!(outcome.get("kernel_read"), "true");
    assert_eq!(
        outcome.get("kernel_write"),
        "true",
        "the kernel must be read-only"
    );
    // Seen as root's, created as root's, chowned to 1000: on disk as in the guest.
    assert_eq!(outcome.get("share_owner"), "0");
    assert_eq!(outcome.get("share_create"), "true");
    assert_eq!(outcome.get("share_chown"), "true");
    assert_eq!(outcome.owners[0], (0, 0), "share/new on disk");
    assert_eq!(outcome.owners[1], (1000, 1000), "share/given on disk");
    let kept = kept_capabilities(false, user.is_some())
        .into_iter()
        .fold(0u64, |m, c| m | c.bitmask());
    assert_eq!(outcome.get("CapEff"), format!("{kept:016x}"));
    assert_eq!(outcome.get("CapBnd"), "0000000000000000");
    assert_eq!(outcome.get("NoNewPrivs"), "1");
    assert_eq!(
        outcome.get("proc_sys_write"),
        "false",
        "the jailed process could open kernel.core_pattern for writing"
    );
    assert_eq!(
        outcome.get("proc_top"),
        "self,thread-self",
        "the jail's /proc holds more than the processes' own entries"
    );
    assert_eq!(outcome.get("proc_self_fd"), "true");
    assert_eq!(
        outcome.get("netns_left"),
        "true",
        "the jailed process is still in the host's network namespace"
    );
    Some(outcome)
}

#[test]
fn a_jailed_process_sees_and_may_only_what_it_was_given() {
    let Some(out) = run_jailed(
        "a_jailed_process_sees_and_may_only_what_it_was_given",
        None,
        false,
    ) else {
        return;
    };
    assert_eq!(out.get("uid_map"), "0 0 4294967295");
    assert_eq!(out.get("unmapped_read"), "true", "root may read any file");
    assert_eq!(out.owners[2], (0, 0), "the state directory stays root's");
}

#[test]
fn a_jailed_process_with_a_uid_is_root_only_in_its_namespace() {
    let Some(out) = run_jailed(
        "a_jailed_process_with_a_uid_is_root_only_in_its_namespace",
        Some(TEST_BASE),
        false,
    ) else {
        return;
    };
    assert_eq!(out.get("uid_map"), format!("0 {TEST_BASE} 65536"));
    assert_eq!(
        out.get("unmapped_read"),
        "false",
        "the monitor read a file of an id outside its range"
    );
    assert_eq!(out.owners[2], (TEST_BASE, TEST_BASE), "the state directory");
}

#[test]
fn a_jailed_process_with_a_uid_serves_an_overlay_rootfs_on_idmapped_layers() {
    let Some(out) = run_jailed(
        "a_jailed_process_with_a_uid_serves_an_overlay_rootfs_on_idmapped_layers",
        Some(TEST_BASE),
        true,
    ) else {
        return;
    };
    for (key, want) in [
        ("ovl_read", "lower"),
        ("ovl_dir_owner", "1000"),
        ("ovl_read_1000", "1000's"),
        ("ovl_opaque", "true"),
        ("ovl_create", "true"),
        ("ovl_chown", "true"),
        ("ovl_copy_up", "true"),
        // On disk, in the engine's upper directory, with the guest's ids.
        ("upper_made", "0:0"),
        ("upper_made1000", "1000:1000"),
        ("upper_file", "0:0"),
        ("upper_file_text", "lower+guest"),
        ("engine_copy_up", "Ok(())"),
        ("workdir_made", "true"),
        ("workdir_removed", "Ok(()) true"),
    ] {
        assert_eq!(out.get(key), want, "{key}");
    }
}

/// Mounts an overlay on the scratch's layers, as podman lays them out: two lower layers
/// (the upper one making `opaque` opaque) beside a directory holding the upper, work and
/// mount point (`c/merged`) of the container.
fn engine_overlay(scratch: &Path) -> husk_e2e::Overlay {
    use std::os::unix::fs::PermissionsExt;
    let l = scratch.join("layers");
    for dir in [
        "lower1/dir1000",
        "lower1/opaque",
        "lower2/opaque",
        "c/upper",
        "c/work",
    ] {
        std::fs::create_dir_all(l.join(dir)).unwrap();
    }
    std::fs::write(l.join("lower2/opaque/hidden"), b"").unwrap();
    std::fs::write(l.join("lower2/other"), b"other").unwrap();
    std::fs::write(l.join("lower1/file"), b"lower").unwrap();
    std::fs::write(l.join("lower1/dir1000/f"), b"1000's").unwrap();
    for p in ["lower1/dir1000", "lower1/dir1000/f"] {
        std::os::unix::fs::chown(l.join(p), Some(1000), Some(1000)).unwrap();
        std::fs::set_permissions(l.join(p), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let opaque =
        std::ffi::CString::new(l.join("lower1/opaque").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: setxattr(2) reads the NUL-terminated path and name and the 1-byte value.
    let r = unsafe {
        libc::setxattr(
            opaque.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let merged = l.join("c/merged");
    std::fs::create_dir(&merged).unwrap();
    husk_e2e::Overlay::mount(
        &[&l.join("lower1"), &l.join("lower2")],
        &l.join("c/upper"),
        &l.join("c/work"),
        &merged,
    )
}

/// What the jailed child left in the engine's overlay, as `key=value` lines; whether the
/// engine's overlay still works (its work directory untouched); then unmounts it and
/// removes husk's work directory as `husk delete` does.
fn after_overlay(scratch: &Path, engine: husk_e2e::Overlay) -> String {
    use std::os::unix::fs::MetadataExt;
    let upper = scratch.join("layers/c/upper");
    let owner = |p: &str| {
        std::fs::metadata(upper.join(p))
            .map(|m| format!("{}:{}", m.uid(), m.gid()))
            .unwrap_or_else(|e| e.to_string())
    };
    let mut seen = String::new();
    let mut see = |k: &str, v: String| seen.push_str(&format!("{k}={v}\n"));
    see("upper_made", owner("made"));
    see("upper_made1000", owner("made1000"));
    see("upper_file", owner("file"));
    see(
        "upper_file_text",
        std::fs::read_to_string(upper.join("file")).unwrap_or_default(),
    );
    let engine_copy_up = std::fs::write(engine.at.join("other"), b"engine");
    see("engine_copy_up", format!("{engine_copy_up:?}"));
    let id = unit_id(scratch);
    let ours = scratch.join("layers/c/work").join(format!("husk-{id}"));
    see("workdir_made", ours.is_dir().to_string());
    drop(engine);
    let removed = overlay::remove_workdirs(&scratch.join("state"), &id);
    see("workdir_removed", format!("{removed:?} {}", !ours.exists()));
    seen
}

fn first_name(p: &Path) -> String {
    p.components()
        .nth(1)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap()
}

#[test]
fn the_network_capability_is_kept_only_with_a_network() {
    assert!(!kept_capabilities(false, false).contains(&Capability::CAP_NET_ADMIN));
    assert!(kept_capabilities(true, false).contains(&Capability::CAP_NET_ADMIN));
    for dropped in [
        Capability::CAP_SYS_ADMIN,
        Capability::CAP_SYS_PTRACE,
        Capability::CAP_SYS_MODULE,
        Capability::CAP_SETPCAP,
        Capability::CAP_KILL,
        Capability::CAP_NET_RAW,
    ] {
        assert!(
            !kept_capabilities(true, false).contains(&dropped),
            "{dropped}"
        );
    }
}
