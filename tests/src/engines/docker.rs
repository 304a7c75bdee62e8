//! dockerd, with its own data root, exec root and socket, husk added as the runtime `husk`;
//! one at a time per test binary (see [`Dockerd`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::command::{ENGINE_LIMIT, expect_ok};
use super::daemon::Daemon;
use super::image::{IMAGE, image_tar};
use super::require::require_programs;
use super::teardown::unmount_under;
use crate::{ContainerRoot, TempDir, run_with_timeout};

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
