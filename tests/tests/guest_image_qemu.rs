//! The guest image boots in QEMU (an independent reference VMM): under KVM on this machine
//! (with the kvm_pvm compatibility set where the host needs it) and under TCG. husk-init must
//! come up as PID 1, find no host to talk to (QEMU gets no vsock device here), say so on the
//! console and power the VM off cleanly.

use std::process::Command;
use std::time::Duration;

use husk_e2e::{
    GuestImage, guest_image, host_is_kvm_pvm, kernel_params, kvm_available, run_with_timeout, skip,
};

/// The line husk-init logs when no host answers (see guest-init/src/server.rs).
const NO_HOST_LINE: &str = "husk-init: no host to talk to at vsock cid 2 port 1024";

/// Kernel parameters only the TCG runs need.
const TCG_PARAMS: &str = "tsc_early_khz=2000000 lpj=4000000";

fn qemu() -> Option<&'static str> {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        Some("qemu-system-x86_64")
    } else {
        skip("qemu-system-x86_64 not installed (apt-get install -y qemu-system-x86)")
    }
}

/// Boots the image; returns the console output and the wall time.
fn boot(
    qemu: &str,
    image: &GuestImage,
    accel: &str,
    cpu: &str,
    extra_params: &str,
) -> (String, Duration) {
    let cmdline = format!(
        "console=ttyS0 quiet {} {extra_params}",
        kernel_params("cmdline")
    );
    let mut cmd = Command::new(qemu);
    cmd.args(["-M", "microvm,rtc=off,pic=on,pit=on,isa-serial=on"])
        .args(["-accel", accel, "-cpu", cpu, "-m", "256", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        // the i8042 is how the guest's `reboot=k` ends the VM
        .args(["-device", "i8042", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&image.vmlinux)
        .arg("-initrd")
        .arg(&image.initramfs)
        .args(["-append", &cmdline]);
    let outcome = run_with_timeout(cmd, Duration::from_secs(180)).expect("spawning qemu");
    assert!(
        !outcome.timed_out,
        "{accel} boot did not finish within 180 s; console:\n{}",
        outcome.output
    );
    assert_eq!(
        outcome.code,
        Some(0),
        "{accel}: qemu did not exit cleanly; console:\n{}",
        outcome.output
    );
    assert!(
        outcome.output.contains(NO_HOST_LINE),
        "{accel}: husk-init's line is missing; console:\n{}",
        outcome.output
    );
    assert!(
        outcome.output.contains("reboot: Restarting system")
            && !outcome.output.contains("Kernel panic"),
        "{accel}: the guest did not power off cleanly; console:\n{}",
        outcome.output
    );
    (outcome.output, outcome.wall)
}

#[test]
fn boots_under_tcg() {
    let (Some(qemu), Some(image)) = (qemu(), guest_image()) else {
        return;
    };
    // Without KVM the kernel calibrates the TSC against the PIT, which under TCG sometimes
    // never finishes; giving the TSC frequency and loops-per-jiffy up front skips both
    // calibrations (see kernel-config/README.md).
    let (_, wall) = boot(qemu, &image, "tcg", "max", TCG_PARAMS);
    println!(
        "TCG: QEMU start to power-off in {:.2} s",
        wall.as_secs_f64()
    );
}

#[test]
fn boots_under_kvm() {
    let (Some(qemu), Some(image)) = (qemu(), guest_image()) else {
        return;
    };
    if !kvm_available() {
        skip::<()>("/dev/kvm is not available (needs KVM and root or the kvm group)");
        return;
    }
    let (cpu, params) = if host_is_kvm_pvm() {
        // kvm_pvm refuses QEMU's write of IA32_ARCH_CAPABILITIES (MSR 0x10a) as of
        // 2026-12-02: QEMU then aborts before the guest runs.
        (
            "host,-cx16,-popcnt,-arch-capabilities",
            kernel_params("cmdline-kvm-pvm"),
        )
    } else {
        ("host", String::new())
    };
    let (_, wall) = boot(qemu, &image, "kvm", cpu, &params);
    println!(
        "KVM{}: QEMU start to power-off in {:.2} s",
        if host_is_kvm_pvm() { " (kvm_pvm)" } else { "" },
        wall.as_secs_f64()
    );
}
