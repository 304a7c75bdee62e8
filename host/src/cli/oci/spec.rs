//! The commands about the runtime rather than a container: `husk spec` (a default
//! config.json) and `husk features` (what husk supports, as the runtime spec's features JSON).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use oci_spec::runtime::Spec;

use crate::oci::state;

/// `spec`.
#[derive(Debug, clap::Args)]
pub struct SpecArgs {
    /// Where to write config.json.
    #[arg(long, short = 'b', default_value = ".")]
    bundle: PathBuf,
}

/// `husk spec`.
pub fn spec(args: SpecArgs) -> Result<ExitCode> {
    let path = args.bundle.join("config.json");
    if path.exists() {
        bail!("{} already exists; remove it first", path.display());
    }
    let spec = Spec::default();
    let json = serde_json::to_string_pretty(&spec)?;
    let mut f =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(json.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// What `husk checkpoint`, `husk restore` and `husk features` say.
pub const CHECKPOINT_UNSUPPORTED: &str =
    "checkpoint and restore are not supported: a container's VM cannot be saved and restored yet";

/// `husk checkpoint` and `husk restore`: refused, saying so.
pub fn checkpoint(verb: &str) -> Result<ExitCode> {
    bail!("{verb}: {CHECKPOINT_UNSUPPORTED}")
}

/// `husk features`.
pub fn features() -> Result<ExitCode> {
    let v = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": state::OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": ["ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
            "bind", "rbind", "private", "rprivate", "shared", "rshared", "slave", "rslave",
            "relatime", "norelatime", "strictatime", "nostrictatime", "mode", "size"],
        "linux": {
            "namespaces": ["pid", "mount", "uts", "ipc", "user", "cgroup", "network"],
            "capabilities": caps::all().iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            // On the host (the monitor's cgroup, see docs/conformance.md); systemd-style paths
            // are read as runc reads them, the cgroups made on the cgroup filesystem.
            "cgroup": {"v1": true, "v2": true, "systemd": true, "systemdUser": false},
            "seccomp": {"enabled": true, "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO",
                "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
                "SCMP_ACT_LOG"], "operators": ["SCMP_CMP_EQ", "SCMP_CMP_NE", "SCMP_CMP_LT",
                "SCMP_CMP_LE", "SCMP_CMP_GT", "SCMP_CMP_GE", "SCMP_CMP_MASKED_EQ"],
                "archs": ["SCMP_ARCH_X86_64"]},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.husk.vm.memory_mib": "guest RAM in MiB (default: memory limit + 64, or 256)",
            "io.husk.vm.vcpus": "vCPUs (default: the size of cpu.cpus, else CPU quota rounded up, or 1)",
            // runc's key, read by tools that look for checkpoint support.
            "org.opencontainers.runc.checkpoint.enabled": "false",
            "io.husk.checkpoint": CHECKPOINT_UNSUPPORTED
        }
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}
