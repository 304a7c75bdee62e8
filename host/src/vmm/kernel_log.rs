//! The guest kernel's log (what `dmesg` shows), read out of guest memory once the VM has
//! stopped: the printk ring buffer of Linux 6.1 (`kernel/printk/printk_ringbuffer.h`), found
//! through the kernel's `prb` pointer, whose address comes from `System.map`.
//!
//! Why not the serial console: on kvm_pvm hosts every byte the guest kernel writes to the 8250
//! costs about a third of a millisecond, and it is written synchronously by whoever called
//! printk. An `initcall_debug` boot prints ~40 KB: ~15 s of console output lands in the very
//! gaps between initcalls that it is meant to measure. Read afterwards, the guest pays only for
//! formatting each record into memory.
//!
//! The layout read here is the 6.1 kernel's on x86-64 (`kernel-config/VERSION`); a kernel whose
//! ring buffer differs fails the sanity checks below rather than yielding garbage.

/// Where the kernel image's virtual addresses start (`__START_KERNEL_map`). The VMM loads
/// `vmlinux` at its link address and the kernel is built without relocation (no KASLR), so an
/// image address is this much above its physical address.
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// The direct map of physical memory (`PAGE_OFFSET` with 4-level paging and no memory-layout
/// randomization): where memblock allocations live, such as a log buffer enlarged with
/// `log_buf_len=`.
const PAGE_OFFSET: u64 = 0xffff_8880_0000_0000;
/// The direct map's size with 4-level paging (64 TiB).
const DIRECT_MAP_SIZE: u64 = 64 << 40;

/// `sizeof(struct printk_ringbuffer)`.
const RINGBUFFER_SIZE: usize = 88;
/// `sizeof(struct prb_desc)`: `state_var`, `text_blk_lpos.begin`, `text_blk_lpos.next`.
const DESC_SIZE: usize = 24;
/// `sizeof(struct printk_info)`: seq, ts_nsec, text_len, facility, flags:5 + level:3,
/// caller_id, then `struct dev_printk_info` (16 + 48 bytes).
const INFO_SIZE: usize = 88;
/// Descriptor states (the top two bits of `state_var`) whose record is complete.
const DESC_COMMITTED: u64 = 1;
const DESC_FINALIZED: u64 = 2;
/// Larger rings than these are not a printk buffer we know (the default here is 128 KiB of text
/// and 4096 descriptors; `log_buf_len=` can raise both).
const MAX_COUNT_BITS: u32 = 22;
const MAX_SIZE_BITS: u32 = 28;

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number (0 for the first message since boot).
    pub seq: u64,
    /// The kernel's clock when it was logged (`local_clock()`), in ns.
    pub ts_nsec: u64,
    /// Syslog level (7 = debug).
    pub level: u8,
    /// The message, without a trailing newline.
    pub text: String,
}

/// The address of `name` in a `System.map` ("ADDRESS TYPE NAME" lines).
pub fn symbol(system_map: &str, name: &str) -> Option<u64> {
    system_map.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (addr, _kind, sym) = (f.next()?, f.next()?, f.next()?);
        (sym == name)
            .then(|| u64::from_str_radix(addr, 16).ok())
            .flatten()
    })
}

