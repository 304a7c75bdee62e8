//! The machine and tool versions a report was measured with (`bench startup` and `bench
//! pod` both record them), so that numbers from different machines are not compared blindly.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use super::density::meminfo;
use crate::bench::round;

/// The machine and tool versions, for the report.
pub(in crate::bench) fn machine(husk: &Path, kvm_pvm: bool) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = meminfo("MemTotal").unwrap_or(0) as f64 / 1048576.0;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let version = |cmd: &Path| -> String {
        Command::new(cmd)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(String::from)
            })
            .unwrap_or_default()
    };
    let kvm = if kvm_pvm {
        "kvm_pvm (nested, page-table based: guest kernel mode is emulated)"
    } else {
        "KVM"
    };
    json!({
        "summary": format!("{cpu}, {cores} cores, {mem_gib:.1} GiB, Linux {kernel}, {kvm}"),
        "cpu": cpu, "cores": cores, "mem_gib": round(mem_gib), "kernel": kernel, "kvm": kvm,
        "husk": version(husk), "runc": version(Path::new("runc")), "crun": version(Path::new("crun")),
        "qemu": version(Path::new("qemu-system-x86_64")),
    })
}
