//! `husk update`: changes a container's limits, with runc's flags or a JSON `LinuxResources`
//! (`--resources FILE`, `-r -` for stdin; the other flags are then ignored, as in runc).
//!
//! First on the host, where husk keeps the spec's limits (the monitor's `cgroupsPath`, see
//! `monitor::cgroup::limits`: CPU, cpuset and pids; the memory bound is the VM's and does not
//! move), then in the VM: the monitor lays the update over the container's resources, refuses
//! what the VM cannot meet without growing, and husk-init applies the rest to the container's
//! cgroup. If the guest refuses, the host's values are put back. A pod's later container goes
//! through its sandbox's monitor (the process standing for it passes the request on); its host
//! cgroup holds no limits.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use oci_spec::runtime::LinuxResources;

use super::Context;
use crate::monitor::api::{MonitorReply, MonitorRequest};
use crate::monitor::{cgroup, client};
use crate::oci::state::Status;

/// `update`.
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// Container id.
    id: String,
    /// The resources to change, as OCI `LinuxResources` JSON, from this file ('-': stdin);
    /// the other flags are then ignored.
    #[arg(long, short = 'r', value_name = "FILE")]
    resources: Option<PathBuf>,
    /// Block IO weight, 10 to 1000 (in the guest).
    #[arg(long)]
    blkio_weight: Option<u16>,
    /// CPU CFS period in microseconds.
    #[arg(long)]
    cpu_period: Option<u64>,
    /// CPU CFS quota in microseconds per period (-1: none).
    #[arg(long, allow_hyphen_values = true)]
    cpu_quota: Option<i64>,
    /// CPU shares (relative weight).
    #[arg(long, alias = "cpu-shares")]
    cpu_share: Option<u64>,
    /// CPU real-time period in microseconds.
    #[arg(long)]
    cpu_rt_period: Option<u64>,
    /// CPU real-time runtime in microseconds.
    #[arg(long, allow_hyphen_values = true)]
    cpu_rt_runtime: Option<i64>,
    /// Host CPUs to run on (e.g. 0-3,5): pins the VM, and the container gets as many of the
    /// guest's CPUs.
    #[arg(long)]
    cpuset_cpus: Option<String>,
    /// Memory nodes to use.
    #[arg(long)]
    cpuset_mems: Option<String>,
    /// SCHED_IDLE for the cgroup (1) or not (0).
    #[arg(long, allow_hyphen_values = true)]
    cpu_idle: Option<i64>,
    /// Memory limit (bytes, or with a unit: 512m, 1g; -1: none).
    #[arg(long, short = 'm', allow_hyphen_values = true)]
    memory: Option<String>,
    /// Memory reservation, the soft limit (as --memory).
    #[arg(long, allow_hyphen_values = true)]
    memory_reservation: Option<String>,
    /// Memory plus swap (as --memory; -1: unlimited swap).
    #[arg(long, allow_hyphen_values = true)]
    memory_swap: Option<String>,
    /// Obsolete (ignored, as by runc).
    #[arg(long, allow_hyphen_values = true)]
    kernel_memory: Option<String>,
    /// Obsolete (ignored, as by runc).
    #[arg(long, allow_hyphen_values = true)]
    kernel_memory_tcp: Option<String>,
    /// Most processes in the container (-1: no limit).
    #[arg(long, allow_hyphen_values = true)]
    pids_limit: Option<i64>,
    /// Intel RDT L3 cache schema: not supported.
    #[arg(long)]
    l3_cache_schema: Option<String>,
    /// Intel RDT memory bandwidth schema: not supported.
    #[arg(long)]
    mem_bw_schema: Option<String>,
}

