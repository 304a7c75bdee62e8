//! The monitor's confinement, seen from the host (one VM boot, needs root and /dev/kvm): its
//! capabilities, no_new_privs, its root (only what it needs), its own cgroup, a container
//! that still works (exec, a write to a bind mount); then a container flooding its stdout
//! while the engine reads slowly, then not at all: the monitor's own memory stays bounded, the
//! control path answers, kill works, the monitor ends; and `delete` leaves nothing behind.
//! That first monitor runs as root (`--monitor-uid root`, the weaker mode). Then (a second VM)
//! a monitor as the default makes it, in a uid range of its own: its host uid (a range
//! allocated for it, recorded, given back by `delete`), the files the container writes on a
//! bind mount owned on disk as in the guest, its network, exec, and `delete` undoing what it
//! could not. A third VM is probed in each of its threads' places for what a monitor taken
//! over by its guest could still reach (`husk-probe`).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Component, Path};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use husk_e2e::{
    ContainerRoot, Overlay, TempDir, busybox_bundle, guest_image, husk, husk_binary, is_root,
    kvm_available, skip,
};

/// The capabilities the jailed root monitor keeps without a network (host/src/monitor/jail/):
/// CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, FSETID 4, SETGID 6, SETUID 7, MKNOD 27, SETFCAP 31.
const KEPT: u64 =
    (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 7) | (1 << 27) | (1 << 31);

/// The first uid of the default pool of monitor uid ranges (`monitor::uids::DEFAULT_POOL`).
const POOL_FIRST: u32 = 0x7000_0000;

fn status_field(pid: i32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The monitor's resident memory without the guest's RAM (the one mapping of its size).
fn monitor_own_rss_kib(pid: i32, guest_mib: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut total = 0;
    let mut is_guest = false;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Size:"), Some(kb)) => is_guest = kb.parse::<u64>().unwrap() == guest_mib * 1024,
            (Some("Rss:"), Some(kb)) if !is_guest => total += kb.parse::<u64>().unwrap(),
            _ => {}
        }
    }
    total
}

fn first_component(p: &Path) -> String {
    match p.components().nth(1) {
        Some(Component::Normal(c)) => c.to_string_lossy().into_owned(),
        other => panic!("{} has no first component: {other:?}", p.display()),
    }
}

/// A test's directories: the state root (its containers deleted at the end), a bundle
/// directory and a volume to bind-mount.
struct Scratch {
    /// First: the containers go before their directories.
    _cleanup: ContainerRoot,
    tmp: TempDir,
    root: std::path::PathBuf,
    bundle_dir: std::path::PathBuf,
    volume: std::path::PathBuf,
}

impl Scratch {
    fn new(label: &str) -> Scratch {
        let tmp = TempDir::new(label);
        let root = tmp.path().join("state");
        let bundle_dir = tmp.path().join("bundle");
        let volume = tmp.path().join("volume");
        std::fs::create_dir_all(&bundle_dir).unwrap();
        std::fs::create_dir_all(&volume).unwrap();
        Scratch {
            _cleanup: ContainerRoot(root.clone()),
            tmp,
            root,
            bundle_dir,
            volume,
        }
    }

    /// A busybox bundle running `sh -c script` with the volume at /vol, and `edit` applied to
    /// its config.json; `None` (a skip) without busybox.
    fn bundle(
        &self,
        script: &str,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> Option<std::path::PathBuf> {
        let bundle = busybox_bundle(&self.bundle_dir, &["sh", "-c", script])?;
        let config = bundle.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
        v["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/vol", "type": "bind", "source": self.volume, "options": ["rbind", "rw"]
        }));
        edit(&mut v);
        std::fs::write(&config, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        Some(bundle)
    }
}

/// Runs a husk command and says how long it took.
fn timed(root: &Path, args: &[&str]) -> ((i32, String, String), Duration) {
    let t = Instant::now();
    let r = husk(root, args);
    (r, t.elapsed())
}

