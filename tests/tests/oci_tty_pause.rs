//! Two containers at once: one with a terminal handed to us over --console-socket (a shell
//! we drive through the pty master, window size included), one we pause, resume and read
//! stats from. Two VM boots, in parallel.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_e2e::tty::{devpts_mount, nonblocking, read_until, recv_fd, resize};
use husk_e2e::{
    TempDir, busybox_bundle, guest_image, husk, husk_binary, is_root, kvm_available, skip,
};

fn status_of(root: &Path, id: &str) -> String {
    let (code, out, err) = husk(root, &["state", id]);
    assert_eq!(code, 0, "state {id}: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["status"].as_str().unwrap().to_string()
}

#[test]
fn terminal_pause_resume_and_two_containers_at_once() {
    if guest_image().is_none() {
        return;
    }
    if !kvm_available() || !is_root() {
        skip::<()>("needs /dev/kvm and root");
        return;
    }
    let tmp = TempDir::new("oci-tty");
    let root = tmp.path().join("state");
    let _cleanup = husk_e2e::ContainerRoot(root.clone());
    let b1 = tmp.path().join("b1");
    let b2 = tmp.path().join("b2");
    std::fs::create_dir_all(&b1).unwrap();
    std::fs::create_dir_all(&b2).unwrap();
    let Some(b1) = busybox_bundle(&b1, &["sh"]) else {
        return;
    };
    let Some(b2) = busybox_bundle(&b2, &["sleep", "1000"]) else {
        return;
    };
    // Container 1 gets a terminal.
    let cfg = b1.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["process"]["terminal"] = serde_json::Value::Bool(true);
    // The terminal comes from the container's own devpts, as with runc.
    v["mounts"].as_array_mut().unwrap().push(devpts_mount());
    v["process"]["env"] = serde_json::json!(["PATH=/bin", "HOME=/root", "TERM=xterm"]);
    std::fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
    let sock = tmp.path().join("console.sock");
    let listener = UnixListener::bind(&sock).unwrap();

    // Both VMs are restored from the default template (made by the first of them if there is
    // none): the terminal, exec and pause below run on restored VMs.
    let phases = |id: &str| tmp.path().join(format!("{id}.phases"));
    let create = |id: &str, bundle: &Path, console: Option<&Path>| {
        let mut cmd = Command::new(husk_binary());
        cmd.arg("--root")
            .arg(&root)
            .args(["create", id, "--bundle"])
            .arg(bundle)
            .env("HUSK_PHASES", phases(id));
        if let Some(c) = console {
            cmd.arg("--console-socket").arg(c);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd.spawn().unwrap()
    };
    let started = Instant::now();
    let mut c1 = create("tty1", &b1, Some(&sock));
    let mut c2 = create("plain2", &b2, None);
    let (master, name) = recv_fd(&listener);
    assert!(name.starts_with("/dev/pts/"), "{name}");
    assert!(c1.wait().unwrap().success(), "create tty1");
    assert!(c2.wait().unwrap().success(), "create plain2");
    println!(
        "two creates in parallel took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(status_of(&root, "tty1"), "created");
    assert_eq!(status_of(&root, "plain2"), "created");
    for id in ["tty1", "plain2"] {
        let recorded = std::fs::read_to_string(phases(id)).unwrap();
        assert!(
            recorded.contains("vm-restored"),
            "{id} booted cold: {recorded}"
        );
    }

    let mut master = nonblocking(master);
    assert_eq!(husk(&root, &["start", "tty1"]).0, 0);
    assert_eq!(husk(&root, &["start", "plain2"]).0, 0);
    master.write_all(b"echo hi-$((40+2))\n").unwrap();
    read_until(&mut master, "hi-42", Duration::from_secs(60));
    // The engine resizes the master; the shell in the guest sees the new size.
    resize(&master, 40, 100);
    std::thread::sleep(Duration::from_millis(500));
    master
        .write_all(b"stty size; test -t 0 && echo tty-ok-$((3+4)) $(tty)\n")
        .unwrap();
    // `tty` names the pty in the container's /dev/pts (its first one).
    let seen = read_until(&mut master, "tty-ok-7 /dev/pts/0", Duration::from_secs(30));
    assert!(seen.contains("40 100"), "{seen:?}");

    // exec --tty with a console socket (how engines run `exec -t`): the monitor holds the
    // terminal, we get the master.
    let sock2 = tmp.path().join("console2.sock");
    let listener2 = UnixListener::bind(&sock2).unwrap();
    let exec = {
        let root = root.clone();
        let sock2 = sock2.clone();
        std::thread::spawn(move || {
            husk(
                &root,
                &[
                    "exec",
                    "--tty",
                    "--console-socket",
                    sock2.to_str().unwrap(),
                    "tty1",
                    "sh",
                    "-c",
                    "test -t 0 && echo exec-tty-$((2*3)) $(tty); exit 9",
                ],
            )
        })
    };
    let (exec_master, _) = recv_fd(&listener2);
    let mut exec_master = std::fs::File::from(exec_master);
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(exec_master.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(
            exec_master.as_raw_fd(),
            libc::F_SETFL,
            flags | libc::O_NONBLOCK,
        );
    }
    let seen = read_until(
        &mut exec_master,
        "exec-tty-6 /dev/pts/1",
        Duration::from_secs(60),
    );
    assert!(seen.contains("exec-tty-6 /dev/pts/1"), "{seen:?}");
    let (code, _, err) = exec.join().unwrap();
    assert_eq!(code, 9, "exec --tty exit status: {err}");

    // Pause and resume the other one; stats while running.
    assert_eq!(husk(&root, &["pause", "plain2"]).0, 0);
    assert_eq!(status_of(&root, "plain2"), "paused");
    let (code, _, err) = husk(&root, &["pause", "plain2"]);
    assert_ne!(code, 0, "pausing a paused container must fail");
    assert!(err.contains("paused"), "{err}");
    // A paused guest cannot answer: a request it must answer gives up after the reply
    // timeout with an error that says so, instead of hanging the command...
    let ps = Command::new(husk_binary())
        .arg("--root")
        .arg(&root)
        .args(["ps", "plain2"])
        .env("HUSK_REPLY_TIMEOUT", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&ps.stderr);
    assert!(!ps.status.success(), "ps of a paused VM answered: {err}");
    assert!(
        err.contains("no answer") && err.contains("within 2 s"),
        "{err}"
    );
    // ...while a signal is queued at once and delivered on resume, as runc does. SIGCONT:
    // harmless to the sleeping process.
    assert_eq!(husk(&root, &["kill", "plain2", "CONT"]).0, 0);
    assert_eq!(husk(&root, &["resume", "plain2"]).0, 0);
    assert_eq!(status_of(&root, "plain2"), "running");
    let (code, out, err) = husk(&root, &["events", "plain2", "--stats"]);
    assert_eq!(code, 0, "events: {err}");
    let ev: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ev["type"], "stats");
    assert!(
        ev["data"]["pids"]["current"].as_u64().unwrap() >= 1,
        "{out}"
    );

    // The shell exits with the status we give it.
    master.write_all(b"exit 4\n").unwrap();
    let start = Instant::now();
    while status_of(&root, "tty1") != "stopped" {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "tty1 did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, st, _) = husk(&root, &["state", "tty1"]);
    assert!(st.contains("\"exitStatus\": 4"), "{st}");
    assert_eq!(husk(&root, &["delete", "tty1"]).0, 0);
    assert_eq!(husk(&root, &["delete", "--force", "plain2"]).0, 0);
    assert_eq!(husk(&root, &["list", "-q"]).1, "");
}
