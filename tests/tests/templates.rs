//! VM templates seen from outside: a template made ahead of time with `husk template build`,
//! two containers restored from it at the same time that are each their own (rootfs, output,
//! exit code, exec, RNG, boot id), a template file that nothing writes, and a damaged
//! template that costs one log line and a cold boot, never a container. Each run of this test
//! makes its own template in its own directory (one cold boot), restores it twice and boots
//! cold once.

use std::hash::{DefaultHasher, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use husk_e2e::{TempDir, busybox_bundle, guest_image, husk_binary, is_root, kvm_available, skip};

/// `husk --root root ARGS` with the test's template directory (and phase file, if given).
fn husk_with(root: &Path, templates: &Path, phases: Option<&Path>, args: &[&str]) -> Command {
    let mut cmd = Command::new(husk_binary());
    cmd.arg("--root")
        .arg(root)
        .args(args)
        .env("HUSK_TEMPLATE_DIR", templates)
        .stdin(Stdio::null());
    if let Some(p) = phases {
        cmd.env("HUSK_PHASES", p);
    }
    cmd
}

fn ok(mut cmd: Command) -> Output {
    let out = cmd.output().expect("running husk");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A hash of the file's bytes.
fn hash_file(path: &Path) -> u64 {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finish();
        }
        h.write(&buf[..n]);
    }
}

fn template_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|e| {
            ["state", "memory"]
                .into_iter()
                .map(move |f| e.path().join(f))
        })
        .collect();
    files.sort();
    files
}

fn exit_status(root: &Path, id: &str) -> Option<i64> {
    let out = Command::new(husk_binary())
        .arg("--root")
        .arg(root)
        .args(["state", id])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    (v["status"] == "stopped").then(|| v["exitStatus"].as_i64().unwrap_or(-1))
}

