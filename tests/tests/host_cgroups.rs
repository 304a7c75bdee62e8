//! A container's cgroup on the host (issue 22): with `cgroupsPath` the monitor, every thread of
//! the VM included, lives there with the spec's limits plus what the VM costs, its vCPUs pinned
//! to the spec's host CPUs; `husk update` changes the limits there and in the guest, refusing
//! what the VM cannot meet; `delete` removes the cgroup. Through the OCI command line of the
//! real `husk` binary, checked in the files of the host's cgroup filesystem (v1 here).
//! Three VMs for the whole test (restored from a template; ~30 s each on nested kvm_pvm).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use husk_e2e::cgroups::{self, read};
use husk_e2e::{TempDir, busybox_bundle, guest_image, husk, husk_binary, kvm_available, skip};

fn edit_config(bundle: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = bundle.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// `husk [global] create`, the container's stdio (which the monitor keeps) in files of the
/// bundle.
fn create(root: &Path, global: &[&str], id: &str, bundle: &Path) {
    let status = Command::new(husk_binary())
        .arg("--root")
        .arg(root)
        .args(global)
        .args(["create", id, "--bundle"])
        .arg(bundle)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(bundle.join("out")).unwrap())
        .stderr(std::fs::File::create(bundle.join("err")).unwrap())
        .status()
        .unwrap();
    let err = std::fs::read_to_string(bundle.join("err")).unwrap_or_default();
    assert!(status.success(), "create {id}: {err}");
}

fn monitor_pid(root: &Path, id: &str) -> u32 {
    let (code, out, err) = husk(root, &["state", id]);
    assert_eq!(code, 0, "state {id}: {err}");
    let state: serde_json::Value = serde_json::from_str(&out).unwrap();
    u32::try_from(state["pid"].as_i64().unwrap()).unwrap()
}

/// The guest's limits of the container, from `events --stats`: (memory, pids).
fn guest_limits(root: &Path, id: &str) -> (serde_json::Value, serde_json::Value) {
    let (code, out, err) = husk(root, &["events", "--stats", id]);
    assert_eq!(code, 0, "events {id}: {err}");
    let ev: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    (
        ev["data"]["memory"]["usage"]["limit"].clone(),
        ev["data"]["pids"]["limit"].clone(),
    )
}

