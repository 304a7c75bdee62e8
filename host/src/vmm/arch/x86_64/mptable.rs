//! The MP table (Intel MultiProcessor Specification 1.4) that tells a kernel without ACPI
//! about the vCPUs, the IO-APIC and how ISA interrupts are wired. Placed at the start of the
//! EBDA (639 KiB), one of the places Linux scans for the `_MP_` floating pointer.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{EBDA, IOAPIC, LAPIC};
use crate::vmm::vstate::memory::GuestMem;

/// IO-APIC inputs (and ISA IRQs routed to them one to one).
pub const IOAPIC_PINS: u8 = 24;

/// Errors writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than APIC ids below the IO-APIC's.
    #[error("{0} vCPUs do not fit an MP table (at most 254)")]
    TooManyCpus(u8),
    /// Guest memory too small or not writable there.
    #[error("writing the MP table at {EBDA:#x}: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

const MPC_SPEC_REV: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS: u8 = 0;

/// The bytes of the MP configuration table (header + entries) for `vcpus` CPUs.
fn config_table(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        entries.push(0); // processor entry
        entries.push(cpu); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, ISA_BUS]); // bus entry
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]); // IO-APIC, enabled
    entries.extend_from_slice(&u32::try_from(IOAPIC).unwrap_or(0).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // I/O interrupt: ISA irq N -> IO-APIC pin N, bus-default polarity/trigger.
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, ISA_BUS, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: LINT0 = ExtINT from the PIC, LINT1 = NMI, on every CPU (0xff).
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, ISA_BUS, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, ISA_BUS, 0, 0xff, 1]);
    count += 2;

    let length = u16::try_from(44 + entries.len()).unwrap_or(u16::MAX);
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"HUSK    "); // OEM id
    table.extend_from_slice(b"MICROVM     "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&u32::try_from(LAPIC).unwrap_or(0).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// The 16-byte floating pointer structure pointing at the table at `table_addr`.
fn floating_pointer(table_addr: u32) -> [u8; 16] {
    let mut fp = [0u8; 16];
    fp[..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = MPC_SPEC_REV;
    fp[10] = checksum(&fp);
    fp
}

/// The byte that makes the sum of `bytes` (with it in place of a zero) zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Writes the floating pointer and the table into the EBDA.
pub fn write(mem: &GuestMem, vcpus: u8) -> Result<(), MptableError> {
    if vcpus == 0 || vcpus > 254 {
        return Err(MptableError::TooManyCpus(vcpus));
    }
    let table_addr = EBDA + 16;
    let fp = floating_pointer(u32::try_from(table_addr).unwrap_or(0));
    mem.write_slice(&fp, GuestAddress(EBDA))?;
    mem.write_slice(&config_table(vcpus), GuestAddress(table_addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_are_right() {
        for vcpus in [1, 2, 8] {
            let t = config_table(vcpus);
            assert_eq!(sum(&t), 0);
            assert_eq!(&t[..4], b"PCMP");
            assert_eq!(usize::from(u16::from_le_bytes([t[4], t[5]])), t.len());
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count, u16::from(vcpus) + 2 + u16::from(IOAPIC_PINS) + 2);
            // Exactly one boot processor.
            let bsps = (0..usize::from(vcpus))
                .filter(|i| t[44 + i * 20 + 3] & CPU_BSP != 0)
                .count();
            assert_eq!(bsps, 1);
        }
        assert_eq!(sum(&floating_pointer(0x9fc10)), 0);
    }

    #[test]
    fn written_where_linux_scans() {
        let mem = crate::vmm::vstate::memory::create(2 << 20).unwrap();
        write(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(639 * 1024)).unwrap();
        assert_eq!(&sig, b"_MP_");
        assert!(matches!(write(&mem, 0), Err(MptableError::TooManyCpus(0))));
        assert!(
            16 + config_table(8).len() < 1024,
            "fits the EBDA's first KiB"
        );
    }
}
