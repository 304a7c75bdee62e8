//! `cargo xtask build-image`: the guest kernel and the initramfs.
//!
//! Layout of the cache (`$HUSK_CACHE_DIR`, default `/var/cache/husk`):
//!
//! ```text
//! kernel/<key>/{vmlinux,System.map,config,version}   finished kernels, by input hash
//! build/linux-<key>/                                 a kernel tree while it builds (removed after)
//! build/linux-<key>.log                              the full make output of the last build
//! ```
//!
//! The kernel's key hashes everything its build reads: the fragment, the patches, the pinned
//! version, the source tarball's bytes and the compiler's version. husk-init is rebuilt by
//! cargo (which knows its own inputs) and packed again each time: that takes about a second
//! when nothing changed. The outputs are then copied to `--out` (default
//! `target/husk-image/`).

mod init;
mod kernel;

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::progress::Progress;

/// Options of `build-image`.
#[derive(Debug, clap::Args)]
pub struct BuildImageArgs {
    /// Where to put vmlinux, System.map and initramfs.cpio [default: target/husk-image]
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Kernel source: a kernel.org tarball (.tar.xz/.tar.gz) or an unpacked tree
    /// [default: Debian's /usr/src/linux-source-6.1.tar.xz]
    #[arg(long)]
    pub kernel_source: Option<PathBuf>,
    /// Parallel jobs for the kernel build [default: number of CPUs]
    #[arg(long)]
    pub jobs: Option<usize>,
}

/// Where the outputs of a build are.
#[derive(Debug)]
pub struct Image {
    /// The uncompressed kernel (ELF).
    pub vmlinux: PathBuf,
    /// The initramfs (newc cpio, uncompressed).
    pub initramfs: PathBuf,
}

/// The cache root.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HUSK_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/husk"))
}

/// Builds (or reuses) the kernel and the initramfs and copies both to the output directory.
pub fn build_image(args: &BuildImageArgs) -> Result<Image> {
    let progress = Progress::start();
    let root = crate::workspace::root();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/husk-image"));
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
    });
    let cache = cache_dir();
    fs::create_dir_all(&cache)
        .with_context(|| format!("creating cache dir {}", cache.display()))?;
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let kernel = kernel::build(
        &kernel::KernelInputs {
            config_dir: root.join("kernel-config"),
            source: args.kernel_source.clone(),
            jobs,
        },
        &cache,
        &progress,
    )?;
    for name in kernel::OUTPUTS {
        copy_atomic(&kernel.dir.join(name), &out.join(name))?;
    }

    let initramfs = init::build(&root, &out, &progress)?;

    let image = Image {
        vmlinux: out.join("vmlinux"),
        initramfs,
    };
    progress.say(format!(
        "done in {}: kernel {} ({})",
        crate::progress::fmt_duration(progress.elapsed()),
        kernel.version,
        if kernel.cached { "cached" } else { "built" }
    ));
    for path in [&image.vmlinux, &out.join("System.map"), &image.initramfs] {
        let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        println!("  {:<60} {:>10} bytes", path.display(), size);
    }
    Ok(image)
}

/// Copies a file so that readers never see a half-written one.
fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("tmp");
    fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::rename(&tmp, to)
        .with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
    Ok(())
}
