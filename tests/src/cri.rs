//! A CRI client for the tests, driving containerd's built-in CRI plugin the way kubelet does:
//! pods (RunPodSandbox), their containers (CreateContainer, StartContainer), ExecSync,
//! statuses, stop and removal, over gRPC on containerd's Unix socket (the `k8s-cri` crate's
//! CRI v1 client, tonic).
//!
//! [`Cri::start`] starts a containerd of its own ([`engines::Containerd::launch`]: its own
//! configuration, root, state and socket in a temporary directory) with the CRI plugin
//! configured for the test:
//!
//! - runtime handlers `runc` (the runc v2 shim with the system runc; the default) and, when
//!   asked, `husk` (the runc v2 shim with husk as its `BinaryName`), each with a state root
//!   (`Root`) in the temporary directory;
//! - `sandbox_image`: a pause image built here (a static pause from [`PAUSE_C`]) and imported
//!   into containerd's `k8s.io` namespace with the busybox test image [`engines::IMAGE`]; no
//!   registry is involved;
//! - CNI: a bridge and a /24 of the harness's own ([`cni::Bridge`]), pods attached by the
//!   `bridge` and `host-local` plugins from Debian's `containernetworking-plugins`;
//! - the pods' network namespaces mounted under containerd's state directory, their cgroups
//!   under a parent of the harness's own (relative: inside the test's own cgroups), their
//!   containers' logs in the temporary directory.
//!
//! The tests call blocking methods: the async client runs on a small tokio runtime inside the
//! harness. Every call fails with a [`CriError`] that names the call, its subject, gRPC's
//! status and the end of containerd's log. On drop the harness stops and removes every pod,
//! force-deletes what the runtimes left in their state roots, stops containerd, undoes its
//! mounts, removes the directory, the pods' cgroups and the bridge.

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{ImageSpec, PodSandboxConfig};
use tonic::transport::Channel;

use crate::engines::{self, Containerd, ContainerdSetup, IMAGE, require_programs};
use crate::{TempDir, skip};

mod calls;
pub mod cni;
mod host;
mod setup;

pub use setup::{PAUSE_C, PAUSE_IMAGE};

/// An idle container's command: a shell that ends on SIGTERM (as pid 1 of its own pid
/// namespace it must trap it itself), so that stopping it does not wait for a SIGKILL.
pub const IDLE: &[&str] = &[
    "sh",
    "-c",
    "trap 'exit 0' TERM; while true; do sleep 1000 & wait $!; done",
];

/// containerd's namespace for everything the CRI plugin does.
const NAMESPACE: &str = "k8s.io";

/// The memory limit of each pod's cgroup, which the harness makes before RunPodSandbox as
/// kubelet does (kubelet's pod-level limit): the runtime's cgroups of the pod go below it.
pub const POD_MEMORY_LIMIT: u64 = 2 << 30;

/// How long one CRI call may take: starting a pod or a container with husk boots a VM.
pub const CALL_LIMIT: Duration = engines::ENGINE_LIMIT;

/// How long the harness waits for containerd's CRI plugin to be ready and to know the images.
const READY_LIMIT: Duration = Duration::from_secs(120);

/// An image by name (the readiness wait here and the calls in `calls` name images so).
fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

/// A runtime handler: the name a RuntimeClass gives in `handler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    /// The runc v2 shim with the system runc.
    Runc,
    /// The runc v2 shim with husk as its binary.
    Husk,
}

impl Handler {
    /// The handler's name in containerd's configuration and in RunPodSandbox.
    pub fn name(self) -> &'static str {
        match self {
            Handler::Runc => "runc",
            Handler::Husk => "husk",
        }
    }
}

/// A CRI call that failed (or a wait on the CRI that ran out of time).
pub struct CriError {
    /// The call and its subject, e.g. `RunPodSandbox(web, handler husk)`.
    pub call: String,
    /// gRPC's status code (`DeadlineExceeded` when the call or the wait ran out of time).
    pub code: tonic::Code,
    /// What containerd (or the wait) said.
    pub message: String,
    /// The last lines of containerd's log when it failed.
    pub log_tail: String,
}

impl std::fmt::Display for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CRI {} failed ({:?}): {}\n--- the end of containerd's log ---\n{}",
            self.call, self.code, self.message, self.log_tail
        )
    }
}

