//! Helpers shared by husk's end-to-end tests: where the guest image is, what this host can do,
//! and running a program with a time limit.
//!
//! Tests that need something this machine may lack (the guest image, `/dev/kvm`, QEMU, root)
//! print why they skip. With `HUSK_E2E_REQUIRED=1` (set by `.ci/run`, whose machines have all
//! of it) a missing requirement fails the test instead.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub mod cgroups;
pub mod cri;
pub mod engines;
pub mod tty;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(PathBuf::from).unwrap_or(dir)
}

/// Skips the calling test with `reason`, or fails it where skipping is not allowed.
/// Returns `None` so callers can write `let Some(x) = ... else { return skip(..) }`.
pub fn skip<T>(reason: &str) -> Option<T> {
    if std::env::var_os("HUSK_E2E_REQUIRED").is_some_and(|v| v == "1") {
        panic!("required by HUSK_E2E_REQUIRED=1 but unavailable: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    None
}

/// The guest image built by `cargo xtask build-image`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The uncompressed kernel.
    pub vmlinux: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
}

/// The guest image in `$HUSK_IMAGE_DIR` (default `target/husk-image`), or a skip.
pub fn guest_image() -> Option<GuestImage> {
    let dir = std::env::var_os("HUSK_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/husk-image"));
    let image = GuestImage {
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
    };
    if image.vmlinux.is_file() && image.initramfs.is_file() {
        Some(image)
    } else {
        skip(&format!(
            "no guest image in {} (run `cargo xtask build-image`)",
            dir.display()
        ))
    }
}

/// Whether `/dev/kvm` is there and can be opened.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Whether this host's KVM is kvm_pvm (nested, page-table based), which needs the guest
/// compatibility parameters of `kernel-config/cmdline-kvm-pvm`.
pub fn host_is_kvm_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// A kernel-config file's parameters, on one line.
pub fn kernel_params(file: &str) -> String {
    let path = workspace_root().join("kernel-config").join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// How a program run with [`run_with_timeout`] ended.
#[derive(Debug)]
pub struct Outcome {
    /// The exit code (`None`: killed by a signal, including at the time limit).
    pub code: Option<i32>,
    /// Whether the time limit killed it.
    pub timed_out: bool,
    /// stdout and stderr, interleaved as they were read.
    pub output: String,
    /// Wall time from spawn to exit.
    pub wall: Duration,
}

/// Runs `cmd` (stdin closed), killing it after `limit`.
pub fn run_with_timeout(mut cmd: Command, limit: Duration) -> std::io::Result<Outcome> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = start.elapsed();
    let mut output = String::from_utf8_lossy(&out_thread.join().unwrap_or_default()).into_owned();
    output.push_str(&String::from_utf8_lossy(
        &err_thread.join().unwrap_or_default(),
    ));
    Ok(Outcome {
        code: status.code(),
        timed_out,
        output,
        wall,
    })
}

/// The `husk` binary of this workspace, built (once per test process) if needed; or the one
/// `$HUSK_BINARY` names (e.g. an older build, to measure what a change changed).
pub fn husk_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Some(given) = std::env::var_os("HUSK_BINARY") {
                return PathBuf::from(given);
            }
            // Test binaries live in target/<profile>/deps; the husk binary one level up.
            let exe = std::env::current_exe().expect("current_exe");
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("test binary in target/<profile>/deps")
                .to_path_buf();
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.current_dir(workspace_root())
                .args(["build", "--quiet", "--package", "husk"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("running cargo build -p husk");
            assert!(status.success(), "cargo build -p husk failed");
            profile_dir.join("husk")
        })
        .clone()
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir, named after `label`.
    pub fn new(label: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("husk-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes an OCI bundle in `dir`: a busybox-static rootfs (Debian's `busybox-static`) and a
/// config.json running `args`. Returns `None` (a skip) when busybox is not installed.
pub fn busybox_bundle(dir: &Path, args: &[&str]) -> Option<PathBuf> {
    busybox_rootfs(&dir.join("rootfs"))?;
    let config = serde_json_config(args);
    std::fs::write(dir.join("config.json"), config).expect("writing config.json");
    Some(dir.to_path_buf())
}

/// Makes a root filesystem at `rootfs`: busybox-static, its applets the tests use, and
/// `/etc/passwd`/`/etc/group` with root and an unprivileged `user` (1000:1000). `None` (a
/// skip) when busybox is not installed.
pub fn busybox_rootfs(rootfs: &Path) -> Option<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        return skip("busybox-static is not installed (apt-get install -y busybox-static)");
    }
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root", "www"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("creating the rootfs");
    }
    std::fs::copy(busybox, rootfs.join("bin/busybox")).expect("copying busybox");
    for applet in [
        "sh", "echo", "cat", "sleep", "uname", "ls", "ps", "id", "env", "true", "false", "kill",
        "hostname", "mount", "grep", "head", "tty", "nproc", "wget", "httpd", "ip", "touch",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
            .expect("linking an applet");
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/tmp:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
    std::fs::write(rootfs.join("www/index.html"), "served-from-the-container\n").unwrap();
    Some(rootfs.to_path_buf())
}

/// A minimal runc-style config.json (no network namespace: the VM is the network boundary).
fn serde_json_config(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"{{
  "ociVersion": "1.0.2",
  "process": {{
    "terminal": false,
    "user": {{"uid": 0, "gid": 0}},
    "args": [{}],
    "env": ["PATH=/bin", "HOME=/root"],
    "cwd": "/",
    "capabilities": {{
      "bounding": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE"],
      "effective": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE"],
      "permitted": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE"]
    }},
    "noNewPrivileges": true
  }},
  "root": {{"path": "rootfs"}},
  "hostname": "husk-test",
  "mounts": [
    {{"destination": "/proc", "type": "proc", "source": "proc"}},
    {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}},
    {{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}}
  ],
  "linux": {{
    "namespaces": [{{"type": "pid"}}, {{"type": "ipc"}}, {{"type": "uts"}}, {{"type": "mount"}}],
    "maskedPaths": ["/proc/kcore"],
    "readonlyPaths": ["/proc/sys"]
  }}
}}"#,
        args.join(", ")
    )
}

/// Runs the husk binary with `--root root` and `args`; returns (exit code, stdout, stderr).
pub fn husk(root: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(husk_binary())
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running husk");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An overlay mount, as engines make for a container's rootfs; unmounted when dropped.
#[derive(Debug)]
pub struct Overlay {
    /// The mount point.
    pub at: PathBuf,
}

impl Overlay {
    /// Mounts an overlay of `lower` (topmost first), `upper` and `work` at `at` (all
    /// existing directories, given by absolute paths).
    pub fn mount(lower: &[&Path], upper: &Path, work: &Path, at: &Path) -> Overlay {
        let lower: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            at,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .unwrap_or_else(|e| panic!("mounting an overlay at {} ({data}): {e}", at.display()));
        Overlay {
            at: at.to_path_buf(),
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.at, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Whether the tests run as root (the status line of /proc/self says the effective uid).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Deletes (with `--force`) every container under a state root when dropped, so a failing
/// test leaves no monitor or VM running. Declare it after the [`TempDir`] holding the root.
#[derive(Debug)]
pub struct ContainerRoot(pub PathBuf);

impl Drop for ContainerRoot {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.0) else {
            return;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let _ = husk(&self.0, &["delete", "--force", &id]);
        }
    }
}
