//! The statistics, phase files, and what `density` reads of a process in /proc.

use std::time::{Duration, Instant};

use super::density::{cpu_ticks, guest_ram};
use super::phases::parse_phases;
use super::*;

#[test]
fn stats_use_nearest_rank_p90() {
    let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
    assert_eq!((s.min, s.median, s.p90), (1.0, 3.0, 5.0));
    let v: Vec<f64> = (1..=10).map(f64::from).collect();
    assert_eq!(Stats::of(&v).p90, 9.0);
    assert!(Stats::of(&[]).median.is_nan());
}

#[test]
fn phases_are_ms_since_cli_start_and_all_required() {
    let line = |p: &str, ns: u64| format!("{{\"phase\":\"{p}\",\"mono_ns\":{ns},\"pid\":1}}\n");
    let mut text = String::new();
    for (i, p) in PHASES_COLD.iter().enumerate() {
        text += &line(p, 1_000_000_000 + i as u64 * 1_500_000);
    }
    text += &line("start-returned", 1_000_000_000);
    let p = parse_phases(&text, &PHASES_COLD).unwrap();
    assert_eq!(p["cli-start"], 0.0);
    assert_eq!(p["cli-exit"], 16.0 * 1.5);
    let without: String = text
        .lines()
        .filter(|l| !l.contains("guest-shut-down"))
        .map(|l| format!("{l}\n"))
        .collect();
    let err = parse_phases(&without, &PHASES_COLD)
        .unwrap_err()
        .to_string();
    assert!(err.contains("guest-shut-down"), "{err}");
    // A run from a template has no kernel boot.
    let restored: String = text
        .lines()
        .filter(|l| !l.contains("init-started"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(parse_phases(&restored, &PHASES_TEMPLATE).is_ok());
    assert!(parse_phases(&restored, &PHASES_COLD).is_err());
    let twice = format!("{text}{}", line("vm-created", 5));
    assert!(
        parse_phases(&twice, &PHASES_COLD)
            .unwrap_err()
            .to_string()
            .contains("twice")
    );
    assert!(parse_phases("not json\n", &PHASES_COLD).is_err());
}

#[test]
fn cpu_ticks_of_a_process_that_works_grow() {
    let me = u64::from(std::process::id());
    let before = cpu_ticks(me).unwrap();
    // Spin until a tick is charged (a loaded machine may take a while to give us one).
    let start = Instant::now();
    let mut x = 0u64;
    while cpu_ticks(me).unwrap() == before {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no CPU time charged"
        );
        for _ in 0..1_000_000 {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }
}

#[test]
fn guest_ram_is_the_largest_anonymous_mapping() {
    // Our own process: map 256 MiB anonymous (larger than any other mapping of a test
    // process), touch 3 pages, find it.
    let len = 256 << 20;
    // SAFETY: a fresh private anonymous mapping, unmapped below; no aliasing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    for page in 0..3 {
        // SAFETY: inside the mapping just made.
        unsafe { *p.cast::<u8>().add(page * 4096) = 1 };
    }
    let (size, rss) = guest_ram(u64::from(std::process::id())).unwrap();
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(p, len) };
    assert_eq!(size, 256);
    // 3 pages, or more if transparent huge pages backed them.
    assert!((12..256 * 1024).contains(&rss), "rss {rss} KiB");
}
