//! The OCI command line of the real `husk` binary: bad input that needs no VM, and the
//! lifecycle of containers in VMs on this machine's KVM (create, state, start, output, exec in
//! the VM, ps, kill, exit status, delete; run with an exit code). VM boots are few on
//! purpose: ~30 s each on nested kvm_pvm.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_e2e::{TempDir, busybox_bundle, guest_image, husk, husk_binary, kvm_available, skip};

fn is_root() -> bool {
    husk_e2e::is_root()
}

#[test]
fn bad_input_gives_one_clear_error_and_leaves_nothing() {
    let tmp = TempDir::new("oci-bad");
    let root = tmp.path().join("state");
    let _cleanup = husk_e2e::ContainerRoot(root.clone());
    let root_s = root.to_str().unwrap();
    for cmd in [
        &["state", "nope"][..],
        &["start", "nope"],
        &["kill", "nope"],
        &["delete", "nope"],
    ] {
        let (code, _, err) = husk(&root, cmd);
        assert_ne!(code, 0, "{cmd:?}");
        assert!(
            err.contains("container \"nope\" does not exist"),
            "{cmd:?}: {err}"
        );
    }
    // Malformed config.json: the error names the file and the line; no state is left behind.
    let bundle = tmp.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    std::fs::write(
        bundle.join("config.json"),
        "{\"ociVersion\": \"1.0.2\",\n  \"process\": 12}",
    )
    .unwrap();
    let log = tmp.path().join("log.json");
    let (code, _, err) = husk(
        &root,
        &[
            "--log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
            "create",
            "c1",
            "--bundle",
            bundle.to_str().unwrap(),
        ],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("config.json") && err.contains("line 2"),
        "{err}"
    );
    assert!(!root.join("c1").exists(), "state left behind");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("\"level\":\"error\"") && logged.contains("line 2"),
        "{logged}"
    );
    // An invalid id.
    let (code, _, err) = husk(
        &root,
        &["create", "../x", "--bundle", bundle.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(err.contains("../x"), "{err}");
    // Unknown signal.
    let (code, _, err) = husk(&root, &["kill", "nope", "SIGNOPE"]);
    assert_ne!(code, 0);
    assert!(err.contains("SIGNOPE"), "{err}");
    let (_, out, _) = husk(&root, &["list", "-q"]);
    assert_eq!(out, "", "{root_s}");
    // A kernel image that is not there.
    let (code, _, err) = husk(&root, &["vm", "boot", "--kernel", "/nonexistent/vmlinux"]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
    // A guest image named by HUSK_IMAGE_DIR that is not there: an error naming it, even
    // where an installed image could have been used instead.
    let good = tmp.path().join("good-bundle");
    std::fs::create_dir_all(good.join("rootfs")).unwrap();
    std::fs::write(
        good.join("config.json"),
        r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"},
            "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}}"#,
    )
    .unwrap();
    let missing = tmp.path().join("no-such-image");
    let out = Command::new(husk_binary())
        .env("HUSK_IMAGE_DIR", &missing)
        .arg("--root")
        .arg(&root)
        .args(["create", "img1", "--bundle"])
        .arg(&good)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "created with a missing image: {err}");
    assert!(
        err.contains(&format!("{}/vmlinux", missing.display())),
        "{err}"
    );
    assert!(!root.join("img1").exists(), "state left behind");
    // features and spec need nothing.
    let (code, out, _) = husk(&root, &["features"]);
    assert_eq!(code, 0);
    assert!(out.contains("ociVersionMax"));
    let spec_dir = tmp.path().join("spec");
    std::fs::create_dir_all(&spec_dir).unwrap();
    assert_eq!(
        husk(&root, &["spec", "--bundle", spec_dir.to_str().unwrap()]).0,
        0
    );
    assert!(spec_dir.join("config.json").is_file());
    assert_ne!(
        husk(&root, &["spec", "--bundle", spec_dir.to_str().unwrap()]).0,
        0
    );
}

fn wait_for(mut cond: impl FnMut() -> bool, limit: Duration, what: &str) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `pid` runs (a zombie does not: the relay's new parent may reap it late).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

/// The signals an engine sends to the pid it holds for an exec'd process reach the process in
/// the guest: `exec` itself, and the exec relay that `exec --detach --pid-file` leaves.
fn exec_signals_reach_the_process(root: &std::path::Path, tmp: &std::path::Path) {
    // The trap must be set before the signal comes: the script says when it is.
    let script = |name: &str, code: u8| {
        format!(
            "trap 'echo {name}-got-term >/tmp/{name}.term; exit {code}' TERM; touch /tmp/{name}.ready; \
             while :; do sleep 1000 & wait $!; done"
        )
    };
    let ready = |name: &str| {
        let path = format!("/tmp/{name}.ready");
        wait_for(
            || husk(root, &["exec", "c1", "cat", &path]).0 == 0,
            Duration::from_secs(60),
            "the exec'd shell's trap",
        );
    };
    // Attached: its exit status is the process's, which the trap chose.
    let mut attached = Command::new(husk_binary())
        .arg("--root")
        .arg(root)
        .args(["exec", "c1", "sh", "-c", &script("attached", 7)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    ready("attached");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(attached.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = attached.wait().unwrap();
    assert_eq!(status.code(), Some(7), "exec after SIGTERM: {status}");
    let (_, out, _) = husk(root, &["exec", "c1", "cat", "/tmp/attached.term"]);
    assert_eq!(out, "attached-got-term\n");

    // Detached: the pid file names the relay; the engine signals it.
    let pid_file = tmp.join("exec.pid");
    let status = Command::new(husk_binary())
        .arg("--root")
        .arg(root)
        .args(["exec", "--detach", "--pid-file"])
        .arg(&pid_file)
        .args(["c1", "sh", "-c", &script("detached", 9)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(status.success(), "exec --detach: {status}");
    let relay: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    ready("detached");
    assert!(
        running(relay),
        "the relay must stand for the running process"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for(
        || !running(relay),
        Duration::from_secs(60),
        "the relay to exit with the process",
    );
    let (_, out, _) = husk(root, &["exec", "c1", "cat", "/tmp/detached.term"]);
    assert_eq!(
        out, "detached-got-term\n",
        "the signal reached the process's trap"
    );
}

fn status_of(root: &std::path::Path, id: &str) -> String {
    let (code, out, err) = husk(root, &["state", id]);
    assert_eq!(code, 0, "state {id}: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["status"].as_str().unwrap().to_string()
}

#[test]
fn lifecycle_of_a_container_in_a_vm() {
    let Some(_image) = guest_image() else { return };
    if !kvm_available() || !is_root() {
        skip::<()>("needs /dev/kvm and root");
        return;
    }
    let tmp = TempDir::new("oci-life");
    let root = tmp.path().join("state");
    let _cleanup = husk_e2e::ContainerRoot(root.clone());
    let bundle_dir = tmp.path().join("bundle");
    std::fs::create_dir_all(&bundle_dir).unwrap();
    let Some(bundle) = busybox_bundle(
        &bundle_dir,
        &[
            "sh",
            "-c",
            "echo hello from $(uname -r) in $(hostname); exec sleep 1000",
        ],
    ) else {
        return;
    };
    let out_path = tmp.path().join("stdout");
    let pid_file = tmp.path().join("pid");
    // A descriptor the "engine" leaks into create (no CLOEXEC): it must not live on in the
    // monitor, which outlives create as long as the container.
    let leaked_path = tmp.path().join("leaked-by-the-engine");
    let leaked = std::fs::File::create(&leaked_path).unwrap();
    let leaked_fd = std::os::fd::AsRawFd::as_raw_fd(&leaked);
    let started = Instant::now();
    let mut create = Command::new(husk_binary());
    create
        .arg("--root")
        .arg(&root)
        .args(["create", "c1", "--bundle"])
        .arg(&bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::inherit());
    // SAFETY: fcntl is async-signal-safe; it only clears CLOEXEC on a descriptor we own.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut create, move || {
            libc::fcntl(leaked_fd, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let status = create.status().unwrap();
    drop(leaked);
    assert!(status.success(), "create failed");
    println!("create took {:.1} s", started.elapsed().as_secs_f64());
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(status_of(&root, "c1"), "created");
    let monitor_fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        !monitor_fds
            .iter()
            .any(|p| p.contains("leaked-by-the-engine")),
        "the monitor kept a descriptor the engine leaked: {monitor_fds:?}"
    );
    // The monitor holds guest memory: no core dumps of it.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().nth(4),
        Some("0"),
        "monitor's core limit: {core}"
    );
    let (_, state_json, _) = husk(&root, &["state", "c1"]);
    let v: serde_json::Value = serde_json::from_str(&state_json).unwrap();
    assert_eq!(v["pid"], pid);
    assert_eq!(v["bundle"], bundle.to_str().unwrap());
    assert!(v["ociVersion"].as_str().unwrap().starts_with("1."));
    // Nothing runs before start.
    assert_eq!(std::fs::read_to_string(&out_path).unwrap(), "");
    // A second create with the same id fails and changes nothing.
    let (code, _, err) = husk(
        &root,
        &["create", "c1", "--bundle", bundle.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");

    assert_eq!(husk(&root, &["start", "c1"]).0, 0);
    assert_eq!(status_of(&root, "c1"), "running");
    let (code, _, err) = husk(&root, &["start", "c1"]);
    assert_ne!(code, 0, "start of a running container must fail");
    assert!(err.contains("running"), "{err}");
    wait_for(
        || {
            std::fs::read_to_string(&out_path)
                .unwrap()
                .contains("hello from")
        },
        Duration::from_secs(60),
        "the container's output",
    );
    let out = std::fs::read_to_string(&out_path).unwrap();
    assert!(
        out.contains("hello from 6.1.") && out.contains("in husk-test"),
        "{out}"
    );

    // exec runs in the VM: its kernel is the guest's, not this host's.
    let (code, out, err) = husk(&root, &["exec", "c1", "uname", "-r"]);
    assert_eq!(code, 0, "exec: {err}");
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(out.starts_with("6.1."), "{out}");
    assert_ne!(out.trim(), host_release.trim());
    let (code, _, _) = husk(&root, &["exec", "c1", "sh", "-c", "exit 5"]);
    assert_eq!(code, 5, "exec's exit status");
    exec_signals_reach_the_process(&root, tmp.path());
    // ps: the main process is pid 1 of its namespace; ps lists guest pids.
    let (code, out, err) = husk(&root, &["ps", "c1", "--format", "json"]);
    assert_eq!(code, 0, "ps: {err}");
    let pids: Vec<u32> = serde_json::from_str(&out).unwrap();
    assert!(!pids.is_empty(), "{out}");
    let (_, list, _) = husk(&root, &["list"]);
    assert!(list.contains("c1") && list.contains("running"), "{list}");

    // delete refuses a running container.
    let (code, _, err) = husk(&root, &["delete", "c1"]);
    assert_ne!(code, 0);
    assert!(err.contains("running"), "{err}");

    assert_eq!(husk(&root, &["kill", "c1", "KILL"]).0, 0);
    wait_for(
        || status_of(&root, "c1") == "stopped",
        Duration::from_secs(120),
        "the container to stop",
    );
    let (_, state_json, _) = husk(&root, &["state", "c1"]);
    let v: serde_json::Value = serde_json::from_str(&state_json).unwrap();
    assert_eq!(v["exitStatus"], 137, "{state_json}");
    let (code, _, err) = husk(&root, &["kill", "c1"]);
    assert_ne!(code, 0, "kill of a stopped container must fail");
    assert!(err.contains("stopped"), "{err}");
    assert_eq!(husk(&root, &["delete", "c1"]).0, 0);
    assert!(!root.join("c1").exists(), "state dir left behind");
    // The monitor is gone.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn run_propagates_the_exit_status() {
    let Some(_image) = guest_image() else { return };
    if !kvm_available() || !is_root() {
        skip::<()>("needs /dev/kvm and root");
        return;
    }
    let tmp = TempDir::new("oci-run");
    let root = tmp.path().join("state");
    let _cleanup = husk_e2e::ContainerRoot(root.clone());
    let bundle_dir = tmp.path().join("bundle");
    std::fs::create_dir_all(&bundle_dir).unwrap();
    // The spec mounts nothing on /dev (as the set-up's first container): /dev is the rootfs's
    // own directory on the share, where the host side makes no device nodes, and the default
    // devices must still work (runc binds them where mknod is refused).
    let Some(bundle) = busybox_bundle(
        &bundle_dir,
        &[
            "sh",
            "-c",
            "test -c /dev/null && test -c /dev/zero && echo gone > /dev/null && echo out; \
             echo err >&2; exit 3",
        ],
    ) else {
        return;
    };
    let config = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["destination"] != "/dev");
    std::fs::write(&config, spec.to_string()).unwrap();
    let out = Command::new(husk_binary())
        .arg("--root")
        .arg(&root)
        .args(["run", "r1", "--bundle"])
        .arg(&bundle)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err\n"));
    assert!(!root.join("r1").exists(), "run left state behind");
}
