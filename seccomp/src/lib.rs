//! Per-thread seccomp filters of the husk monitor.
//!
//! Every thread of the monitor installs its own allowlist before it touches guest input
//! (DESIGN.md: a taken-over monitor must get nothing, every thread filtered):
//!
//! - the VMM's: [`ThreadKind::Vmm`] (the event loop: devices, vsock, virtio-fs, stdio),
//!   [`ThreadKind::Vcpu`] (one per vCPU: `KVM_RUN` and the port-I/O/MMIO exits it returns) and
//!   [`ThreadKind::VmWait`] (waits for the VM to end and tears it down: the monitor's
//!   `vm-wait` thread, and the main thread of `husk vm boot`);
//! - the monitor's own: [`ThreadKind::Monitor`] (its main thread once the VM runs: the
//!   session with husk-init, the commands' state machine, `state.json`),
//!   [`ThreadKind::Guest`] (decodes husk-init's frames), [`ThreadKind::Commands`] (the
//!   control socket's acceptor and a reader per connection) and [`ThreadKind::Relay`] (the
//!   container's stdio and terminals, and exec terminals);
//! - a pod member's: [`ThreadKind::Member`]. A pod's later container has no monitor of its
//!   own but a *member* process on the host (`husk`'s `monitor::member`) that passes the
//!   container's commands to the sandbox's monitor and relays its stdio (as [`ThreadKind::Relay`]):
//!   it reads what a taken-over sandbox monitor answers, so it is filtered too.
//!
//! ```no_run
//! # fn vcpu_loop() {}
//! // In a vCPU thread, after the vCPU fd, its kvm_run mapping and every eventfd exist:
//! husk_seccomp::apply(husk_seccomp::ThreadKind::Vcpu)?;
//! vcpu_loop();
//! # Ok::<(), husk_seccomp::SeccompError>(())
//! ```
//!
//! # Why one filter per thread
//!
//! The threads face the guest differently and need very different syscalls. A vCPU thread runs
//! guest-controlled device emulation on every exit, yet needs little more than `ioctl(KVM_RUN)`
//! and `write` to an eventfd; the event loop needs sockets; only the main thread writes the
//! state or kicks vCPUs. One process-wide filter would be the union of them all, so a bug in
//! MMIO emulation could open sockets. Seccomp filters are per thread (we install them without
//! `TSYNC`) and are inherited by threads created later, stacked: a syscall must pass every
//! filter of the thread. So a thread either is created before its parent filters itself, or
//! narrows what it inherited with its own filter as the first thing it does; and a thread
//! that starts others (the main thread, the command acceptor, a terminal relay) holds in its
//! filter what they need until they have installed theirs: `clone` with glibc's thread flags
//! only (`clone3`, whose flags a filter cannot see, is answered ENOSYS by the companion
//! `clone3_enosys`, and glibc falls back to `clone`), the new thread's first calls, `prctl`
//! and `seccomp` for its filter, and their work.
//!
//! # Why a denied syscall kills the process
//!
//! Outside the allowlist the action is `SECCOMP_RET_KILL_PROCESS`. A syscall the monitor never
//! makes is either a bug or an attacker who has taken over a thread; returning an error would
//! let the attacker probe and carry on, and killing only the thread (`KILL_THREAD`) would leave
//! a half-dead monitor holding locks. The whole monitor dies with `SIGSYS` (exit status 159 to
//! its waiter), the VM goes with it, the container reads as stopped, and the kernel logs the
//! syscall (see below).
//!
//! # Rules as data, compiled at build time
//!
//! The rules are `filters/<arch>-<libc>.json` (today `x86_64-gnu.json`) in seccompiler's JSON
//! format: one section per thread, one rule per syscall, and a `"comment"` on every rule saying
//! who needs it. We chose the JSON over a Rust table because the file is the security review:
//! a change to it reads as "syscall, condition, reason", the format is the one Firecracker and
//! `seccompiler-bin` use, and `build.rs` refuses a rule without a comment. The file is per libc
//! as well as per architecture because glibc's malloc, thread exit and `abort` make different
//! syscalls from musl's; building for a target without a file fails at build time.
//!
//! `build.rs` compiles the JSON with seccompiler into BPF and embeds it, so the monitor carries
//! no JSON parser and has no run-time failure mode for a malformed filter: at run time this
//! crate only hands a static program to `seccompiler::apply_filter` (which also sets
//! `no_new_privs`). `build.rs` also rejects an empty filter, a thread filter whose default
//! action is not `kill_process`, and a syscall listed both with and without argument
//! conditions (seccompiler would silently keep only the conditional rules).
//!
//! Argument conditions are used where they are cheap and meaningful: `ioctl` only with the
//! request numbers a thread uses (`KVM_RUN` on vCPUs, `FIONBIO`), `socket` only for `AF_UNIX`,
//! `fcntl` only `F_GETFL`/`F_SETFL`, `tgkill` only to this process and with `SIGABRT` (and the
//! vCPU kick signal where vCPUs are stopped), `madvise` only `MADV_DONTNEED`, and `mmap`/`mprotect`
//! never with `PROT_EXEC`, so a compromised thread cannot make memory executable. The numbers
//! are written in decimal (JSON has no hex) with a comment naming the constant; a unit test
//! checks each one against `libc` or the `_IO` formula.
//!
//! One value is known only when the filter is installed: the process's own pid, which
//! `tgkill`'s target must be (`"val": "own_tgid"` in the JSON). Without it a taken-over thread
//! could signal any process its uid may signal (as root: every root process of its pid
//! namespace; `SIGABRT`'s default action is a core dump). `build.rs` compiles it as a number
//! no pid can be and checks that it comes out only in those comparisons; [`apply_with`] puts
//! `getpid()` there (so within a pid namespace, the pid there).
//!
//! # glibc opens a file when it frees memory
//!
//! The first time glibc's malloc trims a thread's arena it reads
//! `/proc/sys/vm/overcommit_memory` with `openat`, from whichever thread happens to free. Rather
//! than let every thread open files, each thread also gets a second, tiny filter,
//! `openat_eacces`, that answers `openat` with `EACCES` (glibc then falls back to
//! `madvise(MADV_DONTNEED)`). The kernel runs every stacked filter and takes the most severe
//! verdict, so `openat` is listed as allowed in the thread filters only so that `EACCES`, not
//! the kill, wins. [`apply_with`] installs the companion first, then the thread's filter.
//!
//! The exceptions are the `vmm` thread, which runs the virtio-fs server and opens files in the
//! shared directory (always relative to an `O_PATH` fd it holds, or through
//! `/proc/self/fd`), the monitor's main thread, which writes `state.json`, and a pod member,
//! which writes its container's: they get no companion and their filters allow `openat`
//! themselves. The monitor's jail leaves them nothing else to open; a member is not jailed
//! (it runs as the engine's `husk`, see `husk`'s `monitor::member`), so its filter takes
//! away what it never does (exec, signals to others, sockets but Unix ones, mounts, ...) but
//! not the files root may open.
//!
//! # What the monitor must do for these filters to hold
//!
//! - Create every thread, fd, mapping, timerfd and signal handler before filtering.
//! - Register irqfds and ioeventfds when a device is attached, before the VM runs, not when the
//!   guest activates it: no thread may call `KVM_IRQFD`/`KVM_IOEVENTFD` later. Device
//!   activation on a vCPU thread only writes an eventfd; the event loop does the rest.
//! - Kick vCPUs from the vm_wait or monitor thread with `pthread_kill(thread, SIGRTMIN())`
//!   (34 on glibc), the signal vmm-sys-util's vCPU kick uses.
//! - Not use `KVM_SET_REGS`, `KVM_KVMCLOCK_CTRL` or any other vCPU ioctl after boot but
//!   `KVM_RUN` and the `KVM_GET_*` a paused vCPU makes to save itself for a snapshot; add a
//!   rule (with its reason) if pause or debugging ever needs another.
//! - Name its threads (`vmm`, `vcpu0`, `vm-wait`, `guest-reader`, ...): the kernel's log names
//!   the thread, and so the filter, that made a denied syscall.
//!
//! A panic in a filtered thread prints its message and, with `panic = abort`, ends in
//! `SIGABRT` as usual. With `RUST_BACKTRACE` set, the backtrace printer calls `getcwd` and
//! reads `/proc/self/maps`, so the message is followed by a `SIGSYS` kill instead of a trace.
//!
//! # Finding a missing syscall
//!
//! A kill shows as the monitor dying with `SIGSYS`, and the kernel logs it (`kill_process` is
//! in `/proc/sys/kernel/seccomp/actions_logged` by default):
//!
//! ```text
//! $ dmesg | grep type=1326        # or: journalctl -k | grep type=1326; ausearch -m SECCOMP
//! audit: type=1326 ... comm="husk" exe="/usr/bin/husk" sig=31 arch=c000003e syscall=41 ...
//! $ ausyscall 41                  # or grep -w 41 /usr/include/x86_64-linux-gnu/asm/unistd_64.h
//! socket
//! ```
//!
//! To see *every* syscall a workload needs rather than only the first, run the monitor in log
//! mode (`--seccomp-log`, which calls [`apply_with`] with [`Mode::Log`]): each syscall outside
//! the filter is logged the same way, with `sig=0`, and allowed. `comm` is the thread's name,
//! which tells you the filter.
//!
//! # Debugging switches
//!
//! Only the developer command `husk vm boot` has them; both are for debugging and neither is
//! reachable from the OCI commands:
//!
//! - `husk vm boot --seccomp-log ...`: every thread installs its filter in [`Mode::Log`], so a
//!   syscall outside the list is logged (`type=1326 ... sig=0`) and allowed, and one run lists
//!   everything a workload misses;
//! - `husk vm boot --no-seccomp ...`: no filter at all (to tell a seccomp kill from another
//!   crash).
//!
//! The per-container monitor (`husk create`/`run`) always runs in [`Mode::Enforce`]: there is
//! no flag or environment variable that weakens a container's filters, so an engine's
//! environment cannot. To debug a container workload, reproduce it with `husk vm boot
//! --seccomp-log`, or read the kernel log line of the kill (above).
//!
//! # Which ioctls, checked how
//!
//! The `ioctl` rules were checked against what a real boot does after the filters are on:
//! `strace -f -e trace=ioctl,seccomp husk vm boot --vcpus 2 --vsock S ...` shows every KVM
//! setup ioctl (`KVM_CREATE_*`, `KVM_SET_*`, `KVM_IRQFD`, `KVM_IOEVENTFD`, ...) before the
//! first `seccomp()` of each thread, and afterwards only `KVM_RUN` on the vCPU threads and no
//! ioctl at all on the others, except `FIONBIO` when a host connection arrives (std's
//! `set_nonblocking`). (That boot had no network; with virtio-net the event loop also sets the
//! tap's offloads, `TUNSETOFFLOAD`, when the guest driver activates the device.) Tests kill each kind of thread with an ioctl outside its list
//! (`KVM_SET_REGS` on a vCPU, `KVM_IRQFD` on the event loop, `KVM_RUN` on the vm_wait thread) and
//! with a syscall outside its list.
//!
//! # Adding a syscall
//!
//! Edit the JSON: add a rule to the section of the thread that needs it, with a `"comment"`
//! naming the caller and why (`"vsock muxer: ..."`, `"glibc malloc: ..."`), and argument
//! conditions if the arguments are fixed (request numbers, flags, domains), each with a comment
//! naming the constant (the tests check the number against it). Then
//! `cargo test -p husk-seccomp`: the build checks the rules, and the tests re-run the test
//! binary as child processes that install the filters for real: a denied syscall must kill the
//! child with `SIGSYS`, and a thread of each kind must live through its usual work (and
//! std's and glibc's: allocation, arena trimming, channels, thread exit, abort) and exit.

