//! KVM tests with tiny hand-assembled guests, booted through the real path ([`super::start`]):
//! each guest is wrapped in a minimal ELF file so the loader, boot tables, buses and exit
//! handling are all exercised. They need `/dev/kvm` and say so when they skip.

use std::time::Duration;

use husk_proto::marker::Marker;

use super::{SeccompMode, VmConfig, VmExit};

/// A minimal ELF64 executable with one PT_LOAD segment holding `code` at physical (and
/// virtual) address `addr`, entry at its start.
fn elf(code: &[u8], addr: u64) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV ABI
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&addr.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    let offset = 0x1000u64;
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    f.extend_from_slice(&offset.to_le_bytes());
    f.extend_from_slice(&addr.to_le_bytes()); // vaddr
    f.extend_from_slice(&addr.to_le_bytes()); // paddr
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&0x1000u64.to_le_bytes());
    f.resize(usize::try_from(offset).unwrap(), 0);
    f.extend_from_slice(code);
    f
}

/// `mov dx, 0x3f0; mov al, VALUE; out dx, al` (the boot-marker port).
fn marker(value: u8) -> Vec<u8> {
    vec![0x66, 0xba, 0xf0, 0x03, 0xb0, value, 0xee]
}

/// Boots `code` with 1 vCPU and 32 MiB; returns why it ended and the markers it wrote.
fn boot(
    code: &[u8],
    timeout: Duration,
    seccomp: SeccompMode,
) -> Option<(VmExit, Vec<Result<Marker, u8>>)> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm not available");
        return None;
    }
    let dir = std::env::temp_dir().join(format!(
        "husk-tiny-{}-{}",
        std::process::id(),
        code.iter().map(|b| u32::from(*b)).sum::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, elf(code, 0x10_0000)).unwrap();
    let config = VmConfig {
        kernel,
        initrd: None,
        cmdline_extra: String::new(),
        mem_mib: 32,
        vcpus: 1,
        console: false,
        seccomp,
        vsock: None,
        shares: vec![],
        nets: vec![],
        spare_nets: 0,
        kvm: None,
    };
    let vm = super::start(&config, std::time::Instant::now()).unwrap();
    let (why, timeline) = vm.wait(Some(timeout));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(timeline.first_entry.is_some());
    Some((why, timeline.markers.into_iter().map(|(_, m)| m).collect()))
}

#[test]
fn markers_are_recorded_and_power_off_ends_the_vm() {
    let mut code = marker(Marker::InitStarted as u8);
    code.extend(marker(0x77));
    code.extend(marker(Marker::PowerOff as u8));
    code.extend([0xeb, 0xfe]); // jmp $: only the marker may end it
    // With the vCPU and vmm threads confined: they must do all of this within their filters.
    let Some((why, markers)) = boot(&code, Duration::from_secs(30), SeccompMode::Enforce) else {
        return;
    };
    assert_eq!(why, VmExit::PowerOff);
    assert_eq!(
        markers,
        vec![Ok(Marker::InitStarted), Err(0x77), Ok(Marker::PowerOff)]
    );
}

#[test]
fn i8042_reset_ends_the_vm() {
    // mov al, 0xfe; out 0x64, al; jmp $
    let code = [0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe];
    let Some((why, _)) = boot(&code, Duration::from_secs(30), SeccompMode::Off) else {
        return;
    };
    assert_eq!(why, VmExit::Reset);
}

#[test]
fn accesses_to_nothing_are_survived() {
    // mov eax, 0x3000000 (past the 32 MiB of RAM, inside the identity map); mov dword [rax], 1;
    // mov ebx, [rax]; in al, 0x80; then power off.
    let mut code = vec![
        0xb8, 0x00, 0x00, 0x00, 0x03, 0xc7, 0x00, 0x01, 0x00, 0x00, 0x00, 0x8b, 0x18, 0xe4, 0x80,
    ];
    code.extend(marker(Marker::PowerOff as u8));
    code.extend([0xeb, 0xfe]);
    let Some((why, _)) = boot(&code, Duration::from_secs(30), SeccompMode::Off) else {
        return;
    };
    assert_eq!(why, VmExit::PowerOff);
}

#[test]
fn a_triple_fault_is_a_reset() {
    // ud2 with an empty IDT: #UD -> #DF -> triple fault.
    let Some((why, _)) = boot(&[0x0f, 0x0b], Duration::from_secs(30), SeccompMode::Off) else {
        return;
    };
    assert_eq!(why, VmExit::Reset);
}

