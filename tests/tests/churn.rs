//! Churn: many container lifecycles through the real `husk` binary, including force-deletes of
//! running containers and monitors killed with SIGKILL mid-run; afterwards nothing of them may
//! be left on the host: no husk process, no mount, no network device, no file under `--root`,
//! no descriptor in this (long-lived) process.
//!
//! Every cycle boots a VM (~30-40 s on the nested kvm_pvm CI hosts), so the default is a few
//! cycles of each kind; `HUSK_CHURN_CYCLES=200` runs the full churn (and
//! `HUSK_CHURN_WORKERS=N` how many run at once, default 2). Every other cycle runs its
//! monitor as `--monitor-uid BASE` (`HUSK_CHURN_MONITOR_UID`, default 300000; `off`: none) on
//! an overlay rootfs of its own (as podman's), which the test mounts and unmounts around the
//! cycle; husk's work directory for the overlay must be gone after `delete`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use husk_e2e::{
    ContainerRoot, Overlay, TempDir, busybox_bundle, guest_image, husk, husk_binary, is_root,
    kvm_available, skip,
};

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// What a leak would show up in.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    /// husk processes working on our state root (monitors, CLIs).
    husk_processes: BTreeSet<String>,
    /// Host mounts under our temp dir (the monitor's share mounts live in its own namespace).
    mounts: BTreeSet<String>,
    /// Network devices that husk could have made.
    net_devices: BTreeSet<String>,
    /// Files under the state root.
    state_files: BTreeSet<PathBuf>,
    /// This process's open descriptors.
    own_fds: usize,
}

impl Snapshot {
    fn take(tmp: &Path, root: &Path) -> Snapshot {
        let mut husk_processes = BTreeSet::new();
        let root_s = root.display().to_string();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("husk") && cmdline.contains(&root_s) {
                husk_processes.insert(format!("{}: {cmdline}", e.file_name().to_string_lossy()));
            }
        }
        let tmp_s = tmp.display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&tmp_s))
            .map(String::from)
            .collect();
        let net_devices = std::fs::read_dir("/sys/class/net")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("husk") || n.starts_with("tap"))
            .collect();
        let mut state_files = BTreeSet::new();
        walk(root, &mut state_files);
        let own_fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
        Snapshot {
            husk_processes,
            mounts,
            net_devices,
            state_files,
            own_fds,
        }
    }
}

fn walk(dir: &Path, out: &mut BTreeSet<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        out.insert(e.path());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&e.path(), out);
        }
    }
}

fn status_of(root: &Path, id: &str) -> String {
    let (_, out, _) = husk(root, &["state", id]);
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v["status"].as_str().map(String::from))
        .unwrap_or_default()
}

