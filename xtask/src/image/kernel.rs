//! The guest kernel: pinned version + `kernel-config/husk.config` on `allnoconfig` + the
//! patches in `kernel-config/patches/`, built as the uncompressed `vmlinux`.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

use crate::progress::Progress;
use crate::tools::{Requirement, require};

/// The files a finished kernel consists of (in `kernel/<key>/` and in the output directory).
pub const OUTPUTS: &[&str] = &["vmlinux", "System.map", "kernel.config"];

/// Bump when the way the kernel is built changes in a way the inputs do not show.
const RECIPE: &str = "husk-kernel-recipe-1";

/// Debian's kernel source package, used when `--kernel-source` is not given.
const DEBIAN_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";

const TOOLS: &[Requirement] = &[
    Requirement {
        what: "make",
        package: "make",
    },
    Requirement {
        what: "gcc",
        package: "gcc",
    },
    Requirement {
        what: "flex",
        package: "flex",
    },
    Requirement {
        what: "bison",
        package: "bison",
    },
    Requirement {
        what: "bc",
        package: "bc",
    },
    Requirement {
        what: "tar",
        package: "tar",
    },
    Requirement {
        what: "xz",
        package: "xz-utils",
    },
    Requirement {
        what: "patch",
        package: "patch",
    },
    Requirement {
        what: "perl",
        package: "perl",
    },
    Requirement {
        what: "/usr/include/gelf.h",
        package: "libelf-dev",
    },
];

/// What the kernel build reads.
#[derive(Debug)]
pub struct KernelInputs {
    /// `kernel-config/`: VERSION, husk.config, patches/.
    pub config_dir: PathBuf,
    /// A tarball or an unpacked tree; `None` for Debian's package.
    pub source: Option<PathBuf>,
    /// `make -j`.
    pub jobs: usize,
}