/// The guest-physical address of a kernel virtual address (image or direct map).
fn phys(virt: u64) -> Result<u64, String> {
    if virt >= START_KERNEL_MAP {
        Ok(virt - START_KERNEL_MAP)
    } else if (PAGE_OFFSET..PAGE_OFFSET + DIRECT_MAP_SIZE).contains(&virt) {
        Ok(virt - PAGE_OFFSET)
    } else {
        Err(format!(
            "{virt:#x} is neither in the kernel image nor in the direct map"
        ))
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

/// Reads every complete record of the ring buffer that `prb` (the address of the kernel's
/// `prb` variable) points to, in sequence order. `read` fills a buffer from guest-physical
/// memory. The guest must not be running. If the ring has wrapped, the oldest records are
/// gone and the first one returned has a sequence number above 0.
pub fn read(read: &super::running::ReadGuest<'_>, prb: u64) -> Result<Vec<Record>, String> {
    let fetch = |virt: u64, len: usize| -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; len];
        read(phys(virt)?, &mut buf)
            .map_err(|e| format!("reading {len} bytes at {virt:#x}: {e}"))?;
        Ok(buf)
    };
    let rb_addr = u64_at(&fetch(prb, 8)?, 0);
    let rb = fetch(rb_addr, RINGBUFFER_SIZE)?;
    let count_bits = u32_at(&rb, 0);
    let (descs_addr, infos_addr) = (u64_at(&rb, 8), u64_at(&rb, 16));
    let size_bits = u32_at(&rb, 48);
    let data_addr = u64_at(&rb, 56);
    if count_bits == 0 || count_bits > MAX_COUNT_BITS || size_bits == 0 || size_bits > MAX_SIZE_BITS
    {
        return Err(format!(
            "not a printk ring buffer at {rb_addr:#x} (count_bits {count_bits}, size_bits \
             {size_bits}): is System.map from this vmlinux, and is it Linux 6.1?"
        ));
    }
    let count = 1usize << count_bits;
    let size = 1u64 << size_bits;
    let descs = fetch(descs_addr, count * DESC_SIZE)?;
    let infos = fetch(infos_addr, count * INFO_SIZE)?;
    let data = fetch(data_addr, 1usize << size_bits)?;

    let mut records = Vec::new();
    for i in 0..count {
        let d = &descs[i * DESC_SIZE..(i + 1) * DESC_SIZE];
        let state = u64_at(d, 0) >> 62;
        if state != DESC_COMMITTED && state != DESC_FINALIZED {
            continue;
        }
        let info = &infos[i * INFO_SIZE..(i + 1) * INFO_SIZE];
        let text_len = usize::from(u16::from_le_bytes([info[16], info[17]]));
        let text = block_text(&data, size, u64_at(d, 8), u64_at(d, 16))
            .map(|t| String::from_utf8_lossy(&t[..text_len.min(t.len())]).into_owned())
            .unwrap_or_default();
        records.push(Record {
            seq: u64_at(info, 0),
            ts_nsec: u64_at(info, 8),
            level: info[19] >> 5,
            text,
        });
    }
    records.sort_by_key(|r| r.seq);
    Ok(records)
}

/// A data block's text (after its 8-byte descriptor id), as `get_data()` finds it: in place,
/// or at the start of the ring when the block wrapped. `None` for a data-less or invalid block.
fn block_text(data: &[u8], size: u64, begin: u64, next: u64) -> Option<&[u8]> {
    let index = |lpos: u64| usize::try_from(lpos & (size - 1)).ok();
    let wraps = |lpos: u64| lpos / size;
    if begin & 1 == 1 && next & 1 == 1 {
        return None;
    }
    let (start, len) = if wraps(begin) == wraps(next) && begin < next {
        (index(begin)?, usize::try_from(next - begin).ok()?)
    } else if wraps(begin + size) == wraps(next) {
        (0, index(next)?)
    } else {
        return None;
    };
    data.get(start + 8..start + len)
}

