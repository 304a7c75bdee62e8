//! `husk template list|build|rm`: the VM templates that `husk create` restores (see
//! `crate::template`). Templates are made on demand by the first `create` of each shape;
//! `build` makes one ahead of time (e.g. at installation, for the shapes a host runs).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use crate::template::{self, Cache, TemplateShape};

#[derive(Debug, clap::Subcommand)]
pub enum TemplateCommand {
    /// List the templates: key, shape, disk space, when made.
    List(ListArgs),
    /// Make the template of a shape (unless there is one), with the installed guest image.
    Build(BuildArgs),
    /// Remove templates: one by key (or a unique prefix of one), or --all.
    Rm(RmArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only the keys, one a line.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// vCPUs of the VM.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = crate::oci::bundle::DEFAULT_MEMORY_MIB)]
    mem_mib: u64,
    /// The kernel (default: the installed guest image's).
    #[arg(long, requires = "initrd")]
    kernel: Option<PathBuf>,
    /// The initramfs (default: the installed guest image's).
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Print nothing on success.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, clap::Args)]
pub struct RmArgs {
    /// The template's key, or a unique prefix of it.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    key: Option<String>,
    /// Every template.
    #[arg(long)]
    all: bool,
}

pub fn run(cmd: TemplateCommand) -> Result<ExitCode> {
    let dir = template::cache_dir();
    let cache =
        Cache::open(&dir).with_context(|| format!("the template directory {}", dir.display()))?;
    match cmd {
        TemplateCommand::List(args) => {
            let entries = cache.list()?;
            if args.quiet {
                for e in entries {
                    println!("{}", e.key);
                }
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<32}  {:>5}  {:>8}  {:>9}  CREATED",
                "KEY", "VCPUS", "MEM_MIB", "DISK_MIB"
            );
            for e in entries {
                let (vcpus, mem, created) = match &e.info {
                    Some(i) => (
                        i.shape.vcpus.to_string(),
                        i.shape.mem_mib.to_string(),
                        i.created.clone(),
                    ),
                    None => ("?".into(), "?".into(), "?".into()),
                };
                println!(
                    "{:<32}  {vcpus:>5}  {mem:>8}  {:>9.1}  {created}",
                    e.key,
                    e.disk_bytes as f64 / f64::from(1 << 20)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Build(args) => {
            let image = match (args.kernel, args.initrd) {
                (Some(vmlinux), Some(initramfs)) => {
                    crate::assets::GuestImage { vmlinux, initramfs }
                }
                _ => crate::assets::find()?,
            };
            for p in [&image.vmlinux, &image.initramfs] {
                if !p.is_file() {
                    bail!("{} does not exist or is not a file", p.display());
                }
            }
            let shape = TemplateShape {
                vcpus: args.vcpus,
                mem_mib: args.mem_mib,
            };
            let started = std::time::Instant::now();
            let built = template::build(&image, shape, &cache)
                .map_err(|e| anyhow::anyhow!(crate::error_chain(&e)))?;
            if !args.quiet {
                let what = if built.made { "made" } else { "already there" };
                println!(
                    "{} ({} vCPU(s), {} MiB): {what} in {:.1} s",
                    built.key,
                    shape.vcpus,
                    shape.mem_mib,
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Rm(args) => {
            let keys: Vec<String> = if args.all {
                cache.list()?.into_iter().map(|e| e.key).collect()
            } else {
                vec![args.key.unwrap_or_default()]
            };
            for key in keys {
                let removed = cache
                    .remove(&key)
                    .map_err(|e| anyhow::anyhow!(crate::error_chain(&e)))?;
                println!("{removed}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
