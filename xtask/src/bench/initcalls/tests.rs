//! The log parser and the breakdown, on kernel log lines written out in the tests.

use super::*;

/// A boot's log in miniature: the clock loses 2 s between "Calibrating delay loop" (8 s)
/// and the clocksource switch (9 s on the log's clock, 11 s in truth).
const LOG: &str = "\
[    0.000000] Linux version 6.1.192
[    0.000000] kvm-clock: using sched offset of 677606826 cycles
[    0.656681] RAMDISK: [mem 0x0fcf0000-0x0fffffff]
[    2.670187] On node 0, zone DMA32: 97 pages in unavailable ranges
[    8.000000] Calibrating delay loop (skipped) preset value.. 5192.19 BogoMIPS (lpj=25960960)
[    8.200000] calling  init_hw_perf_events+0x0/0x675 @ 1
[    8.210000] initcall init_hw_perf_events+0x0/0x675 returned 0 after 10000 usecs
[    9.000000] clocksource: Switched to clocksource kvm-clock
[    9.100000] calling  populate_rootfs+0x0/0x37 @ 1
[    9.110000] Unpacking initramfs...
[   11.000000] Freeing initrd memory: 3136K
[   11.100000] initcall populate_rootfs+0x0/0x37 returned 0 after 1990000 usecs
[   11.200000] calling  sched_clock_init_late+0x0/0x7a @ 1
[   11.200100] sched_clock: Marking stable (9000000000, 1000000000)->(12000000000, -2000000000)
[   11.200200] initcall sched_clock_init_late+0x0/0x7a returned 0 after 100 usecs
[   12.000000] Write protecting the kernel read-only data: 12288k
[   15.000000] Freeing unused kernel image (text/rodata gap) memory: 2044K
[   15.500000] Run /init as init process
[   15.510000]   with arguments:
";

fn close(a: Option<f64>, e: f64) {
    let a = a.unwrap();
    assert!((a - e).abs() < 1e-6, "{a} != {e}");
}

#[test]
fn breaks_a_log_down_with_the_clocks_loss_put_back() {
    let b = analyze(&parse_log(LOG));
    close(b.before_clock, 677.606826);
    close(b.clock_lost, 2000.0);
    close(b.calibrate, 8000.0);
    // A fifth into the window: a fifth of the loss.
    close(b.first_initcall, 8600.0);
    close(b.switch, 11000.0);
    close(b.last_initcall_end, 13200.2);
    close(b.run_init, 17500.0);
    close(b.unpack_start, 11110.0);
    close(b.unpack_end, 13000.0);
    // The window is 3 s long where the log says 1 s: what was timed inside it, times 3.
    close(Some(b.in_initcalls), 3.0 * 10.0 + 1990.0 + 0.1);
    assert!(b.initcalls["init_hw_perf_events"].on_jiffies);
    close(Some(b.initcalls["init_hw_perf_events"].measured), 10.0);
    close(Some(b.initcalls["init_hw_perf_events"].ms), 30.0);
    assert!(!b.initcalls["populate_rootfs"].on_jiffies);
    close(Some(b.initcalls["populate_rootfs"].ms), 1990.0);
    let gap = |prefix: &str| b.gaps.iter().find(|g| g.label.starts_with(prefix));
    let g = gap("On node 0").unwrap();
    close(Some(g.ms), 8000.0 - 2670.187);
    assert!(!g.estimated);
    let g = gap("initcall init_hw_perf_events").unwrap();
    close(Some(g.ms), 11000.0 - (8210.0 + 420.0));
    assert!(g.estimated);
    assert!(!gap("clocksource: Switched").unwrap().estimated);
    close(gap("Write protecting").map(|g| g.ms), 3000.0);
    // Messages inside an initcall are the initcall's time, not gaps.
    assert!(gap("Unpacking").is_none() && gap("Freeing initrd").is_none());
    assert!(gap("calling  populate_rootfs").is_none());
    // The gap up to "Run /init" counts, what follows is husk-init's.
    assert!(gap("Freeing unused kernel image").is_some());
    assert!(gap("Run /init").is_none());
}

#[test]
fn without_the_clocks_message_nothing_is_corrected() {
    let log: String = LOG
        .lines()
        .filter(|l| !l.contains("Marking stable"))
        .map(|l| format!("{l}\n"))
        .collect();
    let b = analyze(&parse_log(&log));
    assert_eq!(b.clock_lost, None);
    close(b.run_init, 15500.0);
    assert!(!b.initcalls["init_hw_perf_events"].on_jiffies);
}

#[test]
fn reports_phases_that_add_up() {
    let boot = |init_started: f64| Boot {
        init_started,
        first_entry: Some(60.0),
        log: parse_log(LOG),
    };
    let r = report(
        &[boot(20_000.0)],
        &[boot(19_000.0), boot(21_000.0)],
        3 << 20,
    );
    assert!(r.contains("medians of 2 boots"), "{r}");
    assert!(r.contains("3.00 MiB"), "{r}");
    assert!(
        r.contains("30.0~ init_hw_perf_events (measured 10.0)"),
        "{r}"
    );
    let row = |name: &str| -> Vec<String> {
        let line = r.lines().find(|l| l.starts_with(name)).unwrap();
        line[58..].split_whitespace().map(String::from).collect()
    };
    assert_eq!(row("first vCPU entry ->"), ["617.6", "617.6"]);
    assert_eq!(row("sched_clock_init ->"), ["3000.0", "3000.0"]);
    assert_eq!(row("clocksource switch ->"), ["6500.0", "6500.0"]);
    // 20 000 - 677.6 - 17 500
    assert_eq!(row("\"Run /init\" ->"), ["1822.4", "1822.4"]);
    assert_eq!(row("total"), ["20000.0", "20000.0"]);
    // The pieces add up to the total: 60 + 617.6 + 8000 + 3000 + 6500 + 1822.4.
    assert_eq!(row("kernel clock 0 ->"), ["8000.0", "8000.0"]);
}

#[test]
fn parses_initcall_lines() {
    assert_eq!(
        initcall_start("calling  populate_rootfs+0x0/0x37 @ 1"),
        Some("populate_rootfs")
    );
    assert_eq!(
        initcall_end("initcall tcp_congestion_default+0x0/0x13 returned 0 after 126 usecs"),
        Some(("tcp_congestion_default", 0.126))
    );
    assert_eq!(initcall_end("initcall_debug enabled"), None);
}
