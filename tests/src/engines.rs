//! Real container engines driven against husk: podman, containerd (`ctr`) and Docker, each
//! started by the test with its own state and data directories (nothing of the machine's own
//! engine configuration or storage is used or touched), and torn down on drop: containers
//! removed, daemons stopped, husk containers the engine left behind force-deleted, mounts
//! under the test's directory undone, the directory removed.
//!
//! No registry is reachable from CI, so the test image is built here from busybox-static
//! ([`crate::busybox_rootfs`]): a rootfs tar for `podman import` / `docker import`, and an OCI
//! image archive (made by hand: layout, index, manifest, config, one layer) for
//! `ctr images import`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ContainerRoot, Outcome, TempDir, run_with_timeout, skip};

/// The name the test image has in every engine.
pub const IMAGE: &str = "localhost/husk-busybox:test";

/// How long one engine command may take: a container start boots a VM (~35 s on nested
/// kvm_pvm, several times that when the machine is busy).
pub const ENGINE_LIMIT: Duration = Duration::from_secs(600);

/// What every engine test needs: root (for `needs`: KVM, namespaces and the engine's own
/// `needs`), a usable /dev/kvm and the guest image; or a skip that says which is missing.
pub fn prerequisites(needs: &str) -> Option<()> {
    if !crate::is_root() {
        return crate::skip(&format!("needs root (KVM, namespaces, {needs})"));
    }
    if !crate::kvm_available() {
        return crate::skip("no usable /dev/kvm");
    }
    crate::guest_image()?;
    Some(())
}

/// The programs an engine test needs on `PATH`, or a skip naming the missing ones.
pub fn require_programs(programs: &[&str]) -> Option<()> {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| which(p).is_none())
        .collect();
    if missing.is_empty() {
        Some(())
    } else {
        skip(&format!(
            "{} not installed (./scripts/setup.sh --deps installs the engines)",
            missing.join(", ")
        ))
    }
}

/// `program` on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// Runs `cmd` with the engine time limit and returns how it ended; panics when it cannot be
/// started or runs past the limit (an engine that hangs is a failure, with its output).
pub fn run(cmd: Command) -> Outcome {
    let shown = format!("{cmd:?}");
    let out = run_with_timeout(cmd, ENGINE_LIMIT).unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        !out.timed_out,
        "{shown} ran past {} s:\n{}",
        ENGINE_LIMIT.as_secs(),
        out.output
    );
    out
}

/// Runs `cmd` and asserts it exits with `code`; returns its output.
pub fn expect_code(cmd: Command, code: i32) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd);
    assert_eq!(
        out.code,
        Some(code),
        "{shown} exited {:?}, not {code}:\n{}",
        out.code,
        out.output
    );
    out.output
}

/// Runs `cmd` and asserts it succeeds; returns its output.
pub fn expect_ok(cmd: Command) -> String {
    expect_code(cmd, 0)
}

/// A busybox rootfs and its tar (`rootfs.tar`) in `dir`, or a skip.
pub fn image_tar(dir: &Path) -> Option<PathBuf> {
    let rootfs = crate::busybox_rootfs(&dir.join("image-rootfs"))?;
    let tar = dir.join("rootfs.tar");
    let mut cmd = Command::new("tar");
    cmd.arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg(".");
    expect_ok(cmd);
    Some(tar)
}

fn sha256_file(path: &Path) -> String {
    let mut cmd = Command::new("sha256sum");
    cmd.arg(path);
    let out = expect_ok(cmd);
    out.split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// An OCI image archive (the layout `ctr images import` reads) of one uncompressed layer,
/// `layer_tar`, named [`IMAGE`], for linux/amd64.
pub fn oci_archive(layer_tar: &Path, out: &Path) {
    let config = serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["sh"]});
    oci_image_archive(layer_tar, out, IMAGE, config);
}

/// As [`oci_archive`], for the image `name` with the image configuration's `config` object
/// (`Entrypoint`, `Cmd`, `Env`, ...).
pub fn oci_image_archive(layer_tar: &Path, out: &Path, name: &str, config: serde_json::Value) {
    let dir = out.with_extension("layout");
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let tmp = blobs.join("incoming");
        std::fs::write(&tmp, bytes).unwrap();
        let digest = sha256_file(&tmp);
        std::fs::rename(&tmp, blobs.join(&digest)).unwrap();
        (digest, bytes.len())
    };
    let layer = std::fs::read(layer_tar).unwrap();
    let (layer_digest, layer_size) = put(&layer);
    // Uncompressed: the diff id is the layer's own digest.
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    });
    let (config_digest, config_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"), "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"), "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"), "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": "test"}}],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut cmd = Command::new("tar");
    cmd.arg("-C").arg(&dir).arg("-cf").arg(out).arg(".");
    expect_ok(cmd);
}