fn wait_stopped(root: &Path, id: &str) {
    let start = Instant::now();
    while status_of(root, id) != "stopped" {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{id} did not stop"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `husk create` with the container's stdio on /dev/null (the monitor keeps it open, so it
/// must not be a pipe we wait on); `flags` go before the command.
fn create(root: &Path, flags: &[String], bundle: &Path, id: &str) {
    let status = Command::new(husk_binary())
        .args(flags)
        .arg("--root")
        .arg(root)
        .args(["create", id, "--bundle"])
        .arg(bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "create {id} failed");
}

/// A cycle's bundle with an overlay rootfs (lower: the shared busybox rootfs), as podman lays
/// it out: `c-N/{upper,work,merged}`, the bundle's root path the mount point.
struct OverlayBundle {
    dir: PathBuf,
    /// Before `dir` goes: unmounted first.
    mount: Option<Overlay>,
}

impl OverlayBundle {
    fn mount(tmp: &Path, bundle: &Path, n: usize) -> OverlayBundle {
        let dir = tmp.join(format!("c-{n}"));
        for d in ["upper", "work", "merged", "bundle"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let merged = dir.join("merged");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        config["root"]["path"] = serde_json::json!(merged);
        std::fs::write(
            dir.join("bundle/config.json"),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        let mount = Overlay::mount(
            &[&bundle.join("rootfs")],
            &dir.join("upper"),
            &dir.join("work"),
            &merged,
        );
        OverlayBundle {
            dir,
            mount: Some(mount),
        }
    }
}

impl Drop for OverlayBundle {
    fn drop(&mut self) {
        drop(self.mount.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One lifecycle; `n % 3` picks how it ends; with `uid`, odd cycles run under
/// `--monitor-uid` on an overlay rootfs.
fn cycle(tmp: &Path, root: &Path, bundle: &Path, uid: Option<u32>, n: usize) {
    let id = format!("churn-{n}");
    let uid = uid.filter(|_| n % 2 == 1);
    let overlay = uid.map(|_| OverlayBundle::mount(tmp, bundle, n));
    let flags: Vec<String> = uid
        .map(|b| vec!["--monitor-uid".into(), b.to_string()])
        .unwrap_or_default();
    let bundle = overlay
        .as_ref()
        .map_or(bundle.to_path_buf(), |o| o.dir.join("bundle"));
    create(root, &flags, &bundle, &id);
    let (code, _, err) = husk(root, &["start", &id]);
    assert_eq!(code, 0, "start {id}: {err}");
    match n % 3 {
        // The orderly end: kill, wait until stopped, delete.
        0 => {
            let (code, _, err) = husk(root, &["kill", &id, "KILL"]);
            assert_eq!(code, 0, "kill {id}: {err}");
            wait_stopped(root, &id);
            let (code, _, err) = husk(root, &["delete", &id]);
            assert_eq!(code, 0, "delete {id}: {err}");
        }
        // Deleting a running container with --force.
        1 => {
            let (code, _, err) = husk(root, &["delete", "--force", &id]);
            assert_eq!(code, 0, "delete --force {id}: {err}");
        }
        // The monitor dies with SIGKILL mid-run (the OOM killer, an admin): the container
        // reads as stopped and delete still cleans up.
        _ => {
            let (_, out, _) = husk(root, &["state", &id]);
            let state: serde_json::Value = serde_json::from_str(&out).unwrap();
            let pid = i32::try_from(state["pid"].as_i64().unwrap()).unwrap();
            // SAFETY: kill(2) of the monitor this test started; no memory is involved.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
            wait_stopped(root, &id);
            let (code, _, err) = husk(root, &["delete", &id]);
            assert_eq!(code, 0, "delete {id} after its monitor was killed: {err}");
        }
    }
    let (code, _, _) = husk(root, &["state", &id]);
    assert_ne!(code, 0, "{id} still exists after delete");
    if let Some(o) = &overlay {
        let workdir = o.dir.join("work").join(format!("husk-{id}"));
        assert!(!workdir.exists(), "delete left {}", workdir.display());
    }
}

#[test]
fn churn_leaves_nothing_behind() {
    let Some(_image) = guest_image() else { return };
    if !kvm_available() || !is_root() {
        skip::<()>("needs /dev/kvm and root");
        return;
    }
    let cycles = env_count("HUSK_CHURN_CYCLES", 6);
    let uid = match std::env::var("HUSK_CHURN_MONITOR_UID").as_deref() {
        Ok("off") => None,
        Ok(b) => Some(
            b.parse::<u32>()
                .expect("HUSK_CHURN_MONITOR_UID: a uid or off"),
        ),
        Err(_) => Some(300_000),
    };
    let workers = env_count("HUSK_CHURN_WORKERS", 2).min(cycles);
    let tmp = TempDir::new("churn");
    let root = tmp.path().join("state");
    std::fs::create_dir_all(&root).unwrap();
    let _cleanup = ContainerRoot(root.clone());
    let bundle_dir = tmp.path().join("bundle");
    std::fs::create_dir_all(&bundle_dir).unwrap();
    let Some(bundle) = busybox_bundle(&bundle_dir, &["sleep", "1000"]) else {
        return;
    };
    let _ = husk_binary();
    let before = Snapshot::take(tmp.path(), &root);
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= cycles {
                        return;
                    }
                    cycle(tmp.path(), &root, &bundle, uid, n);
                }
            });
        }
    });
    let after = Snapshot::take(tmp.path(), &root);
    println!(
        "{cycles} cycles ({workers} at a time) in {:.0} s; before: {} husk processes, {} mounts, {} husk/tap devices, {} state files, {} fds; after: {} / {} / {} / {} / {}",
        started.elapsed().as_secs_f64(),
        before.husk_processes.len(),
        before.mounts.len(),
        before.net_devices.len(),
        before.state_files.len(),
        before.own_fds,
        after.husk_processes.len(),
        after.mounts.len(),
        after.net_devices.len(),
        after.state_files.len(),
        after.own_fds,
    );
    assert_eq!(before, after, "something was left behind");
}