// Debug as Display: `unwrap()` and `expect()` in tests show the call, not a struct dump.
impl std::fmt::Debug for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for CriError {}

/// A pod sandbox that RunPodSandbox made.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The sandbox id.
    pub id: String,
    /// The pod's name (its metadata name and hostname).
    pub name: String,
    /// The runtime handler it runs under.
    pub handler: Handler,
    /// Its address on the harness's pod network (from CNI, as PodSandboxStatus reports it).
    pub ip: IpAddr,
    /// The configuration it was made with (CreateContainer passes it again).
    pub config: PodSandboxConfig,
    /// Where its containers' logs go.
    pub log_dir: PathBuf,
    /// The sandbox's host pid (PodSandboxStatus's verbose info): with husk, its VM's monitor.
    pub pid: Option<u32>,
}

/// What ExecSync returned.
#[derive(Debug, Clone)]
pub struct Exec {
    /// The command's stdout.
    pub stdout: String,
    /// The command's stderr.
    pub stderr: String,
    /// Its exit code.
    pub exit_code: i32,
}

/// A host process a pod started (its sandbox's or a container's pid, as the CRI's verbose
/// status gives it), remembered so that [`Cri::leftovers`] can tell whether it outlived its pod.
#[derive(Debug)]
struct Process {
    pid: u32,
    /// Its start time (field 22 of /proc/PID/stat): a reused pid is another process.
    start: u64,
    what: String,
}

/// The host pid in a verbose status's `info` (containerd's JSON under `info`), if any.
fn info_pid(info: &std::collections::HashMap<String, String>) -> Option<u32> {
    info.get("info")
        .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
        .and_then(|v| v.get("pid").and_then(serde_json::Value::as_u64))
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| p > 0)
}

/// containerd with its CRI plugin, a CNI network and the images, and a CRI client to it.
#[derive(Debug)]
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    containerd: Option<Containerd>,
    bridge: Option<cni::Bridge>,
    /// The pods' cgroup parent, relative to the test's own cgroups.
    cgroup: String,
    runc_root: PathBuf,
    husk_root: Option<PathBuf>,
    processes: Mutex<Vec<Process>>,
    pods_made: AtomicU32,
}

impl Cri {
    /// A harness where pods can run under `handler`: `runc` needs root, containerd and the
    /// CNI plugins; `husk` also what every husk engine test needs (KVM, the guest image), and
    /// the husk binary of this workspace is built if needed. `None` (a skip) when something
    /// is missing.
    pub fn for_handler(handler: Handler) -> Option<Cri> {
        match handler {
            Handler::Runc => Cri::start(None),
            Handler::Husk => {
                engines::prerequisites("containerd's CRI plugin")?;
                Cri::start(Some(&crate::husk_binary()))
            }
        }
    }

