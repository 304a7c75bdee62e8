//! podman, with its own storage, run root and configuration, running husk through a wrapper
//! that gives husk a state root of the test's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::command::{ENGINE_LIMIT, expect_ok};
use super::image::{IMAGE, image_tar};
use super::require::require_programs;
use super::teardown::{unmount_under, wait_for_processes_naming};
use crate::{ContainerRoot, TempDir, run_with_timeout};

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