use std::fmt;

pub use seccompiler::sock_filter;

/// The monitor threads that carry a filter of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The event loop: device eventfds, vsock connections to host Unix sockets, stdio.
    Vmm,
    /// A vCPU thread: `KVM_RUN` and the exits it returns.
    Vcpu,
    /// Waits for the VM to end, stops its threads and tears it down.
    VmWait,
    /// The monitor's main thread once the VM runs.
    Monitor,
    /// The monitor's reader and writer of husk-init's control connection.
    Guest,
    /// The monitor's control-socket acceptor and its per-connection readers.
    Commands,
    /// A relay of the container's (or an exec's) stdio or terminal.
    Relay,
    /// A pod's later container's member process (`monitor::member` in `husk`): its main thread
    /// once it serves, its command acceptor and proxies, its terminal-resize forwarder.
    Member,
}

impl ThreadKind {
    /// Every kind, for callers (and tests) that go over all filters.
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::VmWait,
        ThreadKind::Monitor,
        ThreadKind::Guest,
        ThreadKind::Commands,
        ThreadKind::Relay,
        ThreadKind::Member,
    ];

    /// The section of the filter file that holds this thread's rules.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::VmWait => "vm_wait",
            ThreadKind::Monitor => "monitor",
            ThreadKind::Guest => "guest",
            ThreadKind::Commands => "commands",
            ThreadKind::Relay => "relay",
            ThreadKind::Member => "member",
        }
    }

    /// Whether the thread really opens files (virtio-fs; the monitor's state), rather than
    /// having `openat` answered EACCES by the `openat_eacces` companion.
    fn opens_files(self) -> bool {
        matches!(
            self,
            ThreadKind::Vmm | ThreadKind::Monitor | ThreadKind::Member
        )
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to a syscall outside the thread's filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The process is killed with `SIGSYS` (`SECCOMP_RET_KILL_PROCESS`). The only mode for
    /// production.
    #[default]
    Enforce,
    /// The syscall is logged by the kernel and allowed (`SECCOMP_RET_LOG`), to list what a
    /// workload is missing. The same rules otherwise; for `--seccomp-log` only.
    Log,
}