    /// Builds the images, claims a bridge, starts containerd with the CRI plugin configured
    /// (the `runc` handler, and `husk` running `husk` — the binary or a wrapper — when given),
    /// imports the images, connects and waits until the CRI reports the runtime and the
    /// network ready and knows both images. `None` (a skip) when something is missing.
    pub fn start(husk: Option<&Path>) -> Option<Cri> {
        if !crate::is_root() {
            return skip("needs root (containerd's CRI plugin: namespaces, mounts, CNI)");
        }
        require_programs(&[
            "containerd",
            "ctr",
            "containerd-shim-runc-v2",
            "runc",
            "gcc",
            "ip",
            "tar",
            "sha256sum",
        ])?;
        let plugins = Path::new(cni::CNI_BIN_DIR);
        if let Some(p) = cni::CNI_PLUGINS.iter().find(|p| !plugins.join(p).is_file()) {
            return skip(&format!(
                "no CNI plugin {p} in {} (apt-get install containernetworking-plugins)",
                plugins.display()
            ));
        }
        let runc = engines::which("runc").expect("runc is on PATH");

        static INSTANCES: AtomicU32 = AtomicU32::new(0);
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let dir = TempDir::new("cri");
        let d = dir.path().to_path_buf();
        let busybox = engines::image_tar(&d)?;
        let busybox_archive = d.join("busybox.oci.tar");
        engines::oci_archive(&busybox, &busybox_archive);
        let pause_archive = setup::pause_archive(&d);

        let bridge = cni::Bridge::claim();
        let conf_dir = d.join("cni/net.d");
        std::fs::create_dir_all(&conf_dir).unwrap();
        std::fs::write(
            conf_dir.join("10-husk-test.conflist"),
            bridge.conflist(&d.join("cni/ipam")),
        )
        .unwrap();
        let runc_root = d.join("runc-root");
        let husk_shim_root = d.join("husk-root");
        let config = setup::cri_config(&setup::CriConfig {
            runc: &runc,
            runc_root: &runc_root,
            husk: husk.map(|h| (h, husk_shim_root.as_path())),
            conf_dir: &conf_dir,
        });
        let containerd = Containerd::launch(
            dir,
            ContainerdSetup {
                cri: Some(config),
                namespace: Some(NAMESPACE.into()),
                shim_root: Some(husk_shim_root),
            },
        );
        for archive in [&busybox_archive, &pause_archive] {
            containerd.import(archive, "overlayfs");
        }

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a tokio runtime");
        let channel = setup::connect(&rt, containerd.socket()).unwrap_or_else(|e| {
            panic!(
                "connecting to {}: {e}\n{}",
                containerd.socket().display(),
                containerd.log()
            )
        });
        let cri = Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            husk_root: husk.map(|_| containerd.husk_root()),
            containerd: Some(containerd),
            bridge: Some(bridge),
            cgroup: format!("husk-cri-{}-{n}", std::process::id()),
            runc_root: runc_root.join(NAMESPACE),
            processes: Mutex::new(Vec::new()),
            pods_made: AtomicU32::new(0),
        };
        cri.wait_ready().unwrap_or_else(|e| panic!("{e}"));
        Some(cri)
    }

    /// Waits until Status reports RuntimeReady and NetworkReady and ImageStatus knows the
    /// sandbox image and the test image (the CRI plugin learns of imports from events).
    fn wait_ready(&self) -> Result<(), CriError> {
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let mut c = self.runtime.clone();
            let status = self.call("Status".into(), CALL_LIMIT, async move {
                c.status(api::StatusRequest { verbose: false }).await
            })?;
            let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
            let ready = |kind: &str| conditions.iter().any(|c| c.r#type == kind && c.status);
            let mut missing: Vec<String> = ["RuntimeReady", "NetworkReady"]
                .into_iter()
                .filter(|k| !ready(k))
                .map(|k| format!("{k}: {conditions:?}"))
                .collect();
            for image in [PAUSE_IMAGE, IMAGE] {
                let mut c = self.images.clone();
                let status =
                    self.call(format!("ImageStatus({image})"), CALL_LIMIT, async move {
                        c.image_status(api::ImageStatusRequest {
                            image: Some(image_spec(image)),
                            verbose: false,
                        })
                        .await
                    })?;
                if status.image.is_none() {
                    missing.push(format!("image {image} unknown"));
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.error(
                    "Status".into(),
                    tonic::Code::DeadlineExceeded,
                    format!(
                        "not ready after {} s: {}",
                        READY_LIMIT.as_secs(),
                        missing.join("; ")
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `fut` (one CRI call) on the harness's runtime, for at most `limit`.
    fn call<T>(
        &self,
        call: String,
        limit: Duration,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CriError> {
        match self
            .rt
            .block_on(async { tokio::time::timeout(limit, fut).await })
        {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(self.error(call, status.code(), status.message().into())),
            Err(_) => Err(self.error(
                call,
                tonic::Code::DeadlineExceeded,
                format!("no answer within {} s", limit.as_secs()),
            )),
        }
    }

    fn error(&self, call: String, code: tonic::Code, message: String) -> CriError {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let log_tail = lines[lines.len().saturating_sub(40)..].join("\n");
        CriError {
            call,
            code,
            message,
            log_tail,
        }
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        self.containerd
            .as_ref()
            .map(Containerd::log)
            .unwrap_or_default()
    }

    /// The harness's directory (containerd's root, state, socket and log, the CNI
    /// configuration, the runtimes' state roots, the containers' logs).
    pub fn dir(&self) -> &Path {
        self.containerd
            .as_ref()
            .map(Containerd::dir)
            .expect("containerd runs while the harness lives")
    }

    /// The husk handler's state root (husk's `--root`), when husk is a handler.
    pub fn husk_root(&self) -> Option<&Path> {
        self.husk_root.as_deref()
    }

    /// The host's address on the pod network (the bridge's; the pods' gateway).
    pub fn gateway(&self) -> std::net::Ipv4Addr {
        self.bridge.as_ref().expect("the bridge").gateway()
    }

    /// Remembers the process whose pid a verbose status's `info` gives (containerd's JSON
    /// under `info`), for [`Cri::leftovers`]; its pid.
    fn remember(
        &self,
        info: &std::collections::HashMap<String, String>,
        what: String,
    ) -> Option<u32> {
        let pid = info_pid(info);
        if let Some(pid) = pid
            && let Some(start) = host::start_time(pid)
        {
            self.processes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(Process { pid, start, what });
        }
        pid
    }

    /// The directory of `pod`'s own cgroup (the one kubelet makes, its `cgroup_parent`) in
    /// the v1 hierarchy of `controller`; `None` where the host has no such hierarchy.
    pub fn pod_cgroup(&self, pod: &Pod, controller: &str) -> Option<PathBuf> {
        let parent = &pod.config.linux.as_ref()?.cgroup_parent;
        Some(crate::cgroups::cgroup_of(std::process::id(), controller)?.join(parent))
    }

    /// What is left once every pod is stopped and removed, described; empty when nothing:
    /// pods or containers the CRI still lists; the pods' processes (sandbox and containers)
    /// and shims; mounts under the harness's directory; entries in the runtimes' state roots;
    /// interfaces on the bridge, address leases, cached CNI results and iptables rules of the
    /// pod network; the containers' cgroups.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        match self.list_pods() {
            Ok(pods) => left.extend(pods.iter().map(|p| {
                let name = p.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or("");
                format!("pod {} ({name}) still listed", p.id)
            })),
            Err(e) => left.push(e.to_string()),
        }
        match self.list_containers() {
            Ok(cs) => left.extend(
                cs.iter()
                    .map(|c| format!("container {} still listed", c.id)),
            ),
            Err(e) => left.push(e.to_string()),
        }
        let mut seen: Vec<u32> = self
            .containerd
            .as_ref()
            .and_then(Containerd::pid)
            .into_iter()
            .collect();
        for p in self
            .processes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|p| host::start_time(p.pid) == Some(p.start))
        {
            left.push(format!("process {} ({}) still runs", p.pid, p.what));
            seen.push(p.pid);
        }
        // Shims, and whatever else names the harness's directory (husk's monitors do).
        for pid in engines::processes_naming(self.dir(), &seen) {
            left.push(format!("process {pid} ({}) still runs", host::cmdline(pid)));
        }
        for m in host::mounts_under(self.dir()) {
            left.push(format!("mount {}", m.display()));
        }
        for root in std::iter::once(&self.runc_root).chain(&self.husk_root) {
            for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
                left.push(format!("state {}", e.path().display()));
            }
        }
        if let Some(b) = &self.bridge {
            left.extend(b.leftovers(&self.dir().join("cni/ipam")));
        }
        for dir in host::cgroup_dirs(&self.cgroup) {
            // <harness>/<pod>/<container>: what runc (or husk) made; pods' parents are ours.
            for pod in host::subdirs(&dir) {
                for c in host::subdirs(&pod) {
                    left.push(format!("cgroup {}", c.display()));
                }
            }
        }
        left
    }

    /// Waits (at most `limit`) until [`Cri::leftovers`] is empty; what was left otherwise.
    pub fn wait_clean(&self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "left after {} s:\n  {}",
                    limit.as_secs(),
                    left.join("\n  ")
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        if let Ok(pods) = self.list_pods() {
            for p in pods {
                let _ = self.stop_pod_id(&p.id, "left by the test");
                let _ = self.remove_pod_id(&p.id, "left by the test");
            }
        }
        // Shims exit once their containers are gone (their command lines name the socket).
        if let Some(c) = &self.containerd {
            let except: Vec<u32> = c.pid().into_iter().collect();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline
                && !engines::processes_naming(c.dir(), &except).is_empty()
            {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        // What runc kept of containers containerd lost track of (husk's: Containerd's drop).
        for e in std::fs::read_dir(&self.runc_root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&self.runc_root)
                .args(["delete", "--force"])
                .arg(e.file_name())
                .output();
        }
        drop(self.containerd.take());
        for dir in host::cgroup_dirs(&self.cgroup) {
            host::remove_cgroup_tree(&dir);
        }
        drop(self.bridge.take());
    }
}