/// Unmounts everything mounted at or under `dir` (deepest first), lazily: what a crashed
/// engine left there must not keep the directory from being removed.
pub fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 reads the NUL-terminated path we own; MNT_DETACH has no
            // memory effects.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// A daemon the test started; stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Daemon {
        let file = std::fs::File::create(&log).expect("creating the daemon log");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Daemon { name, child, log }
    }

    /// Waits until `ready` says yes; panics with the daemon's log when it died or took too long.
    fn wait_ready(&mut self, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ready() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}):\n{}", self.name, self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready after 120 s:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on the pid of our own child, which we have not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// podman with its own storage (vfs unless configured), run root, containers.conf and storage.conf, running
/// husk as `--runtime` with its own husk state root.
#[derive(Debug)]
pub struct Podman {
    dir: TempDir,
    runtime: PathBuf,
    husk_root: PathBuf,
    /// podman's storage driver.
    driver: &'static str,
}

impl Podman {
    /// Sets up the directories and configuration, with the `vfs` storage driver (a
    /// directory rootfs); imports [`IMAGE`].
    pub fn new(runtime: &Path) -> Option<Podman> {
        Podman::configured(runtime, "vfs", &[])
    }

    /// As [`Podman::new`], with storage `driver` (`overlay` gives an overlay rootfs) and
    /// `husk_args` before each husk command (e.g. `--monitor-uid N`).
    pub fn configured(runtime: &Path, driver: &'static str, husk_args: &[&str]) -> Option<Podman> {
        require_programs(&["podman", "conmon", "tar"])?;
        let dir = TempDir::new("podman");
        // The machine has no CAP_SYS_RESOURCE and caps open files at 20000: podman's default
        // ulimits (raised nofile) would fail every container.
        let conf = r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
"#;
        std::fs::write(dir.path().join("containers.conf"), conf).unwrap();
        let storage = format!(
            "[storage]\ndriver = \"{driver}\"\nrunroot = \"{0}/run\"\ngraphroot = \"{0}/storage\"\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("storage.conf"), storage).unwrap();
        // The husk state root goes in through a wrapper, not `--runtime-flag`: podman does not
        // pass runtime flags on to the `podman container cleanup` that conmon runs when a
        // container ends, so that cleanup would `delete` under husk's default root and leave
        // the container's state behind.
        let husk_root = dir.path().join("husk");
        let wrapper = dir.path().join("husk-runtime");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec '{}' --root '{}' {} \"$@\"\n",
                runtime.display(),
                husk_root.display(),
                husk_args.join(" ")
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let podman = Podman {
            husk_root,
            dir,
            runtime: wrapper,
            driver,
        };
        let tar = image_tar(podman.dir.path())?;
        let mut cmd = podman.cmd();
        cmd.arg("import").arg(&tar).arg(IMAGE);
        expect_ok(cmd);
        Some(podman)
    }

    /// A `podman` command with this instance's storage, configuration and runtime.
    pub fn cmd(&self) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("XDG_RUNTIME_DIR", d.join("xdg"))
            .arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--storage-driver")
            .arg(self.driver)
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .arg("--runtime")
            .arg(&self.runtime);
        cmd
    }

    /// `podman ARGS`.
    pub fn with(&self, args: &[&str]) -> Command {
        let mut cmd = self.cmd();
        cmd.args(args);
        cmd
    }

    /// The husk state root this podman's containers live under.
    pub fn husk_root(&self) -> &Path {
        &self.husk_root
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = run_with_timeout(self.with(&["rm", "-a", "-f", "-t", "0"]), ENGINE_LIMIT);
        drop(ContainerRoot(self.husk_root.clone()));
        // conmon runs `podman container cleanup` when a container ends; one still running
        // would recreate the directories after they are removed.
        wait_for_processes_naming(self.dir.path(), Duration::from_secs(60));
        unmount_under(self.dir.path());
    }
}

/// Waits (at most `limit`) until no process has `dir` on its command line.
fn wait_for_processes_naming(dir: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && !processes_naming(dir, &[]).is_empty() {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The processes (other than this one and `except`) that have `dir` on their command line.
pub fn processes_naming(dir: &Path, except: &[u32]) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes().to_vec();
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            (pid != me
                && !except.contains(&pid)
                && cmdline
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice()))
            .then_some(pid)
        })
        .collect()
}

