//! Where things go in guest physical memory (x86-64), and the MMIO window for devices.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)          0x0000_0520  IDT (empty)
//! 0x0000_7000  boot_params ("zero page")
//! 0x0000_8ff0  boot stack top           0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (1 GiB identity)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0009_fc00  MP table (EBDA, last KiB below 640K)
//! 0x0010_0000  high memory: vmlinux is linked at 16 MiB; the initramfs goes at the top of low RAM
//! 0xd000_0000  virtio-mmio devices, 4 KiB each (inside the 32-bit gap, RAM never goes there)
//! 0xfec0_0000  IO-APIC                  0xfee0_0000  local APIC
//! ```

/// GDT location.
pub const BOOT_GDT: u64 = 0x500;
/// IDT location (an empty IDT: the kernel installs its own before enabling interrupts).
pub const BOOT_IDT: u64 = 0x520;
/// The Linux boot protocol's `boot_params`.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT: u64 = 0xa000;
/// Page directory (512 x 2 MiB = the first GiB, identity mapped).
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Longest command line we write (the kernel's COMMAND_LINE_SIZE is 2048 on x86).
pub const CMDLINE_MAX: usize = 2048;
/// The extended BIOS data area, where the MP table lives.
pub const EBDA: u64 = 0x9fc00;
/// Start of memory above the legacy hole (640 KiB - 1 MiB).
pub const HIGH_MEMORY: u64 = 0x10_0000;

/// The 32-bit MMIO gap: guest RAM skips [MMIO_GAP_START, 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// First GSI for virtio-mmio devices (0-4 are the timer, keyboard, cascade, serial ports).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The IO-APIC's MMIO address.
pub const IOAPIC: u64 = 0xfec0_0000;
/// The local APIC's MMIO address.
pub const LAPIC: u64 = 0xfee0_0000;
/// Where KVM puts the TSS (three pages just below the IO-APIC; Intel needs it).
pub const KVM_TSS: u64 = 0xfffb_d000;
/// KVM's identity-map page (one page below the TSS).
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;

/// The 16550 UART.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Its IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 controller's ports (data 0x60, command/status 0x64).
pub const I8042_PORT: u16 = 0x60;