/// Installing a thread's filters failed; the thread may carry the `openat` companion filter
/// but not its allowlist, and must not go on to serve the guest.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The kernel refused a filter (`prctl(PR_SET_NO_NEW_PRIVS)` or `seccomp(2)`).
    #[error("cannot install the seccomp filter of the {kind} thread")]
    Install {
        /// The thread whose filter was being installed.
        kind: ThreadKind,
        /// seccompiler's error, with the OS error inside.
        #[source]
        source: seccompiler::Error,
    },
}

/// Filters the calling thread as `kind`, killing the process on any syscall outside the filter.
///
/// Call it once per thread, after the thread's setup and before it handles guest input.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    apply_with(kind, Mode::Enforce)
}

/// Filters the calling thread as `kind`, with `mode` deciding the fate of syscalls outside the
/// filter.
pub fn apply_with(kind: ThreadKind, mode: Mode) -> Result<(), SeccompError> {
    // Make sure this thread has its malloc arena before it is filtered: glibc attaches a thread
    // to an arena on its first allocation, and creating one may make one-time syscalls (it
    // counts CPUs once many arenas exist) that no filter allows.
    drop(std::hint::black_box(Box::new(0_u64)));

    let install = |program: &[sock_filter]| {
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { kind, source })
    };
    // The companions first: the thread filter allows openat and clone3 only because these
    // answer them. The vmm thread serves virtio-fs and the monitor's writes its state: they
    // really open files.
    install(programs::CLONE3_ENOSYS)?;
    if !kind.opens_files() {
        install(programs::OPENAT_EACCES)?;
    }
    install(&program(kind, mode, std::process::id()))
}