/// containerd with its own configuration, root, state and socket, driven with `ctr` in a
/// namespace of its own; husk is the runc v2 shim's binary (`--runc-binary`).
#[derive(Debug)]
pub struct Containerd {
    daemon: Option<Daemon>,
    socket: PathBuf,
    namespace: String,
    shim_root: PathBuf,
    dir: TempDir,
}

/// What a [`Containerd`] gets beyond its own directories and socket.
#[derive(Debug, Default)]
pub struct ContainerdSetup {
    /// Plugin sections (TOML) appended to the configuration. When set, the CRI plugin is
    /// enabled (otherwise it is disabled, with the snapshotters this host cannot use).
    pub cri: Option<String>,
    /// The namespace `ctr` works in; by default one of this instance's own.
    pub namespace: Option<String>,
    /// The `Root` given to the runc v2 shim for husk's containers (husk's state root is
    /// `<it>/<namespace>`); by default the shim's own default, `/run/containerd/runc`.
    pub shim_root: Option<PathBuf>,
}

impl Containerd {
    /// Writes the configuration, starts containerd, waits for it and imports [`IMAGE`].
    pub fn start() -> Option<Containerd> {
        require_programs(&[
            "containerd",
            "ctr",
            "containerd-shim-runc-v2",
            "tar",
            "sha256sum",
        ])?;
        let c = Containerd::launch(TempDir::new("containerd"), ContainerdSetup::default());
        let tar = image_tar(c.dir.path())?;
        let archive = c.dir.path().join("image.oci.tar");
        oci_archive(&tar, &archive);
        let out = c.import(&archive, "native");
        assert!(out.contains(IMAGE), "ctr import: {out}");
        Some(c)
    }

    /// Writes the configuration into `dir` (which the instance owns from then on: its root,
    /// state, socket and log are in it), starts containerd and waits until `ctr` reaches it.
    /// The caller checked the programs are there.
    pub fn launch(dir: TempDir, setup: ContainerdSetup) -> Containerd {
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let unused = r#""io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp""#;
        let disabled = match setup.cri {
            Some(_) => format!("[{unused}]"),
            None => format!("[\"io.containerd.grpc.v1.cri\", {unused}]"),
        };
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = {disabled}

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"
{plugins}"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            socket = socket.display(),
            plugins = setup.cri.as_deref().unwrap_or_default(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(d.join("config.toml"));
        let mut daemon = Daemon::spawn("containerd", cmd, d.join("containerd.log"));
        // One per instance: tests of one binary run at once, and the shim's runtime root
        // (husk's state root) is per namespace, shared by every containerd on the host.
        static INSTANCES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let namespace = setup.namespace.unwrap_or_else(|| {
            format!(
                "husk-test-{}-{}",
                std::process::id(),
                INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )
        });
        let mut c = Containerd {
            daemon: None,
            socket,
            namespace,
            shim_root: setup
                .shim_root
                .unwrap_or_else(|| PathBuf::from("/run/containerd/runc")),
            dir,
        };
        daemon.wait_ready(|| {
            c.ctr(&["version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        c.daemon = Some(daemon);
        c
    }

    /// Imports the image archive `archive` into this instance's namespace, unpacked for
    /// `snapshotter`; returns `ctr`'s output.
    pub fn import(&self, archive: &Path, snapshotter: &str) -> String {
        let mut cmd = self.ctr(&["images", "import", "--snapshotter", snapshotter]);
        cmd.arg(archive);
        expect_ok(cmd)
    }

    /// `ctr ARGS` against this containerd, in the test's namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args);
        cmd
    }

    /// The directory this instance owns (configuration, root, state, socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// containerd's process id (`None` once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.child.id())
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default()
    }

    /// containerd's root (its snapshotters' directories are below it).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The shim's runtime root for this namespace: where husk keeps the containers' state.
    pub fn husk_root(&self) -> PathBuf {
        self.shim_root.join(&self.namespace)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            let ids = run_with_timeout(self.ctr(&["containers", "list", "-q"]), ENGINE_LIMIT)
                .map(|o| o.output)
                .unwrap_or_default();
            for id in ids.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = run_with_timeout(
                    self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]),
                    ENGINE_LIMIT,
                );
                let _ = run_with_timeout(self.ctr(&["tasks", "rm", "-f", id]), ENGINE_LIMIT);
                let _ = run_with_timeout(self.ctr(&["containers", "rm", id]), ENGINE_LIMIT);
            }
        }
        drop(ContainerRoot(self.husk_root()));
        let _ = std::fs::remove_dir_all(self.husk_root());
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
        unmount_under(self.dir.path());
    }
}