/// A finished kernel in the cache.
#[derive(Debug)]
pub struct Kernel {
    /// `kernel/<key>/`.
    pub dir: PathBuf,
    /// The full version (e.g. `6.1.172`).
    pub version: String,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// Builds the kernel, or finds it in the cache.
pub fn build(inputs: &KernelInputs, cache: &Path, progress: &Progress) -> Result<Kernel> {
    let fragment_path = inputs.config_dir.join("husk.config");
    let fragment = fs::read_to_string(&fragment_path)
        .with_context(|| format!("reading {}", fragment_path.display()))?;
    let pinned = fs::read_to_string(inputs.config_dir.join("VERSION"))
        .context("reading kernel-config/VERSION")?
        .trim()
        .to_owned();
    let patches = list_patches(&inputs.config_dir.join("patches"))?;
    let source = match &inputs.source {
        Some(path) => path.clone(),
        None => PathBuf::from(DEBIAN_SOURCE),
    };
    if !source.exists() {
        if inputs.source.is_none() {
            bail!(
                "kernel source {DEBIAN_SOURCE} not found\n  install with: apt-get install -y linux-source-6.1\n  or pass a kernel.org tarball of Linux {pinned}: --kernel-source PATH"
            );
        }
        bail!("kernel source {} not found", source.display());
    }

    progress.say(format!("kernel: hashing inputs ({})", source.display()));
    let key = input_key(&fragment, &pinned, &patches, &source)?;
    let dir = cache.join("kernel").join(&key);
    if dir.join("vmlinux").exists() {
        let version = fs::read_to_string(dir.join("version")).unwrap_or_default();
        progress.say(format!("kernel: cached ({})", dir.display()));
        return Ok(Kernel {
            dir,
            version: version.trim().to_owned(),
            cached: true,
        });
    }

    require(TOOLS)?;
    let build_dir = cache.join("build").join(format!("linux-{key}"));
    let log_path = cache.join("build").join(format!("linux-{key}.log"));
    if build_dir.exists() {
        // A build that did not finish: its tree may be half patched; start over.
        fs::remove_dir_all(&build_dir)
            .with_context(|| format!("removing stale {}", build_dir.display()))?;
    }
    fs::create_dir_all(&build_dir).with_context(|| format!("creating {}", build_dir.display()))?;
    let mut log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;

    progress.say(format!(
        "kernel: unpacking {} into {}",
        source.display(),
        build_dir.display()
    ));
    unpack(&source, &build_dir)?;
    let version = tree_version(&build_dir)?;
    ensure!(
        version == pinned || version.starts_with(&format!("{pinned}.")),
        "kernel source {} is Linux {version}, but kernel-config/VERSION pins {pinned}",
        source.display()
    );

    for patch in &patches {
        progress.say(format!("kernel: applying {}", file_name(patch)));
        let out = Command::new("patch")
            .args(["-p1", "--forward", "--batch", "-i"])
            .arg(patch)
            .current_dir(&build_dir)
            .output()
            .context("running patch")?;
        log.write_all(&out.stdout)?;
        ensure!(
            out.status.success(),
            "patch {} does not apply to Linux {version}:\n{}",
            patch.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }

    progress.say("kernel: allnoconfig + husk.config, olddefconfig");
    make(
        &build_dir,
        &["allnoconfig"],
        Some(&fragment_path),
        &mut log,
        &log_path,
        None,
    )?;
    make(
        &build_dir,
        &["olddefconfig"],
        None,
        &mut log,
        &log_path,
        None,
    )?;
    let config = fs::read_to_string(build_dir.join(".config")).context("reading .config")?;
    verify_config(&fragment, &config)?;

    progress.say(format!(
        "kernel: make -j{} vmlinux (Linux {version}; full log: {})",
        inputs.jobs,
        log_path.display()
    ));
    make(
        &build_dir,
        &[&format!("-j{}", inputs.jobs), "vmlinux"],
        None,
        &mut log,
        &log_path,
        Some(progress),
    )?;

    let tmp = cache.join("kernel").join(format!("{key}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    fs::copy(build_dir.join("vmlinux"), tmp.join("vmlinux")).context("copying vmlinux")?;
    fs::copy(build_dir.join("System.map"), tmp.join("System.map")).context("copying System.map")?;
    fs::write(tmp.join("kernel.config"), &config)?;
    fs::write(tmp.join("version"), format!("{version}\n"))?;
    fs::rename(&tmp, &dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    progress.say("kernel: built; removing the build tree");
    fs::remove_dir_all(&build_dir).with_context(|| format!("removing {}", build_dir.display()))?;
    Ok(Kernel {
        dir,
        version,
        cached: false,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The `*.patch` files, in the order they are applied (by name).
fn list_patches(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut patches = Vec::new();
    if dir.exists() {
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "patch") {
                patches.push(path);
            }
        }
    }
    patches.sort();
    Ok(patches)
}

/// A hash of everything the build reads, as 16 hex digits.
fn input_key(fragment: &str, pinned: &str, patches: &[PathBuf], source: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut field = |name: &str, data: &[u8]| {
        h.update(name.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    };
    field("recipe", RECIPE.as_bytes());
    field("version", pinned.as_bytes());
    field("fragment", fragment.as_bytes());
    for patch in patches {
        let data = fs::read(patch).with_context(|| format!("reading {}", patch.display()))?;
        field(&file_name(patch), &data);
    }
    let gcc = Command::new("gcc").arg("--version").output();
    field("gcc", &gcc.map(|o| o.stdout).unwrap_or_default());
    if source.is_dir() {
        // An unpacked tree is identified by where it is and what version it says it is.
        let makefile = fs::read(source.join("Makefile"))
            .with_context(|| format!("{} has no Makefile: not a kernel tree", source.display()))?;
        field("source-dir", source.to_string_lossy().as_bytes());
        field("makefile", &makefile);
    } else {
        let mut file =
            fs::File::open(source).with_context(|| format!("opening {}", source.display()))?;
        let mut sh = Sha256::new();
        std::io::copy(&mut file, &mut sh)
            .with_context(|| format!("reading {}", source.display()))?;
        field("source", &sh.finalize());
    }
    let digest = h.finalize();
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// Unpacks a tarball (its one top-level directory stripped) or copies a tree into `dest`.
fn unpack(source: &Path, dest: &Path) -> Result<()> {
    let status = if source.is_dir() {
        Command::new("cp")
            .arg("-a")
            .arg(source.join("."))
            .arg(dest)
            .status()
    } else {
        Command::new("tar")
            .arg("-xf")
            .arg(source)
            .arg("-C")
            .arg(dest)
            .arg("--strip-components=1")
            .status()
    }
    .context("running tar/cp")?;
    ensure!(
        status.success(),
        "unpacking {} failed ({status})",
        source.display()
    );
    Ok(())
}

/// `VERSION.PATCHLEVEL.SUBLEVEL` from a tree's Makefile.
fn tree_version(tree: &Path) -> Result<String> {
    let makefile = fs::read_to_string(tree.join("Makefile")).with_context(|| {
        format!(
            "{}: no top-level Makefile; not a kernel source",
            tree.display()
        )
    })?;
    let get = |key: &str| {
        makefile
            .lines()
            .find_map(|l| {
                l.strip_prefix(key)?
                    .trim_start()
                    .strip_prefix('=')
                    .map(str::trim)
            })
            .map(str::to_owned)
    };
    match (get("VERSION"), get("PATCHLEVEL"), get("SUBLEVEL")) {
        (Some(v), Some(p), Some(s)) => Ok(format!("{v}.{p}.{s}")),
        _ => bail!("{}: Makefile does not say its version", tree.display()),
    }
}

/// Runs make in the tree, all output into the log; with `progress`, prints a line every 100
/// compiled files. On failure the error carries the log's last lines.
fn make(
    tree: &Path,
    args: &[&str],
    allconfig: Option<&Path>,
    log: &mut fs::File,
    log_path: &Path,
    progress: Option<&Progress>,
) -> Result<()> {
    let mut cmd = Command::new("make");
    cmd.args(args)
        .current_dir(tree)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(frag) = allconfig {
        cmd.env("KCONFIG_ALLCONFIG", frag);
    }
    let mut child = cmd.spawn().context("running make")?;
    // stderr goes through a thread into the same log (interleaving by lines is fine).
    let stderr = child.stderr.take().context("make stderr")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let tx_err = tx.clone();
    let err_thread = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx_err.send(line);
        }
    });
    let stdout = child.stdout.take().context("make stdout")?;
    let out_thread = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut compiled = 0usize;
    for line in rx {
        writeln!(log, "{line}")?;
        if line.trim_start().starts_with("CC ") {
            compiled += 1;
            if let Some(p) = progress
                && compiled.is_multiple_of(100)
            {
                p.say(format!("kernel: {compiled} files compiled"));
            }
        }
        tail.push_back(line);
        if tail.len() > 30 {
            tail.pop_front();
        }
    }
    let _ = out_thread.join();
    let _ = err_thread.join();
    let status = child.wait().context("waiting for make")?;
    if !status.success() {
        bail!(
            "make {} failed ({status}); last lines of {}:\n{}",
            args.join(" "),
            log_path.display(),
            Vec::from(tail).join("\n")
        );
    }
    Ok(())
}

/// Checks that every option of the fragment survived `olddefconfig` (Kconfig silently drops
/// options whose dependencies are not met).
fn verify_config(fragment: &str, config: &str) -> Result<()> {
    let set: std::collections::HashMap<&str, &str> = config
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("CONFIG_"))
        .collect();
    let mut wrong = Vec::new();
    for line in fragment.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set")
                && name.starts_with("CONFIG_")
                && set.contains_key(name)
            {
                wrong.push(format!("{name} should be off but is {}", set[name]));
            }
        } else if let Some((name, value)) = line.split_once('=')
            && name.starts_with("CONFIG_")
        {
            match set.get(name) {
                Some(v) if *v == value => {}
                Some(v) => wrong.push(format!("{name}={value} became {v}")),
                None => wrong.push(format!("{name}={value} was dropped (unmet dependency?)")),
            }
        }
    }
    ensure!(
        wrong.is_empty(),
        "kernel-config/husk.config did not stick after olddefconfig:\n  {}",
        wrong.join("\n  ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_config_reports_dropped_changed_and_unwanted_options() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_B=8\n# CONFIG_C is not set\nCONFIG_D=y\n# CONFIG_E is not set\n";
        let good = "CONFIG_A=y\nCONFIG_B=8\n# CONFIG_C is not set\nCONFIG_D=y\n";
        verify_config(fragment, good).unwrap();
        let bad = "CONFIG_A=y\nCONFIG_B=16\nCONFIG_C=y\n";
        let err = verify_config(fragment, bad).unwrap_err().to_string();
        assert!(err.contains("CONFIG_B=8 became 16"), "{err}");
        assert!(err.contains("CONFIG_C should be off"), "{err}");
        assert!(err.contains("CONFIG_D=y was dropped"), "{err}");
    }

    #[test]
    fn reads_the_version_from_a_makefile() {
        let dir = std::env::temp_dir().join(format!("husk-xtask-mk-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("Makefile"),
            "# SPDX\nVERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 172\nEXTRAVERSION =\n",
        )
        .unwrap();
        assert_eq!(tree_version(&dir).unwrap(), "6.1.172");
        fs::remove_dir_all(&dir).unwrap();
    }
}
