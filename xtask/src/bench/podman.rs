//! `cargo xtask bench podman`: the wall time of `podman run --rm IMAGE true` with husk as the
//! runtime, next to runc and crun under the same podman, in one run on the same machine.
//!
//! podman gets a storage root, run root, containers.conf and storage.conf of its own in a
//! scratch directory (vfs storage: nothing of the host's podman state is touched), and an image
//! imported from a busybox-static rootfs (no registry is needed). The runtimes take turns
//! (husk, runc, crun, husk, ...), so that a change in the machine's load hits all of them alike.
//! husk runs with a state root in the scratch directory, through a wrapper script: podman does
//! not pass `--runtime-flag`s on to the `podman container cleanup` that conmon runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use super::{Scratch, Stats, check_tools, make_bundle};

/// The image the benchmark imports.
const IMAGE: &str = "localhost/husk-bench-busybox:latest";

/// Options of `bench podman`.
#[derive(Debug, clap::Args)]
pub struct PodmanBenchArgs {
    /// `podman run`s per runtime.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// podman's `--network` for the runs [default: podman's own default, the bridge].
    #[arg(long)]
    network: Option<String>,
    /// Directory for the report (`podman.json`) [default: target/bench/podman]
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs the benchmark.
pub fn run(args: &PodmanBenchArgs) -> Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    check_tools()?;
    for tool in ["podman", "conmon"] {
        ensure!(
            super::which(tool),
            "{tool} is missing: apt-get install -y podman conmon (or run scripts/setup.sh)"
        );
    }
    super::guest_image(None)?;
    let root = crate::workspace::root();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench/podman"));
    println!("building husk (release)");
    let husk = super::build_husk(&root)?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let podman = Podman::new(&out.join("work"), &husk)?;

    let runtimes: [(&str, PathBuf); 3] = [
        ("husk", podman.husk_wrapper.clone()),
        ("runc", which_path("runc")?),
        ("crun", which_path("crun")?),
    ];
    let network = args.network.as_deref();
    println!(
        "{} rounds of `podman run --rm{} IMAGE true` with husk, runc and crun in turn",
        args.runs,
        network
            .map(|n| format!(" --network {n}"))
            .unwrap_or_default()
    );
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); runtimes.len()];
    for round in 1..=args.runs {
        for ((name, runtime), samples) in runtimes.iter().zip(samples.iter_mut()) {
            let ms = podman.run_true(runtime, network)?;
            println!("  round {round}: {name:<5} {ms:>10.1} ms");
            samples.push(ms);
        }
    }

    println!();
    println!(
        "{:<28} {:>12} {:>12} {:>12}",
        "wall time (ms)", "min", "median", "p90"
    );
    let stats: Vec<Stats> = samples.iter().map(|s| Stats::of(s)).collect();
    for ((name, _), s) in runtimes.iter().zip(&stats) {
        println!(
            "{:<28} {:>12.1} {:>12.1} {:>12.1}",
            format!("podman run, {name}"),
            s.min,
            s.median,
            s.p90
        );
    }
    println!();
    for (i, (name, _)) in runtimes.iter().enumerate().skip(1) {
        println!(
            "ratio of medians, husk / {name}: {:.1}x",
            stats[0].median / stats[i].median
        );
    }
    let report = json!({
        "command": format!("podman run --rm{} IMAGE true", network.map(|n| format!(" --network {n}")).unwrap_or_default()),
        "podman": version("podman"),
        "runs": runtimes.iter().zip(&samples).zip(&stats).map(|(((name, _), s), st)| {
            (name.to_string(), json!({"samples_ms": s, "stats": st.json()}))
        }).collect::<serde_json::Map<String, Value>>(),
    });
    let path = out.join("podman.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// `program`'s absolute path from `PATH`.
fn which_path(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} is not in PATH"))
}

/// The first line of `program --version`.
fn version(program: &str) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

/// A podman with its own storage and configuration in a scratch directory.
struct Podman {
    dir: Scratch,
    husk_wrapper: PathBuf,
}

impl Podman {
    fn new(dir: &Path, husk: &Path) -> Result<Podman> {
        let dir = Scratch::new(dir)?;
        let d = dir.path().to_path_buf();
        // This machine class has no CAP_SYS_RESOURCE and caps open files at 20000: podman's
        // default ulimits would fail every container. cgroupfs and file events: no systemd.
        std::fs::write(
            d.join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
             log_driver = \"k8s-file\"\n\n[engine]\ncgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\n\n[network]\nnetwork_backend = \"netavark\"\n",
        )?;
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{0}/run\"\ngraphroot = \"{0}/storage\"\n",
                d.display()
            ),
        )?;
        let husk_wrapper = d.join("husk-runtime");
        std::fs::write(
            &husk_wrapper,
            format!(
                "#!/bin/sh\nexec '{}' --root '{}' \"$@\"\n",
                husk.display(),
                d.join("husk-root").display()
            ),
        )?;
        std::fs::set_permissions(
            &husk_wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let podman = Podman { dir, husk_wrapper };
        // The image: a busybox-static rootfs, as a tar.
        let image = make_bundle(&d.join("image"), &["/bin/true"], None)?;
        let tar = d.join("rootfs.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(image.join("rootfs"))
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .context("running tar")?;
        ensure!(status.success(), "tar of the busybox rootfs failed");
        let out = podman
            .cmd(&podman.husk_wrapper)
            .arg("import")
            .arg(&tar)
            .arg(IMAGE)
            .output()
            .context("running podman import")?;
        ensure!(
            out.status.success(),
            "podman import failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(podman)
    }

    /// A podman command with this instance's storage and configuration, and `runtime`.
    fn cmd(&self, runtime: &Path) -> Command {
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
            .arg("vfs")
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .arg("--runtime")
            .arg(runtime);
        cmd
    }

    /// One `podman run --rm [--network N] IMAGE true`: its wall time, ms.
    fn run_true(&self, runtime: &Path, network: Option<&str>) -> Result<f64> {
        let mut cmd = self.cmd(runtime);
        cmd.args(["run", "--rm"]);
        if let Some(n) = network {
            cmd.args(["--network", n]);
        }
        cmd.args([IMAGE, "true"]).stdin(Stdio::null());
        let start = Instant::now();
        let out = cmd.output().context("running podman")?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            bail!(
                "podman run with {} failed ({}): {}",
                runtime.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(ms)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .cmd(&self.husk_wrapper)
            .args(["rm", "-a", "-f", "-t", "0"])
            .output();
        // vfs needs no unmounting, but podman may leave its run root's shm mounts.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l",
                self.dir.path().display()
            ))
            .status();
    }
}