impl UpdateArgs {
    /// The resources to change: the JSON of `--resources`, else the flags.
    fn resources(&self) -> Result<LinuxResources> {
        if self.l3_cache_schema.is_some() || self.mem_bw_schema.is_some() {
            bail!("--l3-cache-schema, --mem-bw-schema: Intel RDT is not supported (a VM has none)");
        }
        if let Some(file) = &self.resources {
            return read_resources(file);
        }
        if self.kernel_memory.is_some() || self.kernel_memory_tcp.is_some() {
            eprintln!("husk: --kernel-memory and --kernel-memory-tcp are obsolete and ignored");
        }
        let size = |flag: &str, v: &Option<String>| -> Result<Option<i64>> {
            v.as_deref()
                .map(|v| ram_in_bytes(v).with_context(|| format!("--{flag}")))
                .transpose()
        };
        let mut json = serde_json::json!({"memory": {}, "cpu": {}, "pids": {}, "blockIO": {}});
        let mut put = |section: &str, key: &str, value: serde_json::Value| {
            json[section][key] = value;
        };
        if let Some(v) = size("memory", &self.memory)? {
            put("memory", "limit", v.into());
        }
        if let Some(v) = size("memory-reservation", &self.memory_reservation)? {
            put("memory", "reservation", v.into());
        }
        if let Some(v) = size("memory-swap", &self.memory_swap)? {
            put("memory", "swap", v.into());
        }
        if let Some(v) = self.cpu_share {
            put("cpu", "shares", v.into());
        }
        if let Some(v) = self.cpu_quota {
            put("cpu", "quota", v.into());
        }
        if let Some(v) = self.cpu_period {
            put("cpu", "period", v.into());
        }
        if let Some(v) = self.cpu_rt_runtime {
            put("cpu", "realtimeRuntime", v.into());
        }
        if let Some(v) = self.cpu_rt_period {
            put("cpu", "realtimePeriod", v.into());
        }
        if let Some(v) = &self.cpuset_cpus {
            put("cpu", "cpus", v.clone().into());
        }
        if let Some(v) = &self.cpuset_mems {
            put("cpu", "mems", v.clone().into());
        }
        if let Some(v) = self.cpu_idle {
            put("cpu", "idle", v.into());
        }
        if let Some(v) = self.blkio_weight {
            if !(10..=1000).contains(&v) {
                bail!("--blkio-weight: {v} is not between 10 and 1000");
            }
            put("blockIO", "weight", v.into());
        }
        // runc: 0 leaves the limit as it is.
        match self.pids_limit {
            Some(0) | None => {}
            Some(v) => put("pids", "limit", v.into()),
        }
        // Sections left empty are "not set".
        if let Some(map) = json.as_object_mut() {
            map.retain(|_, v| v.as_object().is_some_and(|o| !o.is_empty()));
        }
        Ok(serde_json::from_value(json)?)
    }
}

/// `LinuxResources` JSON from `file` ('-': stdin).
fn read_resources(file: &std::path::Path) -> Result<LinuxResources> {
    let mut text = String::new();
    let shown = file.display();
    if file == std::path::Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("--resources -: reading stdin")?;
    } else {
        text = std::fs::read_to_string(file).with_context(|| format!("--resources {shown}"))?;
    }
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "--resources {shown}: not a LinuxResources JSON object (line {} column {}): {e}",
            e.line(),
            e.column()
        )
    })
}