#[test]
fn containers_restored_from_one_template_are_each_their_own() {
    if guest_image().is_none() {
        return;
    }
    if !kvm_available() || !is_root() {
        skip::<()>("needs /dev/kvm and root");
        return;
    }
    let tmp = TempDir::new("templates");
    let root = tmp.path().join("state");
    let _cleanup = husk_e2e::ContainerRoot(root.clone());
    // A long path, as a cache under a deep directory would be: the build's sockets in it must
    // still fit in `sockaddr_un` (107 bytes).
    let templates = tmp
        .path()
        .join("templates-in-a-directory-whose-name-is-long-enough-to-overflow-sun-path");

    // Made ahead of time, as an operator would; the containers below are of its shape (the
    // default: 1 vCPU, 256 MiB).
    let started = Instant::now();
    let out = ok(husk_with(&root, &templates, None, &["template", "build"]));
    println!(
        "template build: {} ({:.1} s)",
        String::from_utf8_lossy(&out.stdout).trim(),
        started.elapsed().as_secs_f64()
    );
    let listed = ok(husk_with(
        &root,
        &templates,
        None,
        &["template", "list", "-q"],
    ));
    let keys = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert_eq!(keys.lines().count(), 1, "{keys}");
    let files = template_files(&templates);
    let hashes: Vec<u64> = files.iter().map(|f| hash_file(f)).collect();

    // Two containers at once, each leaving a file in its own rootfs and ending with its own
    // status once told to (through a FIFO: nothing polls, guest processes are slow here).
    let bundle = |name: &str, code: u8| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let script =
            format!("echo {name} > /owned; busybox mkfifo /tmp/go; read x < /tmp/go; exit {code}");
        busybox_bundle(&dir, &["sh", "-c", &script]).unwrap()
    };
    let (b1, b2) = (bundle("one", 3), bundle("two", 4));
    let phases = |id: &str| tmp.path().join(format!("{id}.phases"));
    let started = Instant::now();
    let creates: Vec<_> = [("c1", &b1), ("c2", &b2)]
        .into_iter()
        .map(|(id, b)| {
            husk_with(
                &root,
                &templates,
                Some(&phases(id)),
                &["create", id, "--bundle"],
            )
            .arg(b)
            .spawn()
            .unwrap()
        })
        .collect();
    for mut c in creates {
        assert!(c.wait().unwrap().success(), "create");
    }
    println!(
        "two creates from the template in parallel: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for id in ["c1", "c2"] {
        let recorded = std::fs::read_to_string(phases(id)).unwrap();
        assert!(recorded.contains("vm-restored"), "{id} booted: {recorded}");
        ok(husk_with(&root, &templates, None, &["start", id]));
    }

    let exec = |id: &str, script: &str| {
        husk_with(&root, &templates, None, &["exec", id, "sh", "-c", script])
            .output()
            .unwrap()
    };
    // Each sees its own file, never the other's.
    let wait_owned = "while ! test -p /tmp/go; do sleep 1; done; cat /owned";
    assert_eq!(
        String::from_utf8_lossy(&exec("c1", wait_owned).stdout),
        "one\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&exec("c2", wait_owned).stdout),
        "two\n"
    );
    assert!(b1.join("rootfs/owned").exists() && b2.join("rootfs/owned").exists());
    assert_eq!(
        std::fs::read_to_string(b1.join("rootfs/owned")).unwrap(),
        "one\n"
    );
    // Their kernels' RNGs and boot ids differ (one template, two VMs).
    let random = |id: &str| {
        let out = exec(
            id,
            "head -c 32 /dev/urandom; cat /proc/sys/kernel/random/boot_id",
        );
        assert!(out.status.success(), "{id}");
        out.stdout
    };
    let (r1, r2) = (random("c1"), random("c2"));
    assert_ne!(r1[..32], r2[..32], "the same /dev/urandom bytes");
    assert_ne!(r1[32..], r2[32..], "the same boot id");
    // Their own exit statuses.
    assert!(exec("c1", "echo > /tmp/go").status.success());
    assert!(exec("c2", "echo > /tmp/go").status.success());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut codes = (None, None);
    while codes.0.is_none() || codes.1.is_none() {
        assert!(Instant::now() < deadline, "not stopped: {codes:?}");
        codes = (exit_status(&root, "c1"), exit_status(&root, "c2"));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(codes, (Some(3), Some(4)));
    for id in ["c1", "c2"] {
        ok(husk_with(&root, &templates, None, &["delete", id]));
    }
    // Nothing wrote the template.
    let after: Vec<u64> = files.iter().map(|f| hash_file(f)).collect();
    assert_eq!(hashes, after, "{files:?} changed");

    // A template changed after it was made: one log line, a cold boot, the container runs.
    let memory = files.iter().find(|f| f.ends_with("memory")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(memory)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"x", 4096).unwrap();
    drop(f);
    let log = tmp.path().join("cold.log");
    let b3 = tmp.path().join("three");
    std::fs::create_dir_all(&b3).unwrap();
    let b3 = busybox_bundle(&b3, &["sh", "-c", "echo cold-$((6*7)); exit 5"]).unwrap();
    let out = husk_with(
        &root,
        &templates,
        Some(&phases("c3")),
        &["--log", log.to_str().unwrap(), "run", "c3", "--bundle"],
    )
    .arg(&b3)
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cold-42\n");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = logged.lines().filter(|l| l.contains("discarded")).collect();
    assert_eq!(lines.len(), 1, "{logged}");
    assert!(
        lines[0].contains("booting cold") && lines[0].contains("changed"),
        "{logged}"
    );
    let recorded = std::fs::read_to_string(phases("c3")).unwrap();
    assert!(!recorded.contains("vm-restored"), "{recorded}");
    let listed = ok(husk_with(
        &root,
        &templates,
        None,
        &["template", "list", "-q"],
    ));
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "",
        "the damaged template is gone"
    );

    // A template that restores but whose guest does not greet in time (forced here with a
    // 1 ms limit): the VM is stopped, the container's VM boots cold, and `create` removes
    // the template.
    ok(husk_with(&root, &templates, None, &["template", "build"]));
    let log = tmp.path().join("fallback.log");
    let out = husk_with(
        &root,
        &templates,
        Some(&phases("c4")),
        &["--log", log.to_str().unwrap(), "run", "c4", "--bundle"],
    )
    .arg(&b3)
    .env("HUSK_RESTORE_GREETING_MS", "1")
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cold-42\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("removed template"),
        "{out:?}"
    );
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("did not greet") && logged.contains("booting cold"),
        "{logged}"
    );
    let recorded = std::fs::read_to_string(phases("c4")).unwrap();
    assert!(recorded.contains("init-started"), "booted cold: {recorded}");
    let listed = ok(husk_with(
        &root,
        &templates,
        None,
        &["template", "list", "-q"],
    ));
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "",
        "the refused template is gone"
    );
}