#[test]
fn a_spinning_guest_is_stopped_at_the_timeout() {
    let Some((why, _)) = boot(&[0xeb, 0xfe], Duration::from_millis(500), SeccompMode::Off) else {
        return;
    };
    assert!(
        matches!(why, VmExit::Error(ref e) if e.contains("did not finish")),
        "{why:?}"
    );
}

/// The tiny guest of the snapshot tests: marker 0x71, `ebx = 0x5a`, then it spins until the
/// byte at 2 MiB is non-zero, writes `bl` as a marker and powers off.
fn spinning_guest() -> Vec<u8> {
    let mut code = marker(0x71);
    code.extend([0xbb, 0x5a, 0x00, 0x00, 0x00]); // mov ebx, 0x5a
    code.extend([0x80, 0x3c, 0x25, 0x00, 0x00, 0x20, 0x00, 0x00]); // cmp byte [0x200000], 0
    code.extend([0x74, 0xf6]); // je back to the cmp
    code.extend([0x88, 0xd8, 0xee]); // mov al, bl; out dx, al
    code.extend(marker(Marker::PowerOff as u8));
    code.extend([0xeb, 0xfe]);
    code
}

/// A VM of `spinning_guest` with 1 vCPU and 32 MiB, in a fresh directory.
fn spinning_config(dir: &std::path::Path) -> VmConfig {
    std::fs::create_dir_all(dir).unwrap();
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, elf(&spinning_guest(), 0x10_0000)).unwrap();
    VmConfig {
        kernel,
        initrd: None,
        cmdline_extra: String::new(),
        mem_mib: 32,
        vcpus: 1,
        console: false,
        seccomp: SeccompMode::Enforce,
        vsock: None,
        shares: vec![],
        nets: vec![],
        spare_nets: 0,
        kvm: None,
    }
}

/// Waits until `vm` has written `byte` to the marker port.
fn wait_for_marker(vm: &super::RunningVm, byte: u8) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen = super::threads::lock(&vm.markers)
            .entries
            .iter()
            .any(|(_, m)| m.map_or_else(|b| b, |m| m as u8) == byte);
        if seen {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no marker {byte:#x}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_snapshot_restores_into_a_new_vm_that_goes_on_where_it_stopped() {
    use vm_memory::{Bytes, GuestAddress};

    use super::persist::{MEMORY_FILE, Snapshot, SnapshotError};

    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm not available");
        return;
    }
    let dir = std::env::temp_dir().join(format!("husk-snap-{}", std::process::id()));
    let config = spinning_config(&dir);
    let vm = super::start(&config, std::time::Instant::now()).unwrap();
    wait_for_marker(&vm, 0x71);
    let saved = dir.join("snapshot");
    std::fs::create_dir(&saved).unwrap();
    vm.snapshot(&saved).unwrap();
    vm.stop();
    let (why, _) = vm.wait(Some(Duration::from_secs(10)));
    assert_eq!(why, VmExit::Stopped);

    // Another shape is refused.
    let snapshot = Snapshot::open(&saved).unwrap();
    let bigger = VmConfig {
        mem_mib: 64,
        ..config.clone()
    };
    let err = super::restore(&bigger, &snapshot, std::time::Instant::now()).unwrap_err();
    assert!(
        matches!(err, super::VmError::Snapshot(SnapshotError::Shape { .. })),
        "{err}"
    );

    // The same shape goes on in the loop, with its registers: the marker it writes is ebx.
    let vm = super::restore(&config, &snapshot, std::time::Instant::now()).unwrap();
    assert_eq!(vm.mem.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 0);
    vm.mem.write_obj(1u8, GuestAddress(0x20_0000)).unwrap();
    let (why, timeline) = vm.wait(Some(Duration::from_secs(30)));
    assert_eq!(why, VmExit::PowerOff);
    let markers: Vec<_> = timeline.markers.into_iter().map(|(_, m)| m).collect();
    assert_eq!(markers, vec![Err(0x5a), Ok(Marker::PowerOff)]);

    // The restored VM's write stayed in its private copy; and a memory file changed after
    // the snapshot is refused.
    drop(snapshot);
    let snapshot = Snapshot::open(&saved).unwrap();
    let mut byte = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&snapshot.memory, &mut byte, 0x20_0000).unwrap();
    assert_eq!(byte, [0]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(saved.join(MEMORY_FILE))
        .unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(saved.join(MEMORY_FILE))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0], 0x10_0000).unwrap();
    drop(file);
    let err = Snapshot::open(&saved).unwrap_err();
    assert!(matches!(err, SnapshotError::MemoryChanged), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
