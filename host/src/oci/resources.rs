//! `husk update`'s `linux.resources`: an update laid over a container's present resources as
//! runc lays it (every field the update sets replaces the present one; the rest stay), and
//! the check that the result fits the VM, which does not grow (more memory than the VM leaves
//! to the container, or more CPUs than it has vCPUs, is refused naming the limit).

use oci_spec::runtime::LinuxResources;

use super::bundle::{GUEST_OVERHEAD_MIB, VmSize, count_cpus};

/// `update` laid over `current` (see the module docs): objects are merged field by field,
/// anything else the update sets replaces what was there.
pub fn merge(current: &LinuxResources, update: &LinuxResources) -> LinuxResources {
    let (Ok(mut base), Ok(over)) = (serde_json::to_value(current), serde_json::to_value(update))
    else {
        return update.clone();
    };
    lay_over(&mut base, over);
    serde_json::from_value(base).unwrap_or_else(|_| update.clone())
}

fn lay_over(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => lay_over(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Whether `resources` fit a VM of `vm`: the error names the field and the VM's limit.
pub fn fits(resources: &LinuxResources, vm: VmSize) -> Result<(), String> {
    let room_mib = vm.memory_mib.saturating_sub(GUEST_OVERHEAD_MIB);
    if let Some(limit) = resources
        .memory()
        .as_ref()
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
    {
        let mib = limit.unsigned_abs().div_ceil(1 << 20);
        if mib > room_mib {
            return Err(format!(
                "linux.resources.memory.limit: {mib} MiB is more than the VM leaves to the container ({room_mib} MiB of its {} MiB); a running VM does not grow",
                vm.memory_mib
            ));
        }
    }
    let Some(cpu) = resources.cpu().as_ref() else {
        return Ok(());
    };
    if let Some(set) = cpu.cpus().as_ref().filter(|c| !c.trim().is_empty()) {
        let n = count_cpus(set).ok_or_else(|| {
            format!("linux.resources.cpu.cpus: {set:?} is not a CPU list like \"0-3,5\"")
        })?;
        if n > u64::from(vm.vcpus) {
            return Err(format!(
                "linux.resources.cpu.cpus: {set:?} lists {n} CPUs; the VM has {} vCPUs and a running VM does not grow",
                vm.vcpus
            ));
        }
    }
    if let (Some(quota), Some(period)) = (cpu.quota(), cpu.period())
        && quota > 0
        && period > 0
    {
        let n = quota.unsigned_abs().div_ceil(period);
        if n > u64::from(vm.vcpus) {
            return Err(format!(
                "linux.resources.cpu.quota: {quota} per period {period} asks for {n} CPUs; the VM has {} vCPUs and a running VM does not grow",
                vm.vcpus
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    const VM: VmSize = VmSize {
        memory_mib: 364,
        vcpus: 2,
    };

    #[test]
    fn an_update_replaces_what_it_sets_and_keeps_the_rest() {
        let current = res(
            r#"{"memory":{"limit":314572800,"swap":629145600},"cpu":{"shares":1024,"quota":100000,"period":100000,"cpus":"0-1"},"pids":{"limit":100}}"#,
        );
        let merged = merge(
            &current,
            &res(r#"{"memory":{"limit":209715200},"cpu":{"quota":50000},"pids":{"limit":20}}"#),
        );
        let want = res(
            r#"{"memory":{"limit":209715200,"swap":629145600},"cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0-1"},"pids":{"limit":20}}"#,
        );
        assert_eq!(merged, want);
        // An empty update changes nothing.
        assert_eq!(merge(&current, &LinuxResources::default()), current);
    }

    #[test]
    fn what_fits_the_vm_passes() {
        fits(
            &res(r#"{"memory":{"limit":314572800},"cpu":{"cpus":"5,7","quota":200000,"period":100000}}"#),
            VM,
        )
        .unwrap();
        // No limit, or an unlimited one, always fits.
        fits(&res(r#"{"memory":{"limit":-1},"cpu":{"quota":-1}}"#), VM).unwrap();
        fits(&LinuxResources::default(), VM).unwrap();
    }

    #[test]
    fn what_would_grow_the_vm_is_refused_naming_the_limit() {
        let e = fits(&res(r#"{"memory":{"limit":1073741824}}"#), VM).unwrap_err();
        assert!(
            e.starts_with("linux.resources.memory.limit: 1024 MiB") && e.contains("300 MiB"),
            "{e}"
        );
        let e = fits(&res(r#"{"cpu":{"cpus":"0-3"}}"#), VM).unwrap_err();
        assert!(
            e.starts_with("linux.resources.cpu.cpus")
                && e.contains("4 CPUs")
                && e.contains("2 vCPUs"),
            "{e}"
        );
        let e = fits(&res(r#"{"cpu":{"quota":300000,"period":100000}}"#), VM).unwrap_err();
        assert!(
            e.starts_with("linux.resources.cpu.quota") && e.contains("3 CPUs"),
            "{e}"
        );
        let e = fits(&res(r#"{"cpu":{"cpus":"1-0"}}"#), VM).unwrap_err();
        assert!(e.contains("not a CPU list"), "{e}");
    }
}