#[test]
fn the_monitor_is_confined_and_a_flooding_container_stays_bounded() {
    let Some(image) = guest_image() else { return };
    if !kvm_available() || !is_root() {
        skip::<()>("needs /dev/kvm and root");
        return;
    }
    let scratch = Scratch::new("jail");
    let (tmp, root, volume) = (&scratch.tmp, scratch.root.clone(), scratch.volume.clone());
    // Prints a marker, waits for the test's go (a file an exec makes in the guest's /tmp),
    // then writes 4 KiB lines to its stdout as fast as it can.
    let script = "echo started; L=x; for i in 1 2 3 4 5 6 7 8 9 10 11 12; do L=$L$L; done; \
                  while [ ! -e /tmp/flood ]; do sleep 0.1; done; while :; do echo $L; done";
    let Some(bundle) = scratch.bundle(script, |_| {}) else {
        return;
    };

    // The container's stdout: a pipe the test reads at its own pace.
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    let pid_file = tmp.path().join("pid");
    let status = Command::new(husk_binary())
        .arg("--root")
        .arg(&root)
        .args(["--monitor-uid", "root", "create", "j1", "--bundle"])
        .arg(&bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .env_remove("HUSK_JAIL")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(status.success(), "create failed");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // Capabilities: only the kept ones, nothing to regain.
    let cap_eff = u64::from_str_radix(&status_field(pid, "CapEff"), 16).unwrap();
    let cap_prm = u64::from_str_radix(&status_field(pid, "CapPrm"), 16).unwrap();
    assert_eq!(cap_eff, KEPT, "CapEff {cap_eff:x}");
    assert_eq!(cap_prm, KEPT, "CapPrm {cap_prm:x}");
    assert_eq!(
        u64::from_str_radix(&status_field(pid, "CapBnd"), 16).unwrap(),
        0
    );
    assert_eq!(
        u64::from_str_radix(&status_field(pid, "CapInh"), 16).unwrap(),
        0
    );
    assert_eq!(
        u64::from_str_radix(&status_field(pid, "CapAmb"), 16).unwrap(),
        0
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Every thread (the VMM's were created after the jail) is confined alike, and carries a
    // seccomp filter (mode 2): the main thread, vm-wait, the guest's reader, the command
    // acceptor and the relays as well as the VMM's.
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let s = std::fs::read_to_string(task.join("status")).unwrap();
        assert!(
            s.contains(&format!("CapEff:\t{KEPT:016x}")),
            "{}: {s}",
            task.display()
        );
        let name = s.lines().next().unwrap_or_default().to_string();
        assert!(
            s.contains("Seccomp:\t2\n"),
            "{} ({name}) has no seccomp filter: {s}",
            task.display()
        );
        names.push(name);
    }
    println!("the monitor's threads, each filtered: {names:?}");
    // The first process of a pid namespace of its own (as Firecracker's jailer's
    // --new-pid-ns): it can name, signal or ptrace no other process. And a network namespace
    // of its own, not the host's with its abstract sockets.
    assert_eq!(
        status_field(pid, "NSpid"),
        format!("{pid}\t1"),
        "the monitor is not the first process of a pid namespace of its own"
    );
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        std::fs::read_link("/proc/self/ns/net").unwrap(),
        "the monitor is in the host's network namespace"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let hard: u64 = nofile.split_whitespace().nth(4).unwrap().parse().unwrap();
    assert!(hard <= 262_144, "{nofile}");

    // Its root: the state directory, the guest image, /dev (kvm, null) and /proc.
    let jail_root = Path::new("/proc").join(pid.to_string()).join("root");
    let top: BTreeSet<String> = std::fs::read_dir(&jail_root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = [
        first_component(&root),
        first_component(&image.vmlinux),
        "dev".into(),
        "proc".into(),
    ]
    .into_iter()
    .collect();
    assert_eq!(top, expected, "the monitor's root");
    let devices: BTreeSet<String> = std::fs::read_dir(jail_root.join("dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // /dev/kvm was opened before: not in the jail.
    assert_eq!(devices, ["null"].map(String::from).into());
    let inside = |p: &Path| jail_root.join(p.strip_prefix("/").unwrap());
    assert!(inside(&root.join("j1/state.json")).is_file());
    assert!(inside(&image.vmlinux).is_file());
    // The bundle, the volume and the rest of the host are not there (only through the share).
    assert!(
        !inside(&bundle).exists(),
        "the bundle is visible in the jail"
    );
    assert!(
        !inside(&volume).exists(),
        "the volume is visible in the jail"
    );
    assert!(!jail_root.join("etc").exists());
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap();
    assert!(
        root_line.contains(" - tmpfs ") && root_line.split(' ').nth(5).unwrap().starts_with("ro"),
        "the monitor's / must be a read-only tmpfs: {root_line}"
    );

    // The records husk acts on as root are read-only mounts of their own there (the monitor
    // writes the rest of its state directory): `monitor::jail::PINNED`.
    for name in [
        "container.json",
        "lock",
        "hooks.json",
        "network.json",
        "cgroups",
        "monitor.sock",
    ] {
        let at = root.join("j1").join(name);
        let line = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(at.to_str().unwrap()))
            .unwrap_or_else(|| panic!("{name} is not pinned in the monitor: {mountinfo}"));
        assert!(
            line.split(' ').nth(5).unwrap().starts_with("ro"),
            "{name} is pinned writable: {line}"
        );
    }

    // Its own cgroup, listed in the state directory for delete.
    // {"dirs": [...], "cost": ...}: the cgroup directories, one per hierarchy.
    let record = std::fs::read_to_string(root.join("j1/cgroups")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&record).unwrap();
    let cgroups: Vec<&Path> = parsed["dirs"]
        .as_array()
        .unwrap_or_else(|| panic!("no dirs in the cgroups record: {record}"))
        .iter()
        .map(|d| Path::new(d.as_str().unwrap()))
        .collect();
    let has_hierarchy = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "));
    assert_eq!(!cgroups.is_empty(), has_hierarchy, "cgroups: {record}");
    for dir in &cgroups {
        assert!(dir.ends_with("husk/j1"), "{}", dir.display());
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|p| p == pid.to_string()),
            "{}: {procs}",
            dir.display()
        );
    }
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups.is_empty() || own.contains("/husk/j1"),
        "the monitor's cgroups: {own}"
    );

    // The container works: start, exec, a write through a bind mount.
    assert_eq!(husk(&root, &["start", "j1"]).0, 0);
    let mut stdout = std::fs::File::from(read_end);
    let mut first = [0u8; 8];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"started\n");
    let (code, _, err) = husk(
        &root,
        &["exec", "j1", "sh", "-c", "echo from-exec > /vol/written"],
    );
    assert_eq!(code, 0, "exec: {err}");
    assert_eq!(
        std::fs::read_to_string(volume.join("written")).unwrap(),
        "from-exec\n"
    );

    // The flood, read slowly (4 KiB every 100 ms, slower than the guest writes even on nested
    // KVM), then not at all.
    let guest_mib = 256;
    let before = monitor_own_rss_kib(pid, guest_mib);
    let (code, _, err) = husk(&root, &["exec", "j1", "touch", "/tmp/flood"]);
    assert_eq!(code, 0, "exec: {err}");
    let read_total = Arc::new(AtomicU64::new(0));
    let reading = Arc::new(AtomicBool::new(true));
    let reader = {
        let (total, reading) = (read_total.clone(), reading.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while reading.load(Ordering::Relaxed) {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total.fetch_add(n as u64, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(100));
            }
            // Keeps the pipe open, unread: the engine stopped reading.
            stdout
        })
    };
    // At least 8 s of it, and 64 KiB read (a loaded host's guest writes slowly).
    let flooding = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    while read_total.load(Ordering::Relaxed) <= 64 << 10
        && flooding.elapsed() < Duration::from_secs(90)
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    let slow_for = flooding.elapsed();
    let ((code, state, err), took) = timed(&root, &["state", "j1"]);
    assert_eq!(code, 0, "{err}");
    assert!(state.contains("\"running\""), "{state}");
    assert!(
        took < Duration::from_secs(5),
        "state took {took:?} during the flood"
    );
    let slow = read_total.load(Ordering::Relaxed);
    assert!(slow > 64 << 10, "the slow reader got only {slow} bytes");
    reading.store(false, Ordering::Relaxed);
    let stdout = reader.join().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let during = monitor_own_rss_kib(pid, guest_mib);
    println!(
        "slow reader took {slow} bytes in {:.1} s; monitor's own RSS: {before} KiB before the flood, {during} KiB 5 s after that",
        slow_for.as_secs_f64()
    );
    assert!(
        during < before + 32 * 1024,
        "the monitor's own memory grew from {before} KiB to {during} KiB"
    );
    let ((code, _, err), took) = timed(&root, &["state", "j1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        took < Duration::from_secs(5),
        "state took {took:?} with nobody reading"
    );
    let ((code, _, err), took) = timed(&root, &["kill", "j1", "KILL"]);
    assert_eq!(code, 0, "kill during the flood: {err}");
    assert!(took < Duration::from_secs(10), "kill took {took:?}");
    // With nobody reading, husk-init and then the monitor give up on the rest of the output
    // (10 s without progress each) and the monitor ends.
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && t.elapsed() < Duration::from_secs(60) {
        let (_, state, _) = husk(&root, &["state", "j1"]);
        if state.contains("\"stopped\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, state, _) = husk(&root, &["state", "j1"]);
    assert!(
        state.contains("\"stopped\""),
        "the container did not stop within 60 s of kill with its stdout unread: {state}"
    );
    println!("stopped {:.1} s after kill", t.elapsed().as_secs_f64());
    drop(stdout);

    // Delete leaves nothing: no state directory, no cgroup.
    let (code, _, err) = husk(&root, &["delete", "j1"]);
    assert_eq!(code, 0, "delete: {err}");
    assert!(!root.join("j1").exists());
    for dir in &cgroups {
        assert!(!dir.exists(), "{} is left after delete", dir.display());
    }
}

/// A network namespace with one end of a veth in it, removed on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new(name: &str, host: &str, guest: &str) -> TestNetns {
        let veth_host = format!("{name}-h");
        // What a run that was killed left.
        for args in [["link", "del", &veth_host], ["netns", "del", name]] {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        }
        let ns = TestNetns { name: name.into() };
        for args in [
            vec!["netns", "add", name],
            vec![
                "link", "add", &veth_host, "type", "veth", "peer", "name", "eth0", "netns", name,
            ],
            vec!["addr", "add", host, "dev", &veth_host],
            vec!["link", "set", &veth_host, "up"],
            vec!["-n", name, "addr", "add", guest, "dev", "eth0"],
            vec!["-n", name, "link", "set", "eth0", "up"],
        ] {
            let st = Command::new("ip").args(&args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        }
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}-h", self.name)])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn a_monitor_with_a_uid_of_its_own_serves_the_container_as_its_root() {
    use std::os::unix::fs::MetadataExt;
    let Some(_image) = guest_image() else { return };
    if !kvm_available() || !is_root() {
        skip::<()>("needs /dev/kvm and root");
        return;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        skip::<()>("needs ip (iproute2)");
        return;
    }
    let scratch = Scratch::new("jail-uid");
    let (tmp, root, volume) = (&scratch.tmp, scratch.root.clone(), scratch.volume.clone());
    let netns = TestNetns::new("husk-uid-t", "10.231.7.1/24", "10.231.7.2/24");
    // On the bind mount and on the rootfs (an overlay, as an engine gives): files as root,
    // given to 1000, and a copy-up of a lower layer's file.
    let script = "echo root > /vol/by-root && echo u > /vol/by-1000 && \
                  chown 1000:1000 /vol/by-1000 && echo root > /made && echo u > /made1000 && \
                  chown 1000:1000 /made1000 && echo +guest >> /seed && echo done > /vol/done; \
                  sleep 600";
    let Some(bundle) = scratch.bundle(script, |v| {
        v["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "network", "path": "/var/run/netns/husk-uid-t"}));
        let caps = serde_json::json!(["CAP_CHOWN", "CAP_NET_RAW", "CAP_KILL"]);
        for set in ["bounding", "effective", "permitted"] {
            v["process"]["capabilities"][set] = caps.clone();
        }
    }) else {
        return;
    };
    let overlay = overlay_rootfs(&scratch, &bundle, |rootfs| {
        std::fs::write(rootfs.join("seed"), "lower\n").unwrap();
    });

    let pid_file = tmp.path().join("pid");
    // The container's stdio (the monitor keeps it): not pipes this test would wait on.
    let errors = tmp.path().join("create.err");
    let phases = tmp.path().join("phases.jsonl");
    let status = Command::new(husk_binary())
        .arg("--root")
        .arg(&root)
        .env("HUSK_PHASES", &phases)
        .args(["create", "u1", "--bundle"])
        .arg(&bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .env_remove("HUSK_JAIL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errors).unwrap())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "create: {}",
        std::fs::read_to_string(&errors).unwrap_or_default()
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // The default: a range of its own from the pool, recorded in the state directory and in
    // the host's registry (see monitor::uids).
    let base: u32 = std::fs::read_to_string(root.join("u1/monitor-uid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        (POOL_FIRST..POOL_FIRST + 4094 * 65536).contains(&base)
            && (base - POOL_FIRST).is_multiple_of(65536),
        "the monitor's range {base} is not one of the default pool's"
    );
    let registered = Path::new("/run/husk-monitor-uids").join(base.to_string());
    assert_eq!(
        std::fs::read_to_string(&registered).unwrap().trim(),
        root.join("u1").to_str().unwrap()
    );
    // The monitor's host ids, with no groups, and the namespace it is root of.
    let ids = format!("{base}\t{base}\t{base}\t{base}");
    assert_eq!(status_field(pid, "Uid"), ids);
    assert_eq!(status_field(pid, "Gid"), ids);
    assert_eq!(status_field(pid, "Groups"), "");
    let uid_map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    assert_eq!(
        uid_map.split_whitespace().collect::<Vec<_>>(),
        ["0", &base.to_string(), "65536"]
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(std::fs::metadata(root.join("u1")).unwrap().uid(), base);
    // The monitor records its phases from its jail too (the file, root's, is not there: it
    // keeps it open from its first phase, through the closing of what it inherited).
    let recorded = std::fs::read_to_string(&phases).unwrap();
    for phase in ["monitor-start", "monitor-confined"] {
        assert!(
            recorded
                .lines()
                .any(|l| l.contains(&format!("\"phase\":\"{phase}\""))
                    && l.contains(&format!("\"pid\":{pid}"))),
            "the monitor did not record {phase}: {recorded}"
        );
    }
    // What husk acts on as root stays root's.
    for name in [
        "container.json",
        "hooks.json",
        "network.json",
        "cgroups",
        "lock",
    ] {
        let meta = std::fs::metadata(root.join("u1").join(name)).unwrap();
        assert_eq!(meta.uid(), 0, "{name}");
    }
    let (code, state, err) = husk(&root, &["state", "u1"]);
    assert_eq!(code, 0, "{err}");
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["pid"], pid, "{state}");

    // The container: files on the bind mount owned on disk as in the guest.
    assert_eq!(husk(&root, &["start", "u1"]).0, 0);
    let t = Instant::now();
    while !volume.join("done").exists() && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        volume.join("done").exists(),
        "the container did not write /vol"
    );
    let owner = |name: &str| {
        let m = std::fs::metadata(volume.join(name)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("by-root"), (0, 0));
    assert_eq!(owner("by-1000"), (1000, 1000));
    let upper_owner = |name: &str| {
        let m = std::fs::metadata(overlay.upper.join(name)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(upper_owner("made"), (0, 0));
    assert_eq!(upper_owner("made1000"), (1000, 1000));
    assert_eq!(upper_owner("seed"), (0, 0));
    assert_eq!(
        std::fs::read_to_string(overlay.upper.join("seed")).unwrap(),
        "lower\n+guest\n"
    );
    let workdir = overlay.work.join("husk-u1");
    assert!(
        workdir.is_dir(),
        "no work directory of husk's for the overlay"
    );
    // exec (its sockets are bound by this root CLI, connected to by the monitor), and the
    // network: the namespace's veth, taken for the VM.
    let (code, out, err) = husk(&root, &["exec", "u1", "id", "-u"]);
    assert_eq!((code, out.trim()), (0, "0"), "exec: {err}");
    let (code, out, err) = husk(
        &root,
        &[
            "exec",
            "u1",
            "busybox",
            "ping",
            "-c",
            "1",
            "-W",
            "10",
            "10.231.7.1",
        ],
    );
    assert_eq!(code, 0, "ping from the container: {out}{err}");
    assert!(
        netns.ip(&["-o", "link"]).contains("_husk"),
        "no tap in the namespace"
    );

    // Kill, delete: the monitor could not undo its network; delete does, from the record.
    assert_eq!(husk(&root, &["kill", "u1", "KILL"]).0, 0);
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, _, err) = husk(&root, &["delete", "u1"]);
    assert_eq!(code, 0, "delete: {err}");
    assert!(!err.contains("cleaning up"), "delete: {err}");
    assert!(!root.join("u1").exists());
    assert!(
        !registered.exists(),
        "delete did not give the monitor's uid range back"
    );
    assert!(
        !workdir.exists(),
        "delete left the overlay's work directory"
    );
    // The engine's overlay still works: its work directory was not shared.
    std::fs::write(overlay.mount.at.join("seed"), "engine\n").unwrap();
    let links = netns.ip(&["-o", "link"]);
    assert!(!links.contains("_husk"), "a tap is left: {links}");
    let addrs = netns.ip(&["-o", "addr", "show", "eth0"]);
    assert!(
        addrs.contains("10.231.7.2/24"),
        "eth0's address was not given back: {addrs}"
    );
}

/// A bundle's rootfs made an overlay, as podman, Docker and containerd give it.
struct OverlayRootfs {
    upper: std::path::PathBuf,
    work: std::path::PathBuf,
    mount: Overlay,
}

/// Moves the bundle's rootfs to a lower layer (`seed` adds to it) and mounts an overlay on it
/// with an upper and a work directory, at the rootfs's place.
fn overlay_rootfs(scratch: &Scratch, bundle: &Path, seed: impl FnOnce(&Path)) -> OverlayRootfs {
    let layers = scratch.tmp.path().join("layers");
    let (lower, upper, work) = (
        layers.join("lower"),
        layers.join("upper"),
        layers.join("work"),
    );
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&upper).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    std::fs::rename(&rootfs, &lower).unwrap();
    seed(&lower);
    std::fs::create_dir(&rootfs).unwrap();
    let mount = Overlay::mount(&[&lower], &upper, &work, &rootfs);
    OverlayRootfs { upper, work, mount }
}

#[test]
fn a_monitor_uid_with_an_overlay_of_relative_layers_is_refused_by_name_and_leaves_nothing() {
    // The monitor fails in its jail, before the VM: no boot, but the image and /dev/kvm are
    // looked up first.
    let Some(_image) = guest_image() else { return };
    if !kvm_available() || !is_root() {
        skip::<()>("needs /dev/kvm and root");
        return;
    }
    let scratch = Scratch::new("jail-ovl");
    let Some(bundle) = scratch.bundle("true", |_| {}) else {
        return;
    };
    // As engines mount dozens of layers: relative to a working directory the mount does not
    // record.
    let layers = scratch.tmp.path().join("layers");
    let rootfs = bundle.join("rootfs");
    for dir in ["upper", "work"] {
        std::fs::create_dir_all(layers.join(dir)).unwrap();
    }
    std::fs::rename(&rootfs, layers.join("lower")).unwrap();
    std::fs::create_dir(&rootfs).unwrap();
    let mounted = Command::new("mount")
        .current_dir(&layers)
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir=lower,upperdir={},workdir={}",
            layers.join("upper").display(),
            layers.join("work").display()
        ))
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting the overlay");
    let _overlay = Overlay { at: rootfs.clone() };

    let (code, _, err) = husk(
        &scratch.root,
        &["create", "o1", "--bundle", bundle.to_str().unwrap()],
    );
    assert_ne!(
        code, 0,
        "create with relative overlay layers under --monitor-uid"
    );
    println!("create said: {}", err.trim());
    assert!(
        err.contains("overlay at") && err.contains("rootfs") && err.contains("relative path"),
        "the error does not name the overlay and its layer: {err}"
    );
    assert!(!scratch.root.join("o1").exists(), "create left its state");
    // Nor a uid range: the registry names no directory of this test's.
    let registry = std::fs::read_dir("/run/husk-monitor-uids").unwrap();
    for entry in registry.flatten() {
        let owner = std::fs::read_to_string(entry.path()).unwrap_or_default();
        assert!(
            !owner.contains(scratch.root.to_str().unwrap()),
            "create left a uid range: {owner}"
        );
    }
    let (_, list, _) = husk(&scratch.root, &["list", "-q"]);
    assert!(list.trim().is_empty(), "{list}");
    assert!(
        !layers.join("work/husk-o1").exists(),
        "create left a work directory"
    );
}

/// One thread of a process: its id, name and seccomp mode (`/proc/PID/task/TID/status`).
fn threads(pid: i32) -> Vec<(i32, String, String)> {
    let mut found: Vec<(i32, String, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let tid: i32 = t.unwrap().file_name().to_string_lossy().parse().unwrap();
            let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
            let get = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            (tid, get("Name"), get("Seccomp"))
        })
        .collect();
    found.sort();
    found
}

/// What a monitor taken over by its guest can still reach, in the default mode: for each of
/// its threads, `husk-probe` takes the thread's place (its seccomp filters, credentials,
/// capabilities and namespaces, its jail as root; see tests/src/bin/husk-probe/) and tries
/// to open, write, signal, connect to and call what an attacker would want: host files, the
/// kernel's knobs in /proc and /sys, a root process of the host, an abstract Unix socket and
/// a TCP port of the host's network namespace, the engines' sockets, and the calls that widen
/// a foothold (execve, mount, ptrace, bpf, io_uring, user namespaces, ...). The report is
/// printed (run with `--nocapture`; `HUSK_BINARY` measures another build the same way); the
/// test holds the monitor to reaching none of it.
#[test]
fn a_taken_over_monitor_reaches_nothing_of_the_host() {
    use std::collections::BTreeMap;
    use std::os::linux::net::SocketAddrExt;
    let Some(image) = guest_image() else { return };
    if !kvm_available() || !is_root() {
        skip::<()>("needs /dev/kvm and root");
        return;
    }
    let scratch = Scratch::new("reach");
    let (tmp, root) = (&scratch.tmp, scratch.root.clone());
    std::fs::write(scratch.volume.join("file"), "the volume's").unwrap();
    let Some(bundle) = scratch.bundle("echo started; sleep 600", |_| {}) else {
        return;
    };
    let pid_file = tmp.path().join("pid");
    let errors = tmp.path().join("create.err");
    let status = Command::new(husk_binary())
        .arg("--root")
        .arg(&root)
        .args(["create", "r1", "--bundle"])
        .arg(&bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .env_remove("HUSK_JAIL")
        .env_remove("HUSK_MONITOR_UID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errors).unwrap())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "create: {}",
        std::fs::read_to_string(&errors).unwrap_or_default()
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(husk(&root, &["start", "r1"]).0, 0);
    // The default: a uid range of its own, not root.
    let uid: u32 = status_field(pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(uid >= POOL_FIRST, "the monitor runs as uid {uid}");

    // What it must not reach: a root process of the host, an abstract socket and a TCP port
    // of the host's network namespace.
    let mut victim = Command::new("sleep").arg("600").spawn().unwrap();
    let name = format!("husk-probe-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
    let _abstract = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port().to_string();
    let dir = root.join("r1");
    // The volume's place in the share: its index among the spec's mounts.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let volume_index = config["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .position(|m| m["destination"] == "/vol")
        .unwrap();
    let paths = [
        dir.join("container.json"),
        dir.join("hooks.json"),
        dir.join("state.json"),
        dir.join("share/rootfs/bin/busybox"),
        dir.join(format!("share/mounts/{volume_index}/file")),
        image.vmlinux.clone(),
        bundle.join("config.json"),
        scratch.volume.join("file"),
    ];
    let mut args: Vec<String> = vec![
        "--victim".into(),
        victim.id().to_string(),
        "--abstract".into(),
        name.clone(),
        "--tcp".into(),
        port.clone(),
    ];
    for p in &paths {
        args.extend(["--path".into(), p.display().to_string()]);
    }

    // Each thread's place, probed; threads with the same results are reported together.
    let threads = threads(pid);
    type Results = BTreeMap<(String, String), String>;
    let mut reports: Vec<(Vec<String>, Results)> = Vec::new();
    for (tid, thread, _) in &threads {
        let out = Command::new(env!("CARGO_BIN_EXE_husk-probe"))
            .args(["--pid", &pid.to_string(), "--tid", &tid.to_string()])
            .args(&args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.code() == Some(3) && text.starts_with("thread\tgone") {
            // A thread that ended meanwhile (a relay that finished): nothing to take over.
            continue;
        }
        assert!(
            out.status.success(),
            "probing {thread} ({tid}): {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let results: Results = text
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, '\t');
                Some((
                    (f.next()?.to_string(), f.next()?.to_string()),
                    f.next()?.to_string(),
                ))
            })
            .collect();
        match reports.iter_mut().find(|(_, r)| *r == results) {
            Some((names, _)) => names.push(thread.clone()),
            None => reports.push((vec![thread.clone()], results)),
        }
    }
    let victim_alive = victim.try_wait().unwrap().is_none();
    let _ = victim.kill();
    let _ = victim.wait();

    println!("\nthreads of the monitor (pid {pid}): name, Seccomp mode");
    for (tid, thread, seccomp) in &threads {
        println!("  {tid:>7} {thread:<16} {seccomp}");
    }
    println!("\ndescriptors it holds:");
    let mut fds: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let n = e.file_name().to_string_lossy().parse().ok()?;
            Some((n, std::fs::read_link(e.path()).ok()?.display().to_string()))
        })
        .collect();
    fds.sort();
    for (n, target) in &fds {
        println!("  {n:>4} {target}");
    }
    for (names, results) in &reports {
        println!("\nin the place of: {}", names.join(", "));
        for ((category, target), result) in results {
            println!("  {category:<12} {target:<60} {result}");
        }
    }
    println!(
        "\nthe victim (a root `sleep` of the host) is {}",
        if victim_alive { "alive" } else { "dead" }
    );
    let (code, _, err) = husk(&root, &["delete", "--force", "r1"]);
    assert_eq!(code, 0, "delete: {err}");

    // Every thread filtered; the probe in its place reached nothing of the host.
    for (tid, thread, seccomp) in &threads {
        assert_eq!(
            seccomp, "2",
            "thread {thread} ({tid}) has no seccomp filter"
        );
    }
    assert!(victim_alive, "a monitor thread could kill a root process");
    let must_fail: Vec<String> = [
        "open-write /proc/sys/kernel/core_pattern",
        "open-write /proc/sys/kernel/modprobe",
        "open-write /proc/sysrq-trigger",
        "open-write /sys/kernel/uevent_helper",
        "open-read /proc/kcore",
        "open-read /etc/shadow",
        "open-write /etc/passwd",
        "open-write /root/.ssh/authorized_keys",
        "open-read /dev/mem",
        "open-write /dev/kvm",
        "signal kill -1 0",
        &format!("connect unix @{name}"),
        &format!("connect tcp 127.0.0.1:{port}"),
        "connect unix /run/containerd/containerd.sock",
        "connect unix /var/run/docker.sock",
        "connect unix /run/dbus/system_bus_socket",
        "socket AF_INET",
        "socket AF_NETLINK route",
        "socket AF_PACKET",
        "socket AF_VSOCK",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(
        [
            dir.join("container.json"),
            dir.join("hooks.json"),
            image.vmlinux.clone(),
            bundle.join("config.json"),
            scratch.volume.join("file"),
        ]
        .iter()
        .map(|p| format!("open-write {}", p.display())),
    )
    .chain(
        [bundle.join("config.json"), scratch.volume.join("file")]
            .iter()
            .map(|p| format!("open-read {}", p.display())),
    )
    .collect();
    for (names, results) in &reports {
        let who = names.join(", ");
        assert_eq!(
            results
                .get(&("creds".into(), "as the thread".into()))
                .map(String::as_str),
            Some("same"),
            "the probe did not take the place of {who}"
        );
        for attempt in &must_fail {
            let (category, target) = attempt.split_once(' ').unwrap();
            let result = results
                .get(&(category.to_string(), target.to_string()))
                .unwrap_or_else(|| panic!("{who}: no result for {attempt}"));
            assert_ne!(result, "ok", "in the place of {who}: {attempt}");
        }
        for ((category, target), result) in results {
            if category == "signal" && target.contains(&victim.id().to_string())
                || category == "ptrace"
                || category == "syscall"
            {
                assert!(
                    result.starts_with("seccomp"),
                    "in the place of {who}: {category} {target}: {result}"
                );
            }
        }
    }
}

/// When every range of the pool is taken, `create` says so (and how to get one), before any
/// VM, and leaves nothing; the ranges in use are untouched.
#[test]
fn a_monitor_without_a_free_uid_range_is_refused_clearly_and_leaves_nothing() {
    if !is_root() {
        skip::<()>("needs root");
        return;
    }
    // A pool of one range of its own (apart from the default's), taken by a container that
    // was not deleted: its state directory records the range the registry gives it.
    const FIRST: u32 = 1_500_000_000 + 65_536 * 7;
    let scratch = Scratch::new("uids-full");
    let Some(bundle) = scratch.bundle("true", |_| {}) else {
        return;
    };
    let holder = scratch.tmp.path().join("holder");
    std::fs::create_dir_all(&holder).unwrap();
    std::fs::write(holder.join("monitor-uid"), format!("{FIRST}\n")).unwrap();
    let registry = Path::new("/run/husk-monitor-uids");
    std::fs::create_dir_all(registry).unwrap();
    let entry = registry.join(FIRST.to_string());
    std::fs::write(&entry, format!("{}\n", holder.display())).unwrap();

    let pool = format!("{FIRST}:65536");
    let (code, _, err) = husk(
        &scratch.root,
        &[
            "--monitor-uid-pool",
            &pool,
            "create",
            "n1",
            "--bundle",
            bundle.to_str().unwrap(),
        ],
    );
    let held = std::fs::read_to_string(&entry);
    let _ = std::fs::remove_file(&entry);
    assert_ne!(code, 0, "create without a free uid range");
    println!("create said: {}", err.trim());
    assert!(
        err.contains("no uid range left") && err.contains("--monitor-uid-pool"),
        "{err}"
    );
    assert!(!scratch.root.join("n1").exists(), "create left its state");
    assert_eq!(
        held.unwrap().trim(),
        holder.to_str().unwrap(),
        "the range in use was taken"
    );
}