/// The BPF program of `kind`'s filter in `mode` for the process `tgid` (its own pid): the
/// compiled [`filter`] with `tgid` where the JSON says `"own_tgid"`.
pub fn program(kind: ThreadKind, mode: Mode, tgid: u32) -> Vec<sock_filter> {
    let mut program = filter(kind, mode).to_vec();
    for insn in program.iter_mut().filter(|i| i.k == programs::OWN_TGID) {
        insn.k = tgid;
    }
    program
}

/// The BPF program of `kind`'s filter in `mode`, as compiled from the JSON at build time,
/// with a placeholder for the own pid (see [`program`]).
///
/// [`apply_with`] installs it on top of a small companion that answers `openat` with `EACCES`.
pub fn filter(kind: ThreadKind, mode: Mode) -> &'static [sock_filter] {
    match (kind, mode) {
        (ThreadKind::Vmm, Mode::Enforce) => programs::VMM_ENFORCE,
        (ThreadKind::Vmm, Mode::Log) => programs::VMM_LOG,
        (ThreadKind::Vcpu, Mode::Enforce) => programs::VCPU_ENFORCE,
        (ThreadKind::Vcpu, Mode::Log) => programs::VCPU_LOG,
        (ThreadKind::VmWait, Mode::Enforce) => programs::VM_WAIT_ENFORCE,
        (ThreadKind::VmWait, Mode::Log) => programs::VM_WAIT_LOG,
        (ThreadKind::Monitor, Mode::Enforce) => programs::MONITOR_ENFORCE,
        (ThreadKind::Monitor, Mode::Log) => programs::MONITOR_LOG,
        (ThreadKind::Guest, Mode::Enforce) => programs::GUEST_ENFORCE,
        (ThreadKind::Guest, Mode::Log) => programs::GUEST_LOG,
        (ThreadKind::Commands, Mode::Enforce) => programs::COMMANDS_ENFORCE,
        (ThreadKind::Commands, Mode::Log) => programs::COMMANDS_LOG,
        (ThreadKind::Relay, Mode::Enforce) => programs::RELAY_ENFORCE,
        (ThreadKind::Relay, Mode::Log) => programs::RELAY_LOG,
        (ThreadKind::Member, Mode::Enforce) => programs::MEMBER_ENFORCE,
        (ThreadKind::Member, Mode::Log) => programs::MEMBER_LOG,
    }
}