/// The records as `dmesg` prints them: `[seconds.micros] text`, one a line.
pub fn format(records: &[Record]) -> String {
    let mut out = String::new();
    for r in records {
        let us = r.ts_nsec / 1000;
        out.push_str(&format!(
            "[{:5}.{:06}] {}\n",
            us / 1_000_000,
            us % 1_000_000,
            r.text
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake guest: a ring of 4 descriptors and 128 bytes of text, laid out as the kernel does
    /// in its image (`prb` -> ring buffer struct -> arrays), at physical address 0.
    struct Guest {
        mem: Vec<u8>,
    }

    const PRB: u64 = START_KERNEL_MAP + 0x100;
    const RB: u64 = 0x200;
    const DESCS: u64 = 0x400;
    const INFOS: u64 = 0x600;
    const DATA: u64 = 0x1000;
    const SIZE: u64 = 128;

    impl Guest {
        fn new() -> Guest {
            let mut g = Guest {
                mem: vec![0; 0x2000],
            };
            g.put(0x100, &(START_KERNEL_MAP + RB).to_le_bytes());
            g.put(RB, &2u32.to_le_bytes()); // count_bits
            // Descriptors in the direct map, to check that both kinds of address work.
            g.put(RB + 8, &(PAGE_OFFSET + DESCS).to_le_bytes());
            g.put(RB + 16, &(START_KERNEL_MAP + INFOS).to_le_bytes());
            g.put(RB + 48, &7u32.to_le_bytes()); // size_bits: 128 bytes
            g.put(RB + 56, &(START_KERNEL_MAP + DATA).to_le_bytes());
            // Every descriptor reusable until written.
            for i in 0..4 {
                g.put(DESCS + i * 24, &(3u64 << 62).to_le_bytes());
            }
            g
        }

        fn put(&mut self, at: u64, bytes: &[u8]) {
            let at = usize::try_from(at).unwrap();
            self.mem[at..at + bytes.len()].copy_from_slice(bytes);
        }

        /// Stores record `seq` in descriptor `seq % 4`, its text block at [begin, next).
        fn record(&mut self, seq: u64, ts: u64, text: &str, begin: u64, next: u64, state: u64) {
            let i = seq % 4;
            self.put(DESCS + i * 24, &((state << 62) | seq).to_le_bytes());
            self.put(DESCS + i * 24 + 8, &begin.to_le_bytes());
            self.put(DESCS + i * 24 + 16, &next.to_le_bytes());
            let info = INFOS + i * 88;
            self.put(info, &seq.to_le_bytes());
            self.put(info + 8, &ts.to_le_bytes());
            self.put(info + 16, &u16::try_from(text.len()).unwrap().to_le_bytes());
            self.put(info + 19, &[(7 << 5) | 0b00100]);
            if begin & 1 == 1 {
                return; // data-less: no text block
            }
            let start = if begin / SIZE == next / SIZE {
                begin % SIZE
            } else {
                0
            };
            self.put(DATA + start, &seq.to_le_bytes());
            self.put(DATA + start + 8, text.as_bytes());
        }

        fn read(&self) -> Result<Vec<Record>, String> {
            let reader = |addr: u64, buf: &mut [u8]| -> Result<(), String> {
                let at = usize::try_from(addr).map_err(|e| e.to_string())?;
                let src = self
                    .mem
                    .get(at..at + buf.len())
                    .ok_or_else(|| format!("{addr:#x} out of range"))?;
                buf.copy_from_slice(src);
                Ok(())
            };
            read(&reader, PRB)
        }
    }

    #[test]
    fn reads_records_in_sequence_order_with_a_wrapped_block() {
        let mut g = Guest::new();
        // Ring positions: seq 1 [40, 64), seq 2 [64, 96) committed, seq 3 wraps: it begins at
        // 96 and would end exactly at the ring's end, which the kernel's data_alloc() counts as
        // wrapping, so its text is stored from 0 in the next wrap, up to 128 + 32.
        g.record(1, 2_000_000_000, "second", 40, 64, DESC_FINALIZED);
        g.record(2, 2_500_123_000, "third!", 64, 96, DESC_COMMITTED);
        g.record(
            3,
            3_000_000_000,
            "fourth wraps",
            96,
            128 + 32,
            DESC_FINALIZED,
        );
        // Seq 0's descriptor was recycled for seq 4, which is still being written.
        g.record(4, 4_000_000_000, "", 1, 1, 0);
        let records = g.read().unwrap();
        let texts: Vec<_> = records.iter().map(|r| (r.seq, r.text.as_str())).collect();
        assert_eq!(
            texts,
            [(1, "second"), (2, "third!"), (3, "fourth wraps")],
            "{records:?}"
        );
        assert_eq!(records[0].level, 7);
        assert_eq!(
            format(&records[1..2]),
            "[    2.500123] third!\n",
            "dmesg's format"
        );
    }

    #[test]
    fn a_data_less_record_has_empty_text() {
        let mut g = Guest::new();
        g.record(0, 5, "", 3, 3, DESC_FINALIZED);
        assert_eq!(g.read().unwrap()[0].text, "");
    }

    #[test]
    fn refuses_what_is_not_a_ring_buffer() {
        let mut g = Guest::new();
        g.put(RB, &40u32.to_le_bytes());
        let err = g.read().unwrap_err();
        assert!(err.contains("not a printk ring buffer"), "{err}");
        let mut g = Guest::new();
        g.put(0x100, &0x1234u64.to_le_bytes());
        let err = g.read().unwrap_err();
        assert!(err.contains("neither in the kernel image"), "{err}");
    }

    #[test]
    fn finds_a_symbol_in_system_map() {
        let map = "ffffffff81c24de0 d something\nffffffff81c24df0 d prb\n\
                   ffffffff81c24e00 d printk_rb_static\n";
        assert_eq!(symbol(map, "prb"), Some(0xffff_ffff_81c2_4df0));
        assert_eq!(symbol(map, "pr"), None);
    }
}
