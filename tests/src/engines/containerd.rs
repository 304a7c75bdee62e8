//! containerd, with its own configuration, root, state and socket, driven with `ctr` (or, with
//! the CRI plugin enabled, by `crate::cri`), husk as the runc v2 shim's binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::command::{ENGINE_LIMIT, expect_ok};
use super::daemon::Daemon;
use super::image::{IMAGE, image_tar, oci_archive};
use super::require::require_programs;
use super::teardown::unmount_under;
use crate::{ContainerRoot, TempDir, run_with_timeout};

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
