//! Pods through the OCI command line of the real `husk` binary: a sandbox owns a VM, a later
//! container that CRI's annotations put in its pod (or that names the sandbox's network
//! namespace) is created inside that VM, next to it, with its own rootfs, bind mounts, stdio,
//! cgroup and lifecycle; deleting it takes it out of the VM and its files out of the share.
//! On the host the sandbox's monitor (the VM) lives in the sandbox's `cgroupsPath` and the
//! process standing for a later container in that container's, without limits: its limits
//! hold in the VM, where `update` changes them through the sandbox's monitor.
//! One VM for the whole test (boots are ~30 s on nested kvm_pvm).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_e2e::{
    TempDir, busybox_bundle, cgroups, guest_image, husk, husk_binary, kvm_available, skip, tty,
};

fn wait_for(mut cond: impl FnMut() -> bool, limit: Duration, what: &str) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn state_of(root: &Path, id: &str) -> serde_json::Value {
    let (code, out, err) = husk(root, &["state", id]);
    assert_eq!(code, 0, "state {id}: {err}");
    serde_json::from_str(&out).unwrap()
}

fn status_of(root: &Path, id: &str) -> String {
    state_of(root, id)["status"].as_str().unwrap().to_string()
}

/// Edits a bundle's config.json.
fn edit_config(bundle: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = bundle.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// `husk create` of `bundle` as `id`, its stdout into `out`; asserts it succeeds.
fn create(root: &Path, id: &str, bundle: &Path, out: &Path) {
    let status = Command::new(husk_binary())
        .arg("--root")
        .arg(root)
        .args(["create", id, "--bundle"])
        .arg(bundle)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(status.success(), "create {id} failed");
}

fn exec(root: &Path, id: &str, cmd: &str) -> (i32, String) {
    let (code, out, err) = husk(root, &["exec", id, "sh", "-c", cmd]);
    eprint!("{err}");
    (code, out)
}

/// The guest kernel's boot id: the same for every container of one VM.
const BOOT_ID: &str = "cat /proc/sys/kernel/random/boot_id";

#[test]
fn a_pods_containers_share_its_vm() {
    let Some(_image) = guest_image() else { return };
    if !kvm_available() || !husk_e2e::is_root() {
        skip::<()>("needs /dev/kvm and root");
        return;
    }
    let tmp = TempDir::new("pods");
    let root = tmp.path().join("state");
    let _cleanup = husk_e2e::ContainerRoot(root.clone());
    // The pod's cgroups, below this test's own (a parent of the test's, removed at its end).
    let parent = format!("husk-e2e-pod-{}", std::process::id());
    let _parent = Parents(parent.clone());

    // The sandbox: a network namespace of its own (as CRI's pause container has).
    let Some(sandbox) = busybox_bundle(&tmp.path().join("sandbox"), &["sleep", "1000"]) else {
        return;
    };
    edit_config(&sandbox, |v| {
        v["annotations"] = serde_json::json!({
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": "pod1",
        });
        v["hostname"] = "pod-host".into();
        v["linux"]["cgroupsPath"] = format!("{parent}/pod1").into();
        v["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "network"}));
    });
    create(&root, "pod1", &sandbox, &tmp.path().join("pod1.out"));
    assert_eq!(husk(&root, &["start", "pod1"]).0, 0);
    let sandbox_pid = state_of(&root, "pod1")["pid"].as_i64().unwrap();
    let (code, sandbox_boot) = exec(&root, "pod1", BOOT_ID);
    assert_eq!(code, 0);

    // A container of the pod, by CRI's annotations: its own rootfs, a host directory bound
    // read-write, a file bound read-only, the sandbox's uts namespace by path.
    let Some(app) = busybox_bundle(
        &tmp.path().join("app"),
        &[
            "sh",
            "-c",
            "echo app-says-hi; hostname; cat /app-marker; cat /etc/pod-file; \
             echo from-app > /data/written; exec sleep 1000",
        ],
    ) else {
        return;
    };
    std::fs::write(app.join("rootfs/app-marker"), "app-rootfs\n").unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let pod_file = tmp.path().join("pod-file");
    std::fs::write(&pod_file, "bound-file\n").unwrap();
    edit_config(&app, |v| {
        v["annotations"] = serde_json::json!({
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "pod1",
        });
        v["hostname"] = serde_json::Value::Null;
        v["linux"]["cgroupsPath"] = format!("{parent}/app").into();
        let mounts = v["mounts"].as_array_mut().unwrap();
        mounts.push(serde_json::json!({
            "destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]
        }));
        mounts.push(serde_json::json!({
            "destination": "/etc/pod-file", "type": "bind", "source": pod_file,
            "options": ["bind", "ro"]
        }));
        let ns = v["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "uts");
        ns.push(serde_json::json!({"type": "uts", "path": format!("/proc/{sandbox_pid}/ns/uts")}));
        ns.push(
            serde_json::json!({"type": "network", "path": format!("/proc/{sandbox_pid}/ns/net")}),
        );
    });
    let app_out = tmp.path().join("app.out");
    let started = Instant::now();
    create(&root, "app", &app, &app_out);
    println!(
        "a pod's container created in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let app_state = state_of(&root, "app");
    assert_eq!(app_state["status"], "created");
    let member_pid = app_state["pid"].as_i64().unwrap();
    assert_ne!(member_pid, sandbox_pid);
    assert!(
        root.join("pod1/share/pod/app/rootfs").is_dir(),
        "the app's mount point in the sandbox's share"
    );
    assert_eq!(husk(&root, &["start", "app"]).0, 0);
    assert_eq!(status_of(&root, "app"), "running");
    // The member reads what the sandbox's (possibly taken-over) monitor sends: once it serves,
    // every thread of it is under a seccomp filter (its main thread installs its own right
    // after it reported the container created, so wait for it).
    let unfiltered = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{member_pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
            .filter(|s| !s.contains("Seccomp:\t2\n"))
            .map(|s| s.lines().next().unwrap_or_default().to_owned())
            .collect()
    };
    let waited = Instant::now();
    loop {
        let left = unfiltered();
        if left.is_empty() {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "threads of the member {member_pid} without a seccomp filter: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for(
        || {
            std::fs::read_to_string(&app_out)
                .unwrap_or_default()
                .contains("bound-file")
        },
        Duration::from_secs(120),
        "the app's output",
    );
    assert_eq!(
        std::fs::read_to_string(&app_out).unwrap(),
        "app-says-hi\npod-host\napp-rootfs\nbound-file\n"
    );
    // Written before the output's last line, but through another file system's cache.
    wait_for(
        || std::fs::read_to_string(data.join("written")).is_ok_and(|s| s == "from-app\n"),
        Duration::from_secs(60),
        "the app's write to its bind mount",
    );

    // One VM: the same kernel; each container its own files and processes.
    let (code, app_boot) = exec(&root, "app", BOOT_ID);
    assert_eq!(code, 0);
    assert_eq!(app_boot, sandbox_boot, "the app runs in the sandbox's VM");
    let (code, out) = exec(
        &root,
        "app",
        "cat /app-marker; echo >> /etc/pod-file || echo ro",
    );
    assert_eq!((code, out.as_str()), (0, "app-rootfs\nro\n"));
    let (code, out) = exec(&root, "pod1", "cat /app-marker 2>&1 || echo absent");
    assert_eq!(code, 0);
    assert!(out.ends_with("absent\n"), "{out}");
    let (code, out) = exec(&root, "app", "exit 3");
    assert_eq!((code, out.as_str()), (3, ""));
    let (code, ps, err) = husk(&root, &["ps", "--format", "json", "app"]);
    assert_eq!(code, 0, "{err}");
    let app_pids: Vec<u32> = serde_json::from_str(&ps).unwrap();
    let (_, ps, _) = husk(&root, &["ps", "--format", "json", "pod1"]);
    let sandbox_pids: Vec<u32> = serde_json::from_str(&ps).unwrap();
    assert!(!app_pids.is_empty() && !sandbox_pids.is_empty());
    assert!(
        app_pids.iter().all(|p| !sandbox_pids.contains(p)),
        "ps of each container lists its own processes: {app_pids:?} {sandbox_pids:?}"
    );

    // Pause freezes the app alone.
    assert_eq!(husk(&root, &["pause", "app"]).0, 0);
    assert_eq!(status_of(&root, "app"), "paused");
    assert_eq!(status_of(&root, "pod1"), "running");
    let (code, _) = exec(&root, "pod1", "true");
    assert_eq!(code, 0, "the sandbox runs while the app is paused");
    assert_eq!(husk(&root, &["resume", "app"]).0, 0);
    assert_eq!(status_of(&root, "app"), "running");

    // Its resource usage, from its own cgroup in the guest.
    let (code, stats, err) = husk(&root, &["events", "--stats", "app"]);
    assert_eq!(code, 0, "{err}");
    let stats: serde_json::Value = serde_json::from_str(stats.trim()).unwrap();
    assert_eq!(stats["type"], "stats", "{stats}");
    assert!(
        stats["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(
        stats["data"]["pids"]["current"].as_u64().unwrap() >= 1,
        "{stats}"
    );

    // On the host: the VM in the sandbox's cgroup, the app's process in its own, unlimited.
    let sandbox_cgroup = cgroups::cgroup_of(u32::try_from(sandbox_pid).unwrap(), "memory");
    let app_cgroup = cgroups::cgroup_of(u32::try_from(member_pid).unwrap(), "memory");
    if let Some(own) = cgroups::cgroup_of(std::process::id(), "memory") {
        let sandbox_dir = sandbox_cgroup.clone().unwrap();
        assert_eq!(sandbox_dir, own.join(&parent).join("pod1"));
        assert_eq!(app_cgroup.clone().unwrap(), own.join(&parent).join("app"));
        let vcpu = cgroups::vcpu_threads(u32::try_from(sandbox_pid).unwrap())[0];
        assert!(cgroups::tasks_in(&sandbox_dir).contains(&vcpu));
    }
    // update of the app: through the sandbox's monitor, into its cgroup in the VM.
    let (code, _, err) = husk(
        &root,
        &["update", "--memory", "32m", "--pids-limit", "12", "app"],
    );
    assert_eq!(code, 0, "{err}");
    let (_, stats, _) = husk(&root, &["events", "--stats", "app"]);
    let stats: serde_json::Value = serde_json::from_str(stats.trim()).unwrap();
    assert_eq!(
        stats["data"]["memory"]["usage"]["limit"],
        32u64 << 20,
        "{stats}"
    );
    assert_eq!(stats["data"]["pids"]["limit"], 12, "{stats}");
    // More than the pod's VM (256 MiB) leaves: refused, nothing changed.
    let (code, _, err) = husk(&root, &["update", "--memory", "1g", "app"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("1024 MiB") && err.contains("does not grow"),
        "{err}"
    );
    let (_, stats, _) = husk(&root, &["events", "--stats", "app"]);
    let stats: serde_json::Value = serde_json::from_str(stats.trim()).unwrap();
    assert_eq!(
        stats["data"]["memory"]["usage"]["limit"],
        32u64 << 20,
        "{stats}"
    );

    // A container of the pod with a terminal: the engine gets the master, resizes reach it.
    let Some(term) = busybox_bundle(&tmp.path().join("term"), &["sh"]) else {
        return;
    };
    edit_config(&term, |v| {
        v["annotations"] = serde_json::json!({
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "pod1",
        });
        v["process"]["terminal"] = true.into();
        v["mounts"]
            .as_array_mut()
            .unwrap()
            .push(tty::devpts_mount());
    });
    let sock = tmp.path().join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut create_term = Command::new(husk_binary());
    create_term
        .arg("--root")
        .arg(&root)
        .args(["create", "term", "--console-socket"])
        .arg(&sock)
        .arg("--bundle")
        .arg(&term)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut create_term = create_term.spawn().unwrap();
    let (master, name) = tty::recv_fd(&listener);
    assert!(name.starts_with("/dev/pts/"), "{name}");
    assert!(create_term.wait().unwrap().success(), "create term");
    let mut master = tty::nonblocking(master);
    assert_eq!(husk(&root, &["start", "term"]).0, 0);
    master.write_all(b"echo hi-$((40+2))\n").unwrap();
    tty::read_until(&mut master, "hi-42", Duration::from_secs(60));
    tty::resize(&master, 40, 100);
    // The resize travels on its own; ask until the shell sees it.
    let start = Instant::now();
    loop {
        master.write_all(b"stty size\n").unwrap();
        let seen = tty::read_until(&mut master, "\n", Duration::from_secs(30));
        if seen.contains("40 100") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no resize: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    master.write_all(b"exit 5\n").unwrap();
    wait_for(
        || status_of(&root, "term") == "stopped",
        Duration::from_secs(60),
        "the terminal's shell to exit",
    );
    assert_eq!(state_of(&root, "term")["exitStatus"], 5);
    assert_eq!(husk(&root, &["delete", "term"]).0, 0);

    // A container whose limits do not fit in the pod's VM (the default 256 MiB) is refused.
    let Some(big) = busybox_bundle(&tmp.path().join("big"), &["true"]) else {
        return;
    };
    edit_config(&big, |v| {
        v["annotations"] = serde_json::json!({
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "pod1",
        });
        v["linux"]["resources"] = serde_json::json!({"memory": {"limit": 1u64 << 30}});
    });
    let (code, _, err) = husk(&root, &["create", "big", "--bundle", big.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("memory limit (1024 MiB)") && err.contains("does not grow"),
        "{err}"
    );
    assert!(!root.join("big").exists());
    assert!(!root.join("pod1/share/pod/big").exists());

    // A second container, matched by the sandbox's network namespace alone (podman's pods).
    let Some(side) = busybox_bundle(&tmp.path().join("side"), &["sh", "-c", BOOT_ID]) else {
        return;
    };
    edit_config(&side, |v| {
        v["linux"]["namespaces"].as_array_mut().unwrap().push(
            serde_json::json!({"type": "network", "path": format!("/proc/{sandbox_pid}/ns/net")}),
        );
    });
    let side_out = tmp.path().join("side.out");
    create(&root, "side", &side, &side_out);
    assert_eq!(husk(&root, &["start", "side"]).0, 0);
    wait_for(
        || status_of(&root, "side") == "stopped",
        Duration::from_secs(120),
        "the side container's exit",
    );
    assert_eq!(std::fs::read_to_string(&side_out).unwrap(), sandbox_boot);
    assert_eq!(state_of(&root, "side")["exitStatus"], 0);
    assert_eq!(husk(&root, &["delete", "side"]).0, 0);
    assert!(!root.join("pod1/share/pod/side").exists());

    // The app stops on a signal (its `sleep` is pid 1 of its pid namespace: only SIGKILL);
    // delete takes it out of the VM and the share.
    assert_eq!(husk(&root, &["kill", "app", "KILL"]).0, 0);
    wait_for(
        || status_of(&root, "app") == "stopped",
        Duration::from_secs(60),
        "the app's exit",
    );
    assert_eq!(state_of(&root, "app")["exitStatus"], 128 + 9);
    wait_for(
        || !std::path::Path::new(&format!("/proc/{member_pid}")).exists(),
        Duration::from_secs(30),
        "the app's process on the host to end",
    );
    assert_eq!(husk(&root, &["delete", "app"]).0, 0);
    assert!(!root.join("app").exists());
    if let Some(dir) = &app_cgroup {
        assert!(!dir.exists(), "the app's cgroup is left: {}", dir.display());
    }
    assert!(!root.join("pod1/share/pod/app").exists());
    assert_eq!(status_of(&root, "pod1"), "running");
    let (code, _) = exec(&root, "pod1", "true");
    assert_eq!(code, 0, "the sandbox runs on after its app is deleted");

    // A container of a pod whose sandbox is not there is refused, and leaves nothing.
    let Some(orphan) = busybox_bundle(&tmp.path().join("orphan"), &["true"]) else {
        return;
    };
    edit_config(&orphan, |v| {
        v["annotations"] = serde_json::json!({
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "nope",
        });
    });
    let (code, _, err) = husk(
        &root,
        &["create", "orphan", "--bundle", orphan.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("sandbox nope") && err.contains("io.kubernetes.cri.container-type"),
        "{err}"
    );
    assert!(!root.join("orphan").exists());

    // The sandbox's end ends the pod: a container still in it stops with the VM.
    let Some(last) = busybox_bundle(&tmp.path().join("last"), &["sleep", "1000"]) else {
        return;
    };
    edit_config(&last, |v| {
        v["annotations"] = serde_json::json!({
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "pod1",
        });
    });
    create(&root, "last", &last, &tmp.path().join("last.out"));
    assert_eq!(husk(&root, &["start", "last"]).0, 0);
    assert_eq!(husk(&root, &["kill", "pod1", "KILL"]).0, 0);
    wait_for(
        || status_of(&root, "last") == "stopped" && status_of(&root, "pod1") == "stopped",
        Duration::from_secs(60),
        "the pod's end",
    );
    assert_eq!(state_of(&root, "last")["exitStatus"], 128 + 9);
    assert_eq!(husk(&root, &["delete", "last"]).0, 0);
    assert_eq!(husk(&root, &["delete", "pod1"]).0, 0);
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "nothing left in the root"
    );
    if let Some(dir) = &sandbox_cgroup {
        assert!(
            !dir.exists(),
            "the sandbox's cgroup is left: {}",
            dir.display()
        );
    }
}

/// Removes the test's parent cgroup (`delete` removes the containers' own, as runc does).
struct Parents(String);

impl Drop for Parents {
    fn drop(&mut self) {
        cgroups::remove_tree(&self.0, true);
    }
}
