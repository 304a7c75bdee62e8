//! What the guest's CPU gives its processes: one process must not see another's registers.
//!
//! On kvm_pvm hosts guest user code sees the host's CPUID and XCR0 (AVX, AVX-512), while the
//! guest kernel, booted with `noxsave` there, switches only the x87/SSE state: the upper halves
//! of the vector registers pass from one process to the next. glibc's AVX `memcpy` then copied
//! other processes' bytes and fresh busybox processes died of SIGSEGV. husk keeps glibc and Go
//! off AVX there (`GLIBC_TUNABLES`/`GODEBUG` from the kernel command line, which husk-init
//! merges into every process's environment: `guest-init/src/container/host_env.rs`); code
//! that uses AVX by itself still can see the registers, which the probe
//! (`tests/guest-probes/vector_registers.c`, built static here) measures. Where the guest
//! kernel switches the AVX state (real KVM) the probe must find nothing.

use std::path::Path;
use std::process::Command;

use husk_e2e::{TempDir, busybox_bundle, guest_image, husk, is_root, kvm_available, skip};

/// Builds the probe, static, into `dir`.
fn build_probe(dir: &Path) -> Option<std::path::PathBuf> {
    let source = husk_e2e::workspace_root().join("tests/guest-probes/vector_registers.c");
    let out = dir.join("vector_registers");
    let built = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&out)
        .arg(&source)
        .output();
    match built {
        Ok(o) if o.status.success() => Some(out),
        Ok(o) => panic!(
            "cc -static {}: {}",
            source.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => skip(&format!("needs a C compiler (cc) for the guest probe: {e}")),
    }
}

#[test]
fn guest_processes_do_not_share_vector_registers() {
    if guest_image().is_none() {
        return;
    }
    if !kvm_available() || !is_root() {
        skip::<()>("needs /dev/kvm and root");
        return;
    }
    let tmp = TempDir::new("guest-cpu");
    let root = tmp.path().join("state");
    let _cleanup = husk_e2e::ContainerRoot(root.clone());
    let Some(probe) = build_probe(tmp.path()) else {
        return;
    };
    let script = "echo \"tunables=$GLIBC_TUNABLES\"; echo \"godebug=$GODEBUG\"; \
                  /bin/vector_registers";
    let Some(bundle) = busybox_bundle(&tmp.path().join("b"), &["sh", "-c", script]) else {
        return;
    };
    std::fs::copy(&probe, bundle.join("rootfs/bin/vector_registers")).unwrap();
    // A tunable of the spec's own, which husk-init's additions must keep.
    let cfg = bundle.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push("GLIBC_TUNABLES=glibc.malloc.check=0".into());
    std::fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
    let (code, out, err) = husk(
        &root,
        &["run", "--bundle", bundle.to_str().unwrap(), "vecregs"],
    );
    println!("{out}");
    let line = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in:\n{out}\n{err}"))
            .to_string()
    };
    let tunables = line("tunables=");
    assert!(tunables.starts_with("glibc.malloc.check=0"), "{tunables}");
    if husk_e2e::host_is_kvm_pvm() {
        // The AVX state is not switched here: glibc and Go are kept off it.
        assert!(
            tunables.contains(":glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F"),
            "{tunables}"
        );
        assert!(line("godebug=").contains("cpu.avx=off"), "{out}");
        println!(
            "kvm_pvm: code using AVX by itself still sees other processes' registers (exit {code})"
        );
        return;
    }
    assert_eq!(tunables, "glibc.malloc.check=0", "{out}");
    assert_eq!(
        code, 0,
        "the probe saw another process's registers:\n{out}\n{err}"
    );
    // Where user space has AVX state, both processes checked their patterns.
    let xcr0 = line("xcr0 ");
    if u32::from_str_radix(&xcr0, 16).is_ok_and(|x| x & 6 == 6) {
        assert_eq!(out.matches("corrupt 0 of").count(), 2, "{out}");
    }
}