/// `husk update ARGS id`, with `stdin`; (exit code, stderr).
fn update(root: &Path, id: &str, args: &[&str], stdin: &str) -> (i32, String) {
    let mut child = Command::new(husk_binary())
        .arg("--root")
        .arg(root)
        .arg("update")
        .args(args)
        .arg(id)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Removes the test's parent cgroups (what `delete` leaves, as runc does: it removes the
/// container's own).
struct Parents(String);

impl Drop for Parents {
    fn drop(&mut self) {
        cgroups::remove_tree(&self.0, true);
        cgroups::remove_tree(&self.0, false);
    }
}

#[test]
fn cgroups_path_holds_the_vm_with_the_specs_limits_and_update_changes_them() {
    let Some(_image) = guest_image() else { return };
    if !kvm_available() || !husk_e2e::is_root() {
        skip::<()>("needs /dev/kvm and root");
        return;
    }
    if !cgroups::is_v1() {
        skip::<()>("checks a cgroup v1 host's files (this host has v2 only)");
        return;
    }
    let tmp = TempDir::new("host-cgroups");
    let root = tmp.path().join("state");
    let _cleanup = husk_e2e::ContainerRoot(root.clone());
    let parent = format!("husk-e2e-cg-{}", std::process::id());
    let _parents = Parents(parent.clone());

    // Relative: below this test's own cgroup; limits, and a cpuset of host CPU 0.
    let Some(rel) = busybox_bundle(&tmp.path().join("rel"), &["sleep", "100000"]) else {
        return;
    };
    let limit: u64 = 128 << 20;
    edit_config(&rel, |v| {
        v["linux"]["cgroupsPath"] = format!("{parent}/rel").into();
        v["linux"]["resources"] = serde_json::json!({
            "memory": {"limit": limit},
            "cpu": {"shares": 512, "quota": 100_000, "period": 100_000, "cpus": "0"},
            "pids": {"limit": 40},
        });
    });
    // Absolute: below each hierarchy's root; no limits.
    let Some(abs) = busybox_bundle(&tmp.path().join("abs"), &["sleep", "100000"]) else {
        return;
    };
    edit_config(&abs, |v| {
        v["linux"]["cgroupsPath"] = format!("/{parent}/abs").into();
    });
    // systemd's "slice:prefix:name" with --systemd-cgroup: the scope below the slice, below
    // pid 1's cgroup (the root here, where no systemd runs).
    let slice = format!("huske2e{}.slice", std::process::id());
    let _slice = Parents(slice.clone());
    let Some(sd) = busybox_bundle(&tmp.path().join("sd"), &["sleep", "100000"]) else {
        return;
    };
    edit_config(&sd, |v| {
        v["linux"]["cgroupsPath"] = format!("{slice}:husk:sd").into();
    });
    create(&root, &[], "rel", &rel);
    create(&root, &[], "abs", &abs);
    create(&root, &["--systemd-cgroup"], "sd", &sd);
    assert_eq!(husk(&root, &["start", "rel"]).0, 0);
    let rel_pid = monitor_pid(&root, "rel");
    let abs_pid = monitor_pid(&root, "abs");
    let sd_pid = monitor_pid(&root, "sd");
    let init_cgroup = |controller: &str| cgroups::cgroup_of(1, controller).unwrap();

    // Where they are: each hierarchy, every thread of the monitor.
    let me = std::process::id();
    let mut rel_dirs: Vec<PathBuf> = Vec::new();
    for controller in ["memory", "pids", "cpu", "cpuset"] {
        let own = cgroups::cgroup_of(me, controller).unwrap();
        let dir = cgroups::cgroup_of(rel_pid, controller).unwrap();
        assert_eq!(dir, own.join(&parent).join("rel"), "{controller}");
        let tasks = cgroups::tasks_in(&dir);
        let threads = cgroups::threads_of(rel_pid);
        assert!(
            threads.iter().all(|t| tasks.contains(t)),
            "{controller}: threads {threads:?}, in the cgroup {tasks:?}"
        );
        let root_dir = cgroups::mount_point(controller).unwrap();
        assert_eq!(
            cgroups::cgroup_of(abs_pid, controller).unwrap(),
            root_dir.join(&parent).join("abs"),
            "{controller}"
        );
        assert_eq!(
            cgroups::cgroup_of(sd_pid, controller).unwrap(),
            init_cgroup(controller).join(&slice).join("husk-sd.scope"),
            "{controller}"
        );
        rel_dirs.push(dir);
    }
    let [memory, pids, cpu, cpuset] = <[PathBuf; 4]>::try_from(rel_dirs.clone()).unwrap();

    // The limits: memory bounds the VM (the limit, the guest's and the VMM's overhead), pids
    // adds the monitor's threads, CPU as given, the vCPUs pinned to host CPU 0.
    assert_eq!(
        read(&memory, "memory.limit_in_bytes"),
        cgroups::host_memory_limit(limit).to_string()
    );
    assert_eq!(
        read(&pids, "pids.max"),
        (40 + cgroups::MONITOR_TASKS + 1).to_string()
    );
    assert_eq!(read(&cpu, "cpu.shares"), "512");
    assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "100000");
    assert_eq!(read(&cpuset, "cpuset.cpus"), "0");
    let vcpus = cgroups::vcpu_threads(rel_pid);
    assert_eq!(vcpus.len(), 1, "one vCPU");
    assert_eq!(cgroups::cpus_allowed(rel_pid, vcpus[0]), "0");
    // The guest has the spec's limits for the container.
    assert_eq!(guest_limits(&root, "rel"), (limit.into(), 40.into()));

    // update: CPU and pids on the host and in the guest, memory in the guest (the VM keeps its
    // bound on the host).
    let (code, err) = update(
        &root,
        "rel",
        &[
            "--memory",
            "64m",
            "--pids-limit",
            "20",
            "--cpu-quota",
            "50000",
            "--cpu-share",
            "256",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        read(&pids, "pids.max"),
        (20 + cgroups::MONITOR_TASKS + 1).to_string()
    );
    assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "50000");
    assert_eq!(read(&cpu, "cpu.shares"), "256");
    assert_eq!(
        read(&memory, "memory.limit_in_bytes"),
        cgroups::host_memory_limit(limit).to_string()
    );
    assert_eq!(
        guest_limits(&root, "rel"),
        ((64u64 << 20).into(), 20.into())
    );
    // JSON on stdin, runc's `-r -`.
    let (code, err) = update(&root, "rel", &["-r", "-"], r#"{"pids": {"limit": 30}}"#);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        read(&pids, "pids.max"),
        (30 + cgroups::MONITOR_TASKS + 1).to_string()
    );
    assert_eq!(guest_limits(&root, "rel").1, 30);
    // Another host CPU, where the host has one: the vCPU follows.
    if std::fs::read_to_string("/sys/devices/system/cpu/online").is_ok_and(|c| c.trim() != "0") {
        let (code, err) = update(&root, "rel", &["--cpuset-cpus", "1"], "");
        assert_eq!(code, 0, "{err}");
        assert_eq!(read(&cpuset, "cpuset.cpus"), "1");
        assert_eq!(cgroups::cpus_allowed(rel_pid, vcpus[0]), "1");
    }
    let pinned = read(&cpuset, "cpuset.cpus");

    // What the VM cannot meet without growing is refused, naming the limit, and the host's
    // values changed before the guest refused are put back.
    let (code, err) = update(&root, "rel", &["--memory", "1g", "--pids-limit", "7"], "");
    assert_ne!(code, 0);
    assert!(
        err.contains("linux.resources.memory.limit: 1024 MiB") && err.contains("does not grow"),
        "{err}"
    );
    assert_eq!(
        read(&pids, "pids.max"),
        (30 + cgroups::MONITOR_TASKS + 1).to_string()
    );
    assert_eq!(
        guest_limits(&root, "rel"),
        ((64u64 << 20).into(), 30.into())
    );
    let (code, err) = update(&root, "rel", &["--cpuset-cpus", "0-1"], "");
    assert_ne!(code, 0);
    assert!(
        err.contains("linux.resources.cpu.cpus") && err.contains("1 vCPUs"),
        "{err}"
    );
    assert_eq!(read(&cpuset, "cpuset.cpus"), pinned);
    // Bad input: named, nothing changed.
    let (code, err) = update(&root, "rel", &["--memory", "lots"], "");
    assert_ne!(code, 0);
    assert!(err.contains("--memory: \"lots\" is not a size"), "{err}");
    let (code, err) = update(&root, "rel", &["-r", "-"], "{\"pids\": 5}");
    assert_ne!(code, 0);
    assert!(err.contains("--resources -: not a LinuxResources"), "{err}");

    // delete removes the containers' cgroups (their parents are the test's).
    assert_eq!(husk(&root, &["delete", "-f", "rel"]).0, 0);
    assert_eq!(husk(&root, &["delete", "-f", "abs"]).0, 0);
    assert_eq!(husk(&root, &["delete", "-f", "sd"]).0, 0);
    for dir in &rel_dirs {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
    for controller in ["memory", "pids", "cpu", "cpuset"] {
        let mount = cgroups::mount_point(controller).unwrap();
        for dir in [
            mount.join(&parent).join("abs"),
            init_cgroup(controller).join(&slice).join("husk-sd.scope"),
        ] {
            assert!(!dir.exists(), "{} is left", dir.display());
        }
    }
}

#[test]
fn a_bad_cgroups_path_is_refused_naming_it_and_leaves_nothing() {
    if !husk_e2e::is_root() {
        skip::<()>("needs root");
        return;
    }
    let tmp = TempDir::new("bad-cgroups-path");
    let root = tmp.path().join("state");
    let Some(bundle) = busybox_bundle(&tmp.path().join("b"), &["true"]) else {
        return;
    };
    for (systemd, path, why) in [
        (false, "/", "names the root cgroup itself"),
        (false, "..", "names the runtime's own cgroup itself"),
        (true, "/a/b", "is not \"slice:prefix:name\""),
        (true, "system.slice:x:../../y", "is not a unit name"),
        (true, "nope:x:y", "is not a slice name"),
    ] {
        edit_config(&bundle, |v| v["linux"]["cgroupsPath"] = path.into());
        let mut args = vec!["create", "c1", "--bundle", bundle.to_str().unwrap()];
        if systemd {
            args.insert(0, "--systemd-cgroup");
        }
        let (code, _, err) = husk(&root, &args);
        assert_ne!(code, 0, "{path}");
        assert!(
            err.contains("config.json: linux.cgroupsPath: ") && err.contains(why),
            "{path}: {err}"
        );
        assert!(!root.join("c1").exists(), "{path}: state left");
    }
}

#[test]
fn checkpoint_and_restore_say_they_are_not_supported() {
    let tmp = TempDir::new("checkpoint");
    for verb in ["checkpoint", "restore"] {
        let (code, _, err) = husk(tmp.path(), &[verb, "--image-path", "/x", "c1"]);
        assert_eq!(code, 1, "{verb}");
        assert!(
            err.contains(&format!("{verb}: checkpoint and restore are not supported")),
            "{verb}: {err}"
        );
    }
    let (code, help, _) = husk(tmp.path(), &["--help"]);
    assert_eq!(code, 0);
    assert!(
        help.contains("Not supported: checkpoint and restore"),
        "{help}"
    );
    let (code, features, _) = husk(tmp.path(), &["features"]);
    assert_eq!(code, 0);
    let features: serde_json::Value = serde_json::from_str(&features).unwrap();
    assert_eq!(
        features["annotations"]["org.opencontainers.runc.checkpoint.enabled"],
        "false"
    );
}