/// A size as runc (docker's `RAMInBytes`) reads it: a number, optionally with a unit `b`,
/// `k`, `m`, `g`, `t` or `p` (powers of 1024, an `i` and a `b` after it allowed), or `-1`.
fn ram_in_bytes(value: &str) -> Result<i64> {
    if value.trim() == "-1" {
        return Ok(-1);
    }
    let bad = || anyhow::anyhow!("{value:?} is not a size like 512m, 1g or 1048576 (or -1)");
    let v = value.trim().to_ascii_lowercase();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let unit = unit.trim_start();
    let unit = unit.strip_suffix('b').unwrap_or(unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let power = match unit {
        "" => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        "p" => 5,
        _ => return Err(bad()),
    };
    let bytes = number * 1024f64.powi(power);
    if !bytes.is_finite() || bytes >= 9.2e18 {
        return Err(bad());
    }
    // Truncated, as docker's parser does.
    #[allow(clippy::cast_possible_truncation)]
    Ok(bytes as i64)
}

/// `husk update`.
pub fn update(ctx: &Context, args: UpdateArgs) -> Result<ExitCode> {
    let resources = args.resources()?;
    let entry = ctx.store().open(&args.id)?;
    let st = entry.current()?;
    if !matches!(
        st.status,
        Status::Created | Status::Running | Status::Paused
    ) {
        bail!("cannot update container {} that is {}", args.id, st.status);
    }
    // The host first (only what the record says husk keeps there), then the guest.
    let applied = cgroup::update(entry.dir(), &resources)
        .with_context(|| format!("updating container {} on the host", args.id))?;
    let outcome = entry
        .sockets()
        .map_err(anyhow::Error::from)
        .and_then(|s| {
            client::request(
                &s.monitor(),
                &MonitorRequest::Update {
                    resources: Box::new(resources),
                },
            )
            .map_err(anyhow::Error::msg)
        })
        .and_then(|(reply, _)| match reply {
            MonitorReply::Ok => Ok(()),
            MonitorReply::Error(e) => bail!("{e}"),
            other => bail!("unexpected reply {other:?}"),
        });
    if let Err(e) = outcome {
        if let Some(applied) = applied {
            applied.undo();
        }
        return Err(e.context(format!("updating container {}", args.id)));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: UpdateArgs,
    }

    fn parse(args: &[&str]) -> Result<LinuxResources> {
        let mut argv = vec!["update"];
        argv.extend_from_slice(args);
        argv.push("c1");
        Cli::try_parse_from(argv)?.args.resources()
    }

    #[test]
    fn sizes_read_like_runc() {
        assert_eq!(ram_in_bytes("1048576").unwrap(), 1 << 20);
        assert_eq!(ram_in_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(ram_in_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(ram_in_bytes("1.5k").unwrap(), 1536);
        assert_eq!(ram_in_bytes("2 MiB").unwrap(), 2 << 20);
        assert_eq!(ram_in_bytes("10b").unwrap(), 10);
        assert_eq!(ram_in_bytes("-1").unwrap(), -1);
        for bad in ["", "m", "12x", "-5", "1e3", "99999999p"] {
            let e = ram_in_bytes(bad).unwrap_err().to_string();
            assert!(e.contains("is not a size"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn flags_become_the_resources_they_name() {
        let r = parse(&[
            "--memory",
            "300m",
            "--memory-swap",
            "-1",
            "--cpu-shares",
            "512",
            "--cpu-quota",
            "50000",
            "--cpu-period",
            "100000",
            "--cpuset-cpus",
            "0-1",
            "--pids-limit",
            "64",
            "--blkio-weight",
            "300",
        ])
        .unwrap();
        let want: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":314572800,"swap":-1},
                "cpu":{"shares":512,"quota":50000,"period":100000,"cpus":"0-1"},
                "pids":{"limit":64},"blockIO":{"weight":300}}"#,
        )
        .unwrap();
        assert_eq!(r, want);
        // runc's own spelling of the shares flag, and no flags: nothing to change.
        assert_eq!(
            parse(&["--cpu-share", "2"])
                .unwrap()
                .cpu()
                .as_ref()
                .and_then(|c| c.shares()),
            Some(2)
        );
        assert_eq!(parse(&[]).unwrap(), LinuxResources::default());
        assert_eq!(
            parse(&["--pids-limit", "0"]).unwrap(),
            LinuxResources::default()
        );
    }

    #[test]
    fn bad_flags_and_files_name_what_is_wrong() {
        let e = format!("{:#}", parse(&["--memory", "lots"]).unwrap_err());
        assert!(e.starts_with("--memory: \"lots\" is not a size"), "{e}");
        let e = parse(&["--blkio-weight", "5"]).unwrap_err().to_string();
        assert!(e.contains("--blkio-weight: 5"), "{e}");
        let e = parse(&["--l3-cache-schema", "L3:0=f"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("Intel RDT is not supported"), "{e}");
        let dir = std::env::temp_dir().join(format!("husk-update-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("r.json");
        std::fs::write(&file, r#"{"memory": {"limit": "lots"}}"#).unwrap();
        let path = file.to_str().unwrap();
        let e = parse(&["-r", path]).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("--resources {path}: not a LinuxResources")),
            "{e}"
        );
        std::fs::write(&file, r#"{"pids": {"limit": 7}}"#).unwrap();
        // The file wins over the flags, as in runc.
        let r = parse(&["-r", path, "--pids-limit", "9"]).unwrap();
        assert_eq!(r.pids().as_ref().map(|p| p.limit()), Some(7));
        let e = format!("{:#}", parse(&["-r", "/no/such/file"]).unwrap_err());
        assert!(e.starts_with("--resources /no/such/file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