/// dockerd with its own data root, exec root (its containerd included), pid file and socket,
/// and husk added as the runtime `husk`. One at a time in a test binary: every dockerd on a
/// host manages the default bridge `docker0`, and one started with `--bridge none` deletes it
/// (seen here: a concurrent bridge test's published port then led nowhere).
#[derive(Debug)]
pub struct Dockerd {
    daemon: Option<Daemon>,
    socket: PathBuf,
    dir: TempDir,
    /// Released after the daemon stopped (fields drop after `Drop::drop`).
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

/// Held by the running [`Dockerd`] of this test binary.
static DOCKERD: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Dockerd {
    /// Starts dockerd (with the default bridge network when `bridge`, else none and no
    /// iptables rules) and imports [`IMAGE`].
    pub fn start(husk: &Path, bridge: bool) -> Option<Dockerd> {
        Dockerd::start_with(husk, bridge, "vfs")
    }

    /// As [`Dockerd::start`], with storage `driver` (`overlay2` gives an overlay rootfs).
    pub fn start_with(husk: &Path, bridge: bool, driver: &str) -> Option<Dockerd> {
        require_programs(&["dockerd", "docker", "containerd", "tar"])?;
        // A test that failed while holding it changed nothing the next one needs.
        let one_at_a_time = DOCKERD
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Short: the exec root holds containerd's sockets (108-byte limit).
        let dir = TempDir::new("dkr");
        let d = dir.path();
        let socket = d.join("docker.sock");
        let mut cmd = Command::new("dockerd");
        cmd.arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--add-runtime")
            .arg(format!("husk={}", husk.display()))
            .args(["--storage-driver", driver, "--log-driver", "json-file"]);
        if !bridge {
            cmd.args(["--bridge", "none", "--iptables=false", "--ip-masq=false"]);
        }
        let mut daemon = Daemon::spawn("dockerd", cmd, d.join("dockerd.log"));
        let mut c = Dockerd {
            daemon: None,
            socket,
            dir,
            _one_at_a_time: one_at_a_time,
        };
        daemon.wait_ready(|| {
            c.docker(&["version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        c.daemon = Some(daemon);
        let tar = image_tar(c.dir.path())?;
        let mut cmd = c.docker(&["import"]);
        cmd.arg(&tar).arg(IMAGE);
        expect_ok(cmd);
        Some(c)
    }

    /// `docker ARGS` against this dockerd.
    pub fn docker(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_CONFIG", self.dir.path().join("client"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args);
        cmd
    }

    /// Where dockerd's runc v2 shim keeps husk's state (Docker 20.10 gives every runc-like
    /// runtime the root `<exec-root>/runtime-runc/<namespace>`).
    pub fn husk_root(&self) -> PathBuf {
        self.dir.path().join("exec/runtime-runc/moby")
    }

    /// dockerd's log so far.
    pub fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            let ids = run_with_timeout(self.docker(&["ps", "-a", "-q"]), ENGINE_LIMIT)
                .map(|o| o.output)
                .unwrap_or_default();
            for id in ids.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = run_with_timeout(self.docker(&["rm", "-f", id]), ENGINE_LIMIT);
            }
        }
        drop(ContainerRoot(self.husk_root()));
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
        unmount_under(self.dir.path());
    }
}

/// A one-file HTTP server on the host (for containers to fetch from): answers every request
/// with `body`, on all addresses, until dropped.
#[derive(Debug)]
pub struct HttpServer {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HttpServer {
    /// Listens on 0.0.0.0 (an ephemeral port).
    pub fn start(body: &'static str) -> HttpServer {
        let listener = TcpListener::bind("0.0.0.0:0").expect("binding the HTTP server");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                        let mut buf = [0u8; 4096];
                        let _ = s.read(&mut buf);
                        let _ = write!(
                            s,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        HttpServer { port, stop }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `GET /` from `127.0.0.1:port`, retried for up to a minute while the server comes up
/// (connection refused or reset); the body, or the last error.
pub fn http_get_local(port: u16) -> Result<String, String> {
    http_get(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

/// `GET /` from `addr`, retried for up to a minute while the server comes up (connection
/// refused or reset); the reply, or the last error.
pub fn http_get(addr: std::net::SocketAddr) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(body) if !body.is_empty() => return Ok(body),
            Ok(_) if Instant::now() >= deadline => return Err("empty reply".into()),
            Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

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