/// The programs `build.rs` wrote to `OUT_DIR`, decoded at compile time into statics.
mod programs {
    use super::sock_filter;

    include!(concat!(env!("OUT_DIR"), "/own_tgid.rs"));

    /// Size of one raw `sock_filter` record as `build.rs` writes it.
    const RECORD: usize = 8;

    /// Decodes `build.rs`'s little-endian records (`u16 code; u8 jt; u8 jf; u32 k`).
    const fn decode<const N: usize>(bytes: &[u8]) -> [sock_filter; N] {
        const EMPTY: sock_filter = sock_filter {
            code: 0,
            jt: 0,
            jf: 0,
            k: 0,
        };
        assert!(
            bytes.len() == N * RECORD,
            "a BPF program is a whole number of records"
        );
        let mut program = [EMPTY; N];
        let mut i = 0;
        while i < N {
            let r = i * RECORD;
            program[i] = sock_filter {
                code: u16::from_le_bytes([bytes[r], bytes[r + 1]]),
                jt: bytes[r + 2],
                jf: bytes[r + 3],
                k: u32::from_le_bytes([bytes[r + 4], bytes[r + 5], bytes[r + 6], bytes[r + 7]]),
            };
            i += 1;
        }
        program
    }

    macro_rules! embed {
        ($name:ident, $file:literal) => {
            pub(super) static $name: &[sock_filter] = {
                const BYTES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/", $file));
                const PROGRAM: [sock_filter; BYTES.len() / RECORD] = decode(BYTES);
                &PROGRAM
            };
        };
    }

    embed!(VMM_ENFORCE, "vmm.enforce.bpf");
    embed!(VMM_LOG, "vmm.log.bpf");
    embed!(VCPU_ENFORCE, "vcpu.enforce.bpf");
    embed!(VCPU_LOG, "vcpu.log.bpf");
    embed!(VM_WAIT_ENFORCE, "vm_wait.enforce.bpf");
    embed!(VM_WAIT_LOG, "vm_wait.log.bpf");
    embed!(MONITOR_ENFORCE, "monitor.enforce.bpf");
    embed!(MONITOR_LOG, "monitor.log.bpf");
    embed!(GUEST_ENFORCE, "guest.enforce.bpf");
    embed!(GUEST_LOG, "guest.log.bpf");
    embed!(COMMANDS_ENFORCE, "commands.enforce.bpf");
    embed!(COMMANDS_LOG, "commands.log.bpf");
    embed!(RELAY_ENFORCE, "relay.enforce.bpf");
    embed!(RELAY_LOG, "relay.log.bpf");
    embed!(MEMBER_ENFORCE, "member.enforce.bpf");
    embed!(MEMBER_LOG, "member.log.bpf");
    embed!(OPENAT_EACCES, "openat_eacces.enforce.bpf");
    embed!(CLONE3_ENOSYS, "clone3_enosys.enforce.bpf");
}

#[cfg(test)]
mod tests;
