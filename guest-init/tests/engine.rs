//! husk-init's container engine, without a VM: the real binary, driven over Unix sockets by
//! the host side in `common`, building real containers from a busybox root filesystem. Each
//! test checks one part of the spec from *inside* the container, with busybox as the probe.
//!
//! These need root (they mount, clone namespaces and change users); without it each test
//! prints `SKIPPED: needs root` and passes.

mod common;

use std::io::Write;
use std::net::IpAddr;
use std::process::Command;

use common::{Host, Options, Want, config, sh, skip_unless_root, without_namespace};
use husk_proto::{
    ContainerRef, ErrorCode, ExecId, FsSource, IpCidr, MountSource, NetInterface, NetRoute,
    NetworkConfig, ProcessRef, Request, Response, SignalTarget, WaitStatus, WindowSize,
};
use serde_json::json;

fn exited(code: i32) -> WaitStatus {
    WaitStatus::Exited(code)
}

/// The first line of `text` that starts with `prefix`, without the prefix, trimmed.
fn field<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in {text:?}"))
        .trim()
}

// ---- process ---------------------------------------------------------------------------

#[test]
fn env_is_the_spec_env_plus_home_and_nothing_of_husk_init() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = config(&["env"]);
    cfg["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz", "EMPTY=", "X=a=b"]);
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    let mut lines: Vec<&str> = run.stdout.lines().collect();
    lines.sort_unstable();
    // HOME comes from /etc/passwd (uid 0 → /root); husk-init's own environment stays out.
    assert_eq!(
        lines,
        ["EMPTY=", "FOO=bar baz", "HOME=/root", "PATH=/bin", "X=a=b"]
    );
}

#[test]
fn cwd_is_created_and_entered() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = config(&["pwd"]);
    cfg["process"]["cwd"] = json!("/work/deep/dir");
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    assert_eq!(run.stdout, "/work/deep/dir\n");
    assert!(h.rootfs().join("work/deep/dir").is_dir());
}

#[test]
fn user_groups_umask_and_home_follow_the_spec() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh("id; id -G; umask; echo \"home=$HOME\"; grep '^Groups:' /proc/self/status");
    cfg["process"]["user"] =
        json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 0o027});
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines[..4],
        [
            "uid=1000(alice) gid=1000(alice) groups=10(wheel),20(games)",
            "1000 10 20",
            "0027",
            "home=/home/alice",
        ],
        "{run:?}"
    );
    assert_eq!(field(&run.stdout, "Groups:"), "10 20");
}

#[test]
fn hostname_and_domainname_are_set_in_the_uts_namespace() {
    if skip_unless_root() {
        return;
    }
    let before = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let mut h = Host::start();
    let mut cfg = sh("hostname; cat /proc/sys/kernel/domainname");
    cfg["hostname"] = json!("husk-box");
    cfg["domainname"] = json!("example.test");
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    assert_eq!(run.stdout, "husk-box\nexample.test\n");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        before
    );
}

#[test]
fn rlimits_are_applied() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh("ulimit -n; ulimit -Hn; grep 'Max open files' /proc/self/limits");
    cfg["process"]["rlimits"] = json!([
        {"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456},
        {"type": "RLIMIT_CORE", "soft": 0, "hard": 0}
    ]);
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines[..2], ["123", "456"], "{run:?}");
    let limits: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(limits, ["Max", "open", "files", "123", "456", "files"]);
}

/// `CapXxx:` of /proc/self/status as a number.
fn caps(status: &str, name: &str) -> u64 {
    u64::from_str_radix(field(status, &format!("Cap{name}:")), 16).expect("hex")
}

const CAP_CHOWN: u64 = 1 << 0;
const CAP_KILL: u64 = 1 << 5;
const CAP_NET_BIND_SERVICE: u64 = 1 << 10;

#[test]
fn capabilities_are_limited_to_the_spec_sets() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg =
        sh("grep ^Cap /proc/self/status; mount -t tmpfs t /mnt 2>&1 || echo mount-denied");
    let set = json!(["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    cfg["process"]["capabilities"] = json!({
        "bounding": set, "effective": set, "permitted": set, "inheritable": [], "ambient": []
    });
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    let want = CAP_CHOWN | CAP_KILL | CAP_NET_BIND_SERVICE;
    assert_eq!(caps(&run.stdout, "Bnd"), want, "{}", run.stdout);
    assert_eq!(caps(&run.stdout, "Eff"), want, "{}", run.stdout);
    assert_eq!(caps(&run.stdout, "Prm"), want, "{}", run.stdout);
    assert_eq!(caps(&run.stdout, "Inh"), 0, "{}", run.stdout);
    assert_eq!(caps(&run.stdout, "Amb"), 0, "{}", run.stdout);
    // Without CAP_SYS_ADMIN, root cannot mount.
    assert!(run.stdout.contains("mount-denied"), "{}", run.stdout);
}

#[test]
fn ambient_capabilities_survive_the_switch_to_a_user() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh("id -u; grep ^Cap /proc/self/status");
    let set = json!(["CAP_NET_BIND_SERVICE"]);
    cfg["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    cfg["process"]["capabilities"] = json!({
        "bounding": set, "effective": set, "permitted": set, "inheritable": set, "ambient": set
    });
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    assert!(run.stdout.starts_with("1000\n"), "{}", run.stdout);
    for set in ["Bnd", "Eff", "Prm", "Inh", "Amb"] {
        assert_eq!(
            caps(&run.stdout, set),
            CAP_NET_BIND_SERVICE,
            "Cap{set} in {}",
            run.stdout
        );
    }
}

#[test]
fn ambient_capabilities_outside_inheritable_are_skipped_as_runc_does() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh("grep ^Cap /proc/self/status");
    // `runc spec`'s default: ambient listed, inheritable empty.
    let set = json!(["CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    cfg["process"]["capabilities"] = json!({
        "bounding": set, "effective": set, "permitted": set,
        "inheritable": ["CAP_KILL"], "ambient": set
    });
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    assert_eq!(caps(&run.stdout, "Amb"), CAP_KILL, "{}", run.stdout);
    assert_eq!(
        caps(&run.stdout, "Prm"),
        CAP_KILL | CAP_NET_BIND_SERVICE,
        "{}",
        run.stdout
    );
}

#[test]
fn no_new_privileges_is_set_only_when_asked() {
    if skip_unless_root() {
        return;
    }
    for nnp in [true, false] {
        let mut h = Host::start();
        let mut cfg = sh("grep ^NoNewPrivs: /proc/self/status");
        cfg["process"]["noNewPrivileges"] = json!(nnp);
        let run = h.run(&cfg);
        assert_eq!(run.status, exited(0), "{run:?}");
        assert_eq!(
            field(&run.stdout, "NoNewPrivs:"),
            if nnp { "1" } else { "0" }
        );
    }
}

#[test]
fn a_seccomp_errno_rule_makes_the_syscall_fail() {
    if skip_unless_root() {
        return;
    }
    // Both ways of installing the filter: with no_new_privs, and without (which needs
    // CAP_SYS_ADMIN at the time, so it goes in before the capabilities drop).
    for (nnp, errno, message) in [
        (false, 1, "Operation not permitted"),
        (true, 13, "Permission denied"),
    ] {
        let mut h = Host::start();
        let mut cfg = sh(
            "mkdir /newdir; echo \"rc=$?\"; touch /file && echo touch-ok; grep ^Seccomp: /proc/self/status",
        );
        cfg["process"]["noNewPrivileges"] = json!(nnp);
        cfg["process"]["capabilities"] = json!({"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"], "permitted": ["CAP_CHOWN"]});
        cfg["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [
                {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno}
            ]
        });
        let run = h.run(&cfg);
        assert_eq!(run.status, exited(0), "{run:?}");
        assert!(
            run.stderr.contains(message),
            "nnp={nnp}: mkdir should fail with {message:?}: {run:?}"
        );
        assert!(run.stdout.contains("rc=1\ntouch-ok\n"), "{run:?}");
        assert_eq!(field(&run.stdout, "Seccomp:"), "2");
        assert!(!h.rootfs().join("newdir").exists());
    }
}

/// An allow list in the style of Docker's profiles from before 2021 (hand-written, not a
/// copy): what ordinary programs use, with the syscalls newer than it (close_range, clone3,
/// openat2, faccessat2, ...) left out, so they get the default action. husk-init's own last
/// steps before execve must fit in it, as they fit in runc's.
const OLD_STYLE_ALLOW_LIST: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "clone",
    "close",
    "connect",
    "dup",
    "dup2",
    "dup3",
    "epoll_create1",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_wait",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "fadvise64",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "flock",
    "fork",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "ioctl",
    "kill",
    "lchown",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "lseek",
    "lstat",
    "madvise",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mmap",
    "mprotect",
    "mremap",
    "munmap",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "pause",
    "pipe",
    "pipe2",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "prlimit64",
    "pselect6",
    "pwrite64",
    "read",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmsg",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "sched_getaffinity",
    "sched_yield",
    "select",
    "sendmsg",
    "sendto",
    "set_robust_list",
    "set_tid_address",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "setsid",
    "setsockopt",
    "setuid",
    "shutdown",
    "sigaltstack",
    "socket",
    "socketpair",
    "stat",
    "statfs",
    "statx",
    "symlink",
    "symlinkat",
    "sysinfo",
    "tgkill",
    "time",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utimensat",
    "vfork",
    "wait4",
    "waitid",
    "write",
    "writev",
];

#[test]
fn a_default_deny_profile_without_close_range_runs() {
    if skip_unless_root() {
        return;
    }
    assert!(!OLD_STYLE_ALLOW_LIST.contains(&"close_range"));
    // Both ways of installing the filter (before the privilege drop, and with no_new_privs
    // right before execve), for the main process and an exec'd one.
    for nnp in [false, true] {
        let mut h = Host::start();
        let mut cfg = sh("grep ^Seccomp: /proc/self/status; echo ready; exec sleep 100");
        cfg["process"]["noNewPrivileges"] = json!(nnp);
        cfg["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [10]});
        cfg["process"]["capabilities"] = json!({"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"],
            "permitted": ["CAP_KILL"], "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]});
        cfg["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": OLD_STYLE_ALLOW_LIST, "action": "SCMP_ACT_ALLOW"}]
        });
        let (_, io) = h.create(&cfg, Want::OUTPUT).unwrap();
        if let Err(e) = h.request(Request::Start {
            container: ContainerRef::FIRST,
        }) {
            panic!("nnp={nnp}: start failed: {e}");
        }
        assert_eq!(io.stdout.wait_for("ready"), "Seccomp:\t2\nready\n");
        let process = json!({"args": ["grep", "^Seccomp:", "/proc/self/status"], "cwd": "/",
                             "user": {"uid": 1000, "gid": 1000}, "noNewPrivileges": nnp});
        let (_, eio) = h
            .exec(1, &process, Want::OUTPUT)
            .unwrap_or_else(|e| panic!("nnp={nnp}: exec failed: {e}"));
        assert_eq!(h.wait_exit(ProcessRef::Exec(ExecId(1))), exited(0));
        assert_eq!(eio.stdout.text(), "Seccomp:\t2\n");
    }
}

#[test]
fn an_exec_process_gets_the_container_seccomp_profile() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh("echo ready; exec sleep 100");
    cfg["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
    });
    let (_, io) = h.create(&cfg, Want::OUTPUT).unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    io.stdout.wait_for("ready");
    let process = json!({"args": ["mkdir", "/tmp/d"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    let (_, eio) = h.exec(1, &process, Want::OUTPUT).unwrap();
    assert_eq!(h.wait_exit(ProcessRef::Exec(ExecId(1))), exited(1));
    let err = eio.stderr.text();
    assert!(err.contains("Operation not permitted"), "{err}");
}

#[test]
fn oom_score_adj_and_sysctls_are_applied() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh("cat /proc/self/oom_score_adj /proc/sys/kernel/msgmax");
    cfg["process"]["oomScoreAdj"] = json!(345);
    // An IPC sysctl: it belongs to the container's own IPC namespace.
    cfg["linux"]["sysctl"] = json!({"kernel.msgmax": "12345"});
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    assert_eq!(run.stdout, "345\n12345\n");
}

#[test]
fn specs_husk_cannot_honour_are_refused_at_create() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut no_uts = config(&["true"]);
    no_uts["hostname"] = json!("box");
    without_namespace(&mut no_uts, "uts");
    let mut join = config(&["true"]);
    join["linux"]["namespaces"][0]["path"] = json!("/proc/1/ns/pid");
    let mut time = config(&["true"]);
    time["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "time"}));
    let mut notify = config(&["true"]);
    notify["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]});
    let mut bad_cap = config(&["true"]);
    bad_cap["process"]["capabilities"] = json!({"bounding": ["CAP_MADE_UP"]});
    let mut unshared_bind = config(&["true"]);
    unshared_bind["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/x", "type": "bind", "source": "/etc", "options": ["bind"]}));
    let mut idmapped = config(&["true"]);
    idmapped["mounts"][2]["uidMappings"] = json!([{"containerID": 0, "hostID": 1000, "size": 1}]);
    for (cfg, code, needle) in [
        (no_uts, ErrorCode::InvalidSpec, "uts namespace"),
        (join, ErrorCode::Unsupported, "/proc/1/ns/pid"),
        (time, ErrorCode::Unsupported, "time namespace"),
        (notify, ErrorCode::Unsupported, "SCMP_ACT_NOTIFY"),
        (bad_cap, ErrorCode::InvalidSpec, "CAP_MADE_UP"),
        (unshared_bind, ErrorCode::InvalidSpec, "/etc"),
        (idmapped, ErrorCode::Unsupported, "id-mapped"),
    ] {
        let e = h.create(&cfg, Want::OUTPUT).unwrap_err();
        assert!(e.message.contains(needle), "{needle}: {e}");
        assert_eq!(e.code, code, "{e}");
    }
    assert_eq!(h.run(&config(&["true"])).status, exited(0));
}

#[test]
fn a_limit_the_cgroup_cannot_take_fails_create_and_leaves_no_cgroup() {
    if skip_unless_root() {
        return;
    }
    // No controller is enabled in this machine's cgroup v2 hierarchy, so pids.max does not
    // exist: the limit must be refused, not skipped.
    let mut h = Host::start_with(Options {
        cgroup: true,
        ..Options::default()
    });
    let mut cfg = config(&["true"]);
    cfg["linux"]["resources"] = json!({"pids": {"limit": 10}});
    let e = h.create(&cfg, Want::OUTPUT).unwrap_err();
    assert!(e.message.contains("pids.max"), "{e}");
    let cg = h.cgroup_root().unwrap().join("container");
    assert!(!cg.exists(), "the failed create left {}", cg.display());
}

#[test]
fn spec_devices_are_created_next_to_the_defaults() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh(
        "for d in null zero full tty urandom random mine; do stat -c '%n %F %t:%T %a %u:%g' /dev/$d; done; \
         readlink /dev/fd; readlink /dev/stdin; echo ok > /dev/null && echo null-ok",
    );
    cfg["linux"]["devices"] = json!([
        {"path": "/dev/mine", "type": "c", "major": 1, "minor": 7, "fileMode": 0o640, "uid": 1000, "gid": 20}
    ]);
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines[..7],
        [
            "/dev/null character special file 1:3 666 0:0",
            "/dev/zero character special file 1:5 666 0:0",
            "/dev/full character special file 1:7 666 0:0",
            "/dev/tty character special file 5:0 666 0:0",
            "/dev/urandom character special file 1:9 666 0:0",
            "/dev/random character special file 1:8 666 0:0",
            "/dev/mine character special file 1:7 640 1000:20",
        ],
        "{run:?}"
    );
    assert_eq!(
        lines[7..],
        ["/proc/self/fd", "/proc/self/fd/0", "null-ok"],
        "{run:?}"
    );
}

#[test]
fn a_user_namespace_maps_root_to_an_unprivileged_range() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh(
        "id -u; cat /proc/self/uid_map /proc/self/gid_map; touch /tmp/x && echo tmp-ok; \
         touch /etc/x 2>/dev/null || echo rootfs-not-ours; stat -c %u /etc/passwd",
    );
    cfg["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "user"}));
    cfg["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
    cfg["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
    let (pid, io) = h.create(&cfg, Want::OUTPUT).unwrap();
    // An exec'd process joins the user namespace too (before start: nothing to race with).
    let (epid, eio) = h
        .exec(
            1,
            &json!({"args": ["sh", "-c", "id -u; cat /proc/self/uid_map"], "cwd": "/",
                         "user": {"uid": 0, "gid": 0}}),
            Want::OUTPUT,
        )
        .unwrap();
    assert_eq!(
        h.wait_exit(ProcessRef::Exec(ExecId(1))),
        exited(0),
        "{}",
        eio.stderr.text()
    );
    let words: Vec<String> = eio
        .stdout
        .text()
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(
        words,
        ["0", "0", "200000", "65536"],
        "exec'd process {epid}"
    );
    let status_line = |name: &str| {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        field(&st, name)
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    // Seen from outside, the container's root is the unprivileged host uid 200000.
    assert_eq!(status_line("Uid:"), "200000");
    assert_eq!(status_line("Gid:"), "200000");
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    assert_eq!(
        h.wait_exit(ProcessRef::Init(ContainerRef::FIRST)),
        exited(0),
        "{}",
        io.stderr.text()
    );
    let out = io.stdout.text();
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["0"], "{out}");
    assert_eq!(lines[1], ["0", "200000", "65536"], "{out}");
    assert_eq!(lines[2], ["0", "200000", "65536"], "{out}");
    // The rootfs belongs to the real root, which is unmapped here (the overflow uid).
    assert_eq!(
        lines[3..],
        [vec!["tmp-ok"], vec!["rootfs-not-ours"], vec!["65534"]],
        "{out}"
    );
}

// ---- filesystem ---------------------------------------------------------------------------

/// The line of /proc/mounts (as printed in the container) for `target`.
fn mount_line<'a>(mounts: &'a str, target: &str) -> &'a str {
    mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(target))
        .unwrap_or_else(|| panic!("{target} is not mounted: {mounts}"))
}

#[test]
fn mounts_are_made_with_their_options() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let shared = h.dir().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("hello"), "from the host\n").unwrap();
    let mut cfg = sh("cat /proc/mounts; echo ---; \
         echo hi > /scratch/f && echo scratch-rw; \
         touch /frozen/f 2>/dev/null || echo frozen-ro; \
         cat /shared/hello; touch /shared/x 2>/dev/null || echo shared-ro; \
         touch /data/y && echo data-rw");
    let mounts = cfg["mounts"].as_array_mut().unwrap();
    let first = mounts.len();
    mounts.extend([
        json!({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m", "mode=710"]}),
        json!({"destination": "/frozen", "type": "tmpfs", "source": "tmpfs", "options": ["ro", "nosuid"]}),
        json!({"destination": "/shared", "type": "bind", "source": "/somewhere/on/the/host", "options": ["rbind", "ro"]}),
        json!({"destination": "/data", "source": "/elsewhere", "options": ["bind", "rw"]}),
    ]);
    let src = |index: usize, path: &std::path::Path| MountSource {
        index: u32::try_from(index).unwrap(),
        source: FsSource::Guest(path.to_string_lossy().into_owned()),
    };
    let data = h.dir().join("data");
    std::fs::create_dir(&data).unwrap();
    let (_, io) = h
        .create_with(
            &cfg,
            Want::OUTPUT,
            vec![src(first + 2, &shared), src(first + 3, &data)],
        )
        .unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    let status = h.wait_exit(ProcessRef::Init(ContainerRef::FIRST));
    let out = io.stdout.text();
    assert_eq!(status, exited(0), "{out} {}", io.stderr.text());
    let (table, results) = out.split_once("---\n").unwrap();
    let scratch = mount_line(table, "/scratch");
    assert!(
        scratch.contains(" rw,") && scratch.contains("size=1024k") && scratch.contains("mode=710"),
        "{scratch}"
    );
    let frozen = mount_line(table, "/frozen");
    assert!(
        frozen.contains(" ro,") && frozen.contains("nosuid"),
        "{frozen}"
    );
    assert!(mount_line(table, "/shared").contains(" ro,"), "{table}");
    assert!(mount_line(table, "/data").contains(" rw,"), "{table}");
    assert_eq!(
        results,
        "scratch-rw\nfrozen-ro\nfrom the host\nshared-ro\ndata-rw\n"
    );
    assert!(!shared.join("x").exists());
    assert!(data.join("y").exists(), "the rw bind mount wrote through");
}

#[test]
fn a_file_can_be_bind_mounted() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let motd = h.dir().join("motd");
    std::fs::write(&motd, "welcome\n").unwrap();
    let mut cfg = sh("cat /etc/motd; echo x > /etc/motd 2>/dev/null || echo motd-ro");
    let mounts = cfg["mounts"].as_array_mut().unwrap();
    mounts.push(
        json!({"destination": "/etc/motd", "type": "bind", "source": "/motd",
                       "options": ["bind", "ro"]}),
    );
    let index = u32::try_from(mounts.len() - 1).unwrap();
    let source = FsSource::Guest(motd.to_string_lossy().into_owned());
    let (_, io) = h
        .create_with(&cfg, Want::OUTPUT, vec![MountSource { index, source }])
        .unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    assert_eq!(
        h.wait_exit(ProcessRef::Init(ContainerRef::FIRST)),
        exited(0)
    );
    assert_eq!(io.stdout.text(), "welcome\nmotd-ro\n");
    assert_eq!(std::fs::read_to_string(&motd).unwrap(), "welcome\n");
}

#[test]
fn a_mount_through_a_symlink_stays_inside_the_rootfs() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let outside = h.dir().join("outside");
    std::fs::create_dir(&outside).unwrap();
    // An image whose links point at a directory of the machine, absolutely and by climbing;
    // the same path exists in the image, which is where they must lead.
    let rootfs = h.rootfs();
    let inside = rootfs.join(outside.strip_prefix("/").unwrap());
    std::fs::create_dir_all(&inside).unwrap();
    std::os::unix::fs::symlink(&outside, rootfs.join("escape")).unwrap();
    let climb = format!("../../../../../../..{}", outside.display());
    std::os::unix::fs::symlink(&climb, rootfs.join("climb")).unwrap();
    let mut cfg = sh("stat -f -c %T /escape/made /climb/made2");
    let mounts = cfg["mounts"].as_array_mut().unwrap();
    mounts.retain(|m| m["destination"] != "/tmp");
    for dest in ["/escape/made", "/climb/made2"] {
        mounts.push(json!({"destination": dest, "type": "tmpfs", "source": "tmpfs"}));
    }
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    assert_eq!(run.stdout, "tmpfs\ntmpfs\n");
    let made_outside = std::fs::read_dir(&outside).unwrap().count();
    assert_eq!(made_outside, 0, "mount points made outside the rootfs");
    assert!(inside.join("made").is_dir() && inside.join("made2").is_dir());
}

#[test]
fn a_mount_through_a_dangling_symlink_is_refused() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let outside = h.dir().join("outside");
    std::fs::create_dir(&outside).unwrap();
    // The link's target exists on the machine only; like `mkdir -p` (and runc), husk-init
    // does not create through a dangling link.
    std::os::unix::fs::symlink(&outside, h.rootfs().join("dangling")).unwrap();
    let mut cfg = config(&["true"]);
    cfg["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/dangling/made", "type": "tmpfs", "source": "tmpfs"}));
    let e = h.create(&cfg, Want::OUTPUT).unwrap_err();
    assert!(e.message.contains("/dangling/made"), "{e}");
    let made_outside = std::fs::read_dir(&outside).unwrap().count();
    assert_eq!(made_outside, 0, "mount point made outside the rootfs");
}

#[test]
fn root_propagation_applies_to_the_container_root() {
    if skip_unless_root() {
        return;
    }
    // The optional fields of the root's mountinfo line, as the container sees it. The test
    // machine's mounts are private (so are the VM's): nothing is shared unless asked.
    for (propagation, want) in [
        (Some("shared"), "shared:"),
        (Some("rshared"), "shared:"),
        (Some("unbindable"), "unbindable"),
        (Some("runbindable"), "unbindable"),
        (Some("private"), ""),
        (Some("rslave"), ""),
        (None, ""),
    ] {
        let mut h = Host::start();
        let mut cfg = config(&["cat", "/proc/self/mountinfo"]);
        if let Some(p) = propagation {
            cfg["linux"]["rootfsPropagation"] = json!(p);
        }
        let run = h.run(&cfg);
        assert_eq!(run.status, exited(0), "{propagation:?}: {run:?}");
        // id parent dev root mountpoint options [optional fields...] - type source options
        let fields: Vec<&str> = run
            .stdout
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(4) == Some(&"/"))
            .unwrap_or_else(|| panic!("no root in the mountinfo: {}", run.stdout));
        let optional = fields
            .iter()
            .skip(6)
            .take_while(|f| **f != "-")
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            if want.is_empty() {
                optional.is_empty()
            } else {
                optional.contains(want)
            },
            "rootfsPropagation {propagation:?}: the root's optional fields are {optional:?}, \
             expected {want:?}: {}",
            run.stdout
        );
    }
}

#[test]
fn readonly_paths_cannot_be_written() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh(
        "touch /etc/new 2>/dev/null || echo etc-ro; cat /etc/group | head -1; \
         touch /elsewhere && echo root-rw",
    );
    cfg["linux"]["readonlyPaths"] = json!(["/etc", "/does/not/exist"]);
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    assert_eq!(run.stdout, "etc-ro\nroot:x:0:\nroot-rw\n");
}

#[test]
fn a_readonly_root_keeps_its_mounts_writable() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh("touch /new 2>/dev/null || echo root-ro; touch /tmp/x && echo tmp-rw");
    cfg["root"]["readonly"] = json!(true);
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    assert_eq!(run.stdout, "root-ro\ntmp-rw\n");
    assert!(!h.rootfs().join("new").exists());
}

#[test]
fn masked_paths_hide_files_and_directories() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    std::fs::write(h.rootfs().join("secret-file"), "s3cret").unwrap();
    std::fs::create_dir(h.rootfs().join("secret-dir")).unwrap();
    std::fs::write(h.rootfs().join("secret-dir/inner"), "hidden").unwrap();
    let mut cfg = sh(
        "echo \"file=[$(cat /secret-file)]\"; echo \"dir=[$(ls -A /secret-dir)]\"; \
         touch /secret-dir/new 2>/dev/null || echo dir-ro; stat -c %t:%T /proc/version",
    );
    cfg["linux"]["maskedPaths"] =
        json!(["/secret-file", "/secret-dir", "/proc/version", "/missing"]);
    let run = h.run(&cfg);
    assert_eq!(run.status, exited(0), "{run:?}");
    // A masked file becomes /dev/null (char 1:3).
    assert_eq!(run.stdout, "file=[]\ndir=[]\ndir-ro\n1:3\n");
}

// ---- exit codes and signals --------------------------------------------------------------

#[test]
fn exit_codes_are_reported() {
    if skip_unless_root() {
        return;
    }
    for (cfg, code) in [(config(&["true"]), 0), (sh("exit 3"), 3)] {
        let mut h = Host::start();
        assert_eq!(h.run(&cfg).status, exited(code));
    }
}

#[test]
fn a_missing_executable_fails_create_with_its_name_and_husk_init_carries_on() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    for (arg0, wanted) in [
        ("/bin/no-such-tool", "/bin/no-such-tool"),
        (
            "no-such-tool",
            "no-such-tool\": executable file not found in $PATH",
        ),
    ] {
        let e = h.create(&config(&[arg0]), Want::OUTPUT).unwrap_err();
        assert_eq!(e.code, ErrorCode::ExecutableNotFound, "{e}");
        assert!(e.message.contains(wanted), "{e}");
    }
    std::fs::write(h.rootfs().join("bin/not-executable"), "#!/bin/sh\n").unwrap();
    let e = h
        .create(&config(&["/bin/not-executable"]), Want::OUTPUT)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}");
    // Nothing was created: the host may try again.
    assert_eq!(
        h.request(Request::Start {
            container: ContainerRef::FIRST
        })
        .unwrap_err()
        .code,
        ErrorCode::InvalidState
    );
    assert_eq!(h.run(&sh("exit 5")).status, exited(5));
}

#[test]
fn a_signal_death_is_reported_as_such() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    // Without a pid namespace: the shell is not an init that the kernel protects.
    let mut cfg = sh("kill -USR1 $$; sleep 5");
    without_namespace(&mut cfg, "pid");
    let status = h.run(&cfg).status;
    assert_eq!(
        status,
        WaitStatus::Signaled {
            signal: 10,
            core_dumped: false
        }
    );
    assert_eq!(status.exit_code(), 138);
}

#[test]
fn a_signal_request_terminates_the_process() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = config(&["sleep", "100"]);
    without_namespace(&mut cfg, "pid");
    let (pid, _io) = h.create(&cfg, Want::OUTPUT).unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    h.ok(Request::Signal {
        target: SignalTarget::Process(ProcessRef::Init(ContainerRef::FIRST)),
        signal: 15,
    });
    assert_eq!(
        h.wait_exit(ProcessRef::Init(ContainerRef::FIRST)),
        WaitStatus::Signaled {
            signal: 15,
            core_dumped: false
        }
    );
    assert!(common::gone(pid));
    // It is gone now: a second signal is refused, not sent to a recycled pid.
    let e = h
        .request(Request::Signal {
            target: SignalTarget::Process(ProcessRef::Init(ContainerRef::FIRST)),
            signal: 15,
        })
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NoSuchProcess, "{e}");
}

#[test]
fn a_signal_request_reaches_an_exec_process_only() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let pid = {
        let (pid, io) = h
            .create(&sh("echo ready; exec sleep 100"), Want::OUTPUT)
            .unwrap();
        h.ok(Request::Start {
            container: ContainerRef::FIRST,
        });
        io.stdout.wait_for("ready");
        pid
    };
    let process = json!({"args": ["sleep", "100"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    let (epid, _eio) = h.exec(4, &process, Want::OUTPUT).unwrap();
    h.ok(Request::Signal {
        target: SignalTarget::Process(ProcessRef::Exec(ExecId(4))),
        signal: 9,
    });
    assert_eq!(
        h.wait_exit(ProcessRef::Exec(ExecId(4))),
        WaitStatus::Signaled {
            signal: 9,
            core_dumped: false
        }
    );
    assert!(common::gone(epid));
    assert!(common::alive(pid), "the main process got the exec's signal");
}

#[test]
fn a_signal_request_reaches_a_shell_trap() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let cfg = sh("trap 'echo caught TERM; exit 7' TERM; echo ready; while :; do sleep 0.05; done");
    let (_, io) = h.create(&cfg, Want::OUTPUT).unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    io.stdout.wait_for("ready\n");
    h.ok(Request::Signal {
        target: SignalTarget::Process(ProcessRef::Init(ContainerRef::FIRST)),
        signal: 15,
    });
    assert_eq!(
        h.wait_exit(ProcessRef::Init(ContainerRef::FIRST)),
        exited(7)
    );
    assert_eq!(io.stdout.text(), "ready\ncaught TERM\n");
}

// ---- exec, pids ------------------------------------------------------------------------

#[test]
fn an_exec_process_joins_the_container() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh("echo hi > /tmp/from-init; echo ready; exec sleep 100");
    cfg["hostname"] = json!("box");
    let (pid, io) = h.create(&cfg, Want::OUTPUT).unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    io.stdout.wait_for("ready");
    common::wait_until_running(pid, &["sleep", "100"]);
    let process = json!({
        "args": ["sh", "-c", "readlink /proc/self/ns/pid; cat /proc/1/cmdline | tr '\\0' ' '; echo; \
                 cat /tmp/from-init; hostname; id -u; pwd; echo \"$GREETING\""],
        "env": ["PATH=/bin", "GREETING=hello"],
        "cwd": "/tmp",
        "user": {"uid": 1000, "gid": 1000}
    });
    let (_, eio) = h.exec(1, &process, Want::OUTPUT).unwrap();
    assert_eq!(h.wait_exit(ProcessRef::Exec(ExecId(1))), exited(0));
    let out = eio.stdout.text();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7, "{out} {}", eio.stderr.text());
    let init_ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    assert_eq!(
        lines[0],
        init_ns.to_str().unwrap(),
        "same pid namespace: {out}"
    );
    assert_eq!(
        lines[1..],
        ["sleep 100 ", "hi", "box", "1000", "/tmp", "hello"]
    );

    // An exec of something missing is refused with runc's message; the container runs on.
    let e = h
        .exec(
            2,
            &json!({"args": ["nope"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
            Want::OUTPUT,
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ExecutableNotFound, "{e}");
    assert!(e.message.contains("\"nope\""), "{e}");
    let Response::Pids(pids) = h.ok(Request::ListPids {
        container: ContainerRef::FIRST,
    }) else {
        panic!("not pids")
    };
    assert_eq!(pids.len(), 1, "{pids:?}");
}

#[test]
fn ps_in_an_exec_process_shows_the_main_process_as_pid_1() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let (pid, io) = h
        .create(&sh("echo ready; exec sleep 100"), Want::OUTPUT)
        .unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    io.stdout.wait_for("ready");
    // "ready" comes from the shell, before it execs sleep.
    common::wait_until_running(pid, &["sleep", "100"]);
    let process =
        json!({"args": ["ps", "-o", "pid,args"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    let (_, eio) = h.exec(7, &process, Want::OUTPUT).unwrap();
    assert_eq!(h.wait_exit(ProcessRef::Exec(ExecId(7))), exited(0));
    let out = eio.stdout.text();
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["1", "sleep", "100"], "{out}");
    assert_eq!(rows.len(), 2, "only sleep and ps itself: {out}");
}

fn list_pids(h: &mut Host) -> Vec<u32> {
    match h.ok(Request::ListPids {
        container: ContainerRef::FIRST,
    }) {
        Response::Pids(p) => p,
        other => panic!("ListPids answered {other:?}"),
    }
}

#[test]
fn list_pids_finds_every_process_of_the_pid_namespace() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let (pid, io) = h
        .create(
            &sh("sleep 100 & sleep 100 & echo ready; wait"),
            Want::OUTPUT,
        )
        .unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    io.stdout.wait_for("ready");
    let pids = list_pids(&mut h);
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert!(pids.contains(&pid), "{pids:?} lacks {pid}");
    let ns = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/pid")).unwrap();
    for p in &pids {
        assert_eq!(ns(*p), ns(pid));
    }
    h.ok(Request::Signal {
        target: SignalTarget::All(ContainerRef::FIRST),
        signal: 9,
    });
    assert_eq!(
        h.wait_exit(ProcessRef::Init(ContainerRef::FIRST)),
        WaitStatus::Signaled {
            signal: 9,
            core_dumped: false
        }
    );
    for p in pids {
        assert!(common::gone(p), "{p} survived");
    }
}

#[test]
fn the_container_gets_its_own_cgroup_and_list_pids_reads_it() {
    if skip_unless_root() {
        return;
    }
    // The test machine's cgroup v2 hierarchy has no controllers to delegate (cgroup v1
    // holds them): limits cannot be checked here, only the cgroup and its membership.
    let mut h = Host::start_with(Options {
        cgroup: true,
        ..Options::default()
    });
    let mut cfg = sh("sleep 100 & cat /proc/self/cgroup; echo cgroup-done; wait");
    cfg["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "cgroup"}));
    let (pid, io) = h.create(&cfg, Want::OUTPUT).unwrap();
    let cg = h.cgroup_root().unwrap().join("container");
    let procs = || std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
    // Placed before start, so the process cannot escape by forking first.
    assert_eq!(procs(), format!("{pid}\n"));
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    let out = io.stdout.wait_for("cgroup-done");
    let v2 = out.lines().find(|l| l.starts_with("0::")).unwrap();
    assert_eq!(
        v2, "0::/",
        "the cgroup namespace is rooted at the container: {out}"
    );
    let pids = list_pids(&mut h);
    let mut in_cgroup: Vec<u32> = procs().lines().map(|l| l.parse().unwrap()).collect();
    in_cgroup.sort_unstable();
    assert_eq!(pids, in_cgroup);
    assert_eq!(pids.len(), 2, "{pids:?}");
    // An exec'd process joins it too.
    let (epid, _eio) = h
        .exec(
            1,
            &json!({"args": ["sleep", "100"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
            Want::OUTPUT,
        )
        .unwrap();
    assert!(list_pids(&mut h).contains(&epid));
    h.ok(Request::Shutdown);
    let (st, log) = h.wait_husk_exit();
    assert!(st.success(), "{log}");
    assert!(
        !cg.exists(),
        "the container's cgroup is removed at shutdown"
    );
    for p in pids.into_iter().chain([epid]) {
        assert!(common::gone(p), "{p} survived the shutdown");
    }
}

// ---- stdio -------------------------------------------------------------------------------

#[test]
fn stdin_is_relayed_until_close_stdin() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let (_, mut io) = h
        .create(&config(&["cat"]), Want::Pipes { stdin: true })
        .unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    // Larger than every buffer on the way, so much of it is still in flight at CloseStdin.
    let data: Vec<u8> = (0..1_000_000u32)
        .map(|i| b"abcdefghij\n"[(i % 11) as usize])
        .collect();
    let mut stdin = io.stdin.take().unwrap();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || {
            stdin.write_all(&data).unwrap();
            stdin // kept open: EOF comes from CloseStdin
        })
    };
    let stdin = writer.join().unwrap();
    h.ok(Request::CloseStdin {
        process: ProcessRef::Init(ContainerRef::FIRST),
    });
    assert_eq!(
        h.wait_exit(ProcessRef::Init(ContainerRef::FIRST)),
        exited(0)
    );
    let out = io.stdout.bytes();
    assert_eq!(out.len(), data.len());
    assert!(out == data, "stdout differs from stdin");
    drop(stdin);
}

#[test]
fn stdin_ends_when_the_host_closes_its_connection() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let (_, mut io) = h
        .create(&config(&["wc", "-c"]), Want::Pipes { stdin: true })
        .unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    let mut stdin = io.stdin.take().unwrap();
    stdin.write_all(b"hello").unwrap();
    drop(stdin);
    assert_eq!(
        h.wait_exit(ProcessRef::Init(ContainerRef::FIRST)),
        exited(0)
    );
    assert_eq!(io.stdout.text().trim(), "5");
    // A pipe has no window size.
    let e = h
        .request(Request::ResizePty {
            process: ProcessRef::Init(ContainerRef::FIRST),
            size: WindowSize { rows: 1, cols: 1 },
        })
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NoSuchProcess, "it has exited: {e}");
}

/// Adds the devpts mount every real spec has (`runc spec`, podman, containerd): a terminal
/// comes from the container's own /dev/pts.
fn with_devpts(cfg: &mut serde_json::Value) {
    cfg["mounts"].as_array_mut().expect("mounts").push(json!(
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}
    ));
}

#[test]
fn a_terminal_process_sees_a_tty_and_its_size() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh(
        "test -t 0 && test -t 1 && echo is-a-tty; stty size; read line; stty size; echo \"got $line\"",
    );
    with_devpts(&mut cfg);
    cfg["process"]["terminal"] = json!(true);
    cfg["process"]["consoleSize"] = json!({"height": 33, "width": 111});
    let (_, mut io) = h.create(&cfg, Want::Terminal).unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    io.stdout.wait_for("33 111\r\n");
    h.ok(Request::ResizePty {
        process: ProcessRef::Init(ContainerRef::FIRST),
        size: WindowSize {
            rows: 50,
            cols: 132,
        },
    });
    io.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(
        h.wait_exit(ProcessRef::Init(ContainerRef::FIRST)),
        exited(0)
    );
    let out = io.stdout.text();
    // The tty echoes the input and turns \n into \r\n.
    assert_eq!(out, "is-a-tty\r\n33 111\r\ngo\r\n50 132\r\ngot go\r\n");
}

#[test]
fn the_terminal_is_a_pty_of_the_container_devpts() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    // ttyname() must find the slave in the container's /dev/pts (busybox `tty` fails with
    // "not a tty" otherwise), and the pty must be the container's own devpts instance: its
    // first pty is number 0 whatever husk-init's devpts holds, and it is the controlling one
    // (/dev/tty opens).
    let mut cfg = sh("tty; ls -1 /dev/pts; readlink /proc/self/fd/1; echo via-dev-tty >/dev/tty");
    with_devpts(&mut cfg);
    cfg["process"]["terminal"] = json!(true);
    let (_, io) = h.create(&cfg, Want::Terminal).unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    assert_eq!(
        h.wait_exit(ProcessRef::Init(ContainerRef::FIRST)),
        exited(0),
        "{}",
        io.stdout.text()
    );
    let out = io.stdout.text();
    let lines: Vec<&str> = out.lines().map(str::trim_end).collect();
    assert_eq!(lines[0], "/dev/pts/0", "{out:?}");
    assert_eq!(
        lines[1..3],
        ["0", "ptmx"],
        "one pty in the new devpts instance: {out:?}"
    );
    assert_eq!(lines[3..], ["/dev/pts/0", "via-dev-tty"], "{out:?}");
}

#[test]
fn the_terminal_belongs_to_the_process_user() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    // As under runc: the user can reopen its own terminal by name.
    let mut cfg = sh("stat -c '%u %a' $(tty); echo reopened >$(tty)");
    with_devpts(&mut cfg);
    cfg["process"]["terminal"] = json!(true);
    cfg["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    let (_, io) = h.create(&cfg, Want::Terminal).unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    assert_eq!(
        h.wait_exit(ProcessRef::Init(ContainerRef::FIRST)),
        exited(0),
        "{}",
        io.stdout.text()
    );
    assert_eq!(io.stdout.text(), "1000 620\r\nreopened\r\n");
}

#[test]
fn a_terminal_without_a_devpts_in_the_container_fails_create_saying_so() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh("true");
    cfg["process"]["terminal"] = json!(true);
    let e = h.create(&cfg, Want::Terminal).unwrap_err();
    assert!(
        e.message.contains("/dev/ptmx") && e.message.contains("process.terminal"),
        "{e:?}"
    );
    // husk-init carries on.
    let run = h.run(&config(&["echo", "still-here"]));
    assert_eq!(run.stdout, "still-here\n", "{run:?}");
}

#[test]
fn an_exec_process_can_have_a_terminal() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = sh("echo ready; exec sleep 100");
    with_devpts(&mut cfg);
    let (_, io) = h.create(&cfg, Want::OUTPUT).unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    io.stdout.wait_for("ready");
    // An exec'd process runs at once: its size can only come with it (as `runc exec` does).
    let process = json!({"args": ["sh", "-c", "test -t 0 && echo tty; stty size; tty"], "terminal": true,
                         "consoleSize": {"height": 20, "width": 70},
                         "cwd": "/", "user": {"uid": 0, "gid": 0}});
    let (_, eio) = h.exec(3, &process, Want::Terminal).unwrap();
    assert_eq!(h.wait_exit(ProcessRef::Exec(ExecId(3))), exited(0));
    assert_eq!(eio.stdout.text(), "tty\r\n20 70\r\n/dev/pts/0\r\n");
}

#[test]
fn a_host_that_stops_reading_stdout_still_gets_answers() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    h.hold_output();
    let (pid, io) = h
        .create(&sh("head -c 8000000 /dev/zero; echo end"), Want::OUTPUT)
        .unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    // 8 MB is far more than the pipe, husk-init's buffer and the socket hold: the process
    // blocks on its write while the control connection stays served.
    std::thread::sleep(std::time::Duration::from_millis(300));
    for _ in 0..3 {
        assert!(list_pids(&mut h).contains(&pid));
    }
    assert!(common::alive(pid));
    io.stdout.release();
    io.stderr.release();
    assert_eq!(
        h.wait_exit(ProcessRef::Init(ContainerRef::FIRST)),
        exited(0)
    );
    let out = io.stdout.bytes();
    assert_eq!(out.len(), 8_000_004);
    assert!(out.ends_with(b"\0end\n"));
}

#[test]
fn stdout_and_stderr_stay_apart() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let run = h.run(&sh("echo out; echo err >&2; echo out2"));
    assert_eq!(run.status, exited(0));
    assert_eq!(run.stdout, "out\nout2\n");
    assert_eq!(run.stderr, "err\n");
}

// ---- lifecycle -----------------------------------------------------------------------------

#[test]
fn shutdown_kills_the_container_and_leaves_no_mounts() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let (pid, io) = h
        .create(&sh("sleep 100 & echo ready; wait"), Want::OUTPUT)
        .unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    io.stdout.wait_for("ready");
    let pids = list_pids(&mut h);
    assert_eq!(h.ok(Request::Shutdown), Response::Done);
    let (st, log) = h.wait_husk_exit();
    assert!(st.success(), "{log}");
    for p in pids.iter().chain([&pid]) {
        assert!(common::gone(*p), "{p} survived");
    }
    let dir = h.dir().to_string_lossy().into_owned();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(&dir),
        "container mounts leaked to the host: {mountinfo}"
    );
}

#[test]
fn a_process_that_cannot_start_says_why() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    std::fs::set_permissions(
        h.rootfs().join("root"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    // The working directory is checked as the user, after the switch: at start.
    let mut cfg = config(&["true"]);
    cfg["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    cfg["process"]["cwd"] = json!("/root");
    let (pid, _io) = h.create(&cfg, Want::OUTPUT).unwrap();
    let e = h
        .request(Request::Start {
            container: ContainerRef::FIRST,
        })
        .unwrap_err();
    assert!(e.message.contains("/root"), "{e}");
    // The process existed, so its end is reported like any other.
    assert_eq!(
        h.wait_exit(ProcessRef::Init(ContainerRef::FIRST)),
        exited(1)
    );
    assert!(common::gone(pid));
    assert_eq!(
        h.request(Request::Start {
            container: ContainerRef::FIRST
        })
        .unwrap_err()
        .code,
        ErrorCode::InvalidState
    );
}

#[test]
fn stats_come_from_the_container_cgroup() {
    if skip_unless_root() {
        return;
    }
    // cpu.stat is a core file of every cgroup v2 group; memory.* and pids.* need their
    // controllers, which this machine's cgroup v2 hierarchy does not have.
    let mut h = Host::start_with(Options {
        cgroup: true,
        ..Options::default()
    });
    let (_, io) = h
        .create(
            &sh("i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; sleep 100 & echo busy-done; wait"),
            Want::OUTPUT,
        )
        .unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    io.stdout.wait_for("busy-done");
    let Response::Stats(st) = h.ok(Request::Stats {
        container: ContainerRef::FIRST,
    }) else {
        panic!("not stats")
    };
    assert!(st.cpu_usage_ns > 1_000_000, "{st:?}");
    assert!(st.cpu_user_ns + st.cpu_system_ns > 0, "{st:?}");
    assert!(
        st.cpu_user_ns + st.cpu_system_ns <= st.cpu_usage_ns + 1000,
        "{st:?}"
    );
    // No limit is set: "none" is u64::MAX, never 0.
    assert_eq!(st.memory_limit, u64::MAX, "{st:?}");
    assert_eq!(st.pids_limit, u64::MAX, "{st:?}");
    assert_eq!(st.pids_current, 2, "sh and sleep: {st:?}");
}

#[test]
fn shutdown_without_a_pid_namespace_kills_exec_processes_too() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = config(&["sleep", "100"]);
    without_namespace(&mut cfg, "pid");
    let (pid, _io) = h.create(&cfg, Want::OUTPUT).unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    let process = json!({"args": ["sleep", "100"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    let (epid, _eio) = h.exec(1, &process, Want::OUTPUT).unwrap();
    h.ok(Request::Shutdown);
    let (st, log) = h.wait_husk_exit();
    assert!(st.success(), "{log}");
    // No cgroup and no pid namespace to find them by: husk-init kills its own children.
    assert!(common::gone(pid), "the main process survived");
    assert!(common::gone(epid), "the exec'd process survived");
}

// ---- network -------------------------------------------------------------------------------

#[test]
fn configure_network_sets_up_interfaces_and_routes() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    // A veth end in husk-init's network namespace stands in for the VM's virtio-net device.
    let made = Command::new("nsenter")
        .args(["-t", &h.pid().to_string(), "-n", "ip", "link", "add", "vm0"])
        .args([
            "address",
            "02:00:00:00:00:07",
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
        ])
        .status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: needs nsenter and iproute2's ip with veth support");
        return;
    }
    let cidr = |addr: &str, prefix_len| IpCidr {
        addr: addr.parse::<IpAddr>().unwrap(),
        prefix_len,
    };
    // Found by the MAC it has, given the one the host says (as a restored template's NIC).
    let eth0 = |device_mac| NetInterface {
        name: "eth0".into(),
        device_mac,
        mac: [2, 0, 0, 0, 0, 8],
        mtu: 1400,
        addresses: vec![cidr("10.9.8.7", 24), cidr("fd00::7", 64)],
    };
    let e = h
        .request(Request::ConfigureNetwork(NetworkConfig {
            interfaces: vec![eth0([2, 0, 0, 0, 0, 0x99])],
            routes: vec![],
        }))
        .unwrap_err();
    assert!(e.message.contains("02:00:00:00:00:99"), "{e}");
    h.ok(Request::ConfigureNetwork(NetworkConfig {
        interfaces: vec![eth0([2, 0, 0, 0, 0, 7])],
        routes: vec![
            NetRoute {
                destination: None,
                gateway: Some("10.9.8.1".parse().unwrap()),
                interface: "eth0".into(),
            },
            NetRoute {
                destination: Some(cidr("192.168.50.0", 24)),
                gateway: None,
                interface: "eth0".into(),
            },
        ],
    }));
    // The container shares the VM's network (its namespace is ignored, by design).
    let run = h.run(&sh(
        "ip link show lo; ip link show eth0; ip addr show eth0; ip route; ip -6 addr show eth0",
    ));
    assert_eq!(run.status, exited(0), "{run:?}");
    let out = &run.stdout;
    let lo = out.lines().find(|l| l.contains(": lo:")).unwrap();
    assert!(lo.contains(",UP"), "lo is up: {out}");
    let eth = out.lines().find(|l| l.contains(": eth0")).unwrap();
    assert!(eth.contains(",UP") && eth.contains("mtu 1400"), "{out}");
    assert!(out.contains("link/ether 02:00:00:00:00:08"), "{out}");
    assert!(out.contains("inet 10.9.8.7/24"), "{out}");
    assert!(out.contains("inet6 fd00::7/64"), "{out}");
    assert!(out.contains("default via 10.9.8.1 dev eth0"), "{out}");
    assert!(out.contains("192.168.50.0/24 dev eth0"), "{out}");
}

// ---- pods -------------------------------------------------------------------------------

/// A copy of `h`'s rootfs (busybox) at `dir`: a pod's second container has a root of its own.
fn second_rootfs(h: &Host, dir: &str) -> std::path::PathBuf {
    let to = h.dir().join(dir);
    let out = Command::new("cp")
        .arg("-a")
        .arg(h.rootfs())
        .arg(&to)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    to
}

#[test]
fn a_pods_second_container_shares_the_sandboxs_pid_uts_ipc_but_not_its_root() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start_with(Options {
        cgroup: true,
        ..Options::default()
    });
    // The sandbox: its own pid, uts and ipc namespaces, a hostname, then it waits.
    let mut sandbox = config(&["sleep", "1000"]);
    sandbox["hostname"] = json!("the-pod");
    let (sandbox_pid, _) = h.create(&sandbox, Want::OUTPUT).unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    common::wait_until_running(sandbox_pid, &["sleep", "1000"]);
    // The app names them by (host) path, as CRI does; it gets its own mount namespace and
    // root, and writes a file there.
    let app = ContainerRef(1);
    let mut cfg = sh("touch /only-in-app; hostname; ps -o pid,args; \
                      readlink /proc/self/ns/ipc; readlink /proc/1/ns/ipc; test -e /only-in-sandbox || echo apart");
    cfg["linux"]["namespaces"] = json!([
        {"type": "pid", "path": "/proc/4242/ns/pid"},
        {"type": "ipc", "path": "/proc/4242/ns/ipc"},
        {"type": "uts", "path": "/proc/4242/ns/uts"},
        {"type": "mount"}
    ]);
    let rootfs = second_rootfs(&h, "app-rootfs");
    std::fs::write(h.rootfs().join("only-in-sandbox"), "").unwrap();
    let (_, io) = h
        .create_container(
            app,
            Some(ContainerRef::FIRST),
            &rootfs,
            &cfg,
            Want::OUTPUT,
            vec![],
        )
        .unwrap();
    h.ok(Request::Start { container: app });
    assert_eq!(h.wait_exit(ProcessRef::Init(app)), exited(0));
    let out = io.stdout.text();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "the-pod", "{out}");
    // The sandbox's sleep is pid 1 of the shared pid namespace.
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("1 ") && l.contains("sleep 1000")),
        "{out}"
    );
    let ipc: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("ipc:"))
        .copied()
        .collect();
    assert_eq!(ipc.len(), 2, "{out}");
    assert_eq!(ipc[0], ipc[1], "one ipc namespace: {out}");
    assert_eq!(*lines.last().unwrap(), "apart", "{out}");
    assert!(rootfs.join("only-in-app").exists());
    assert!(!h.rootfs().join("only-in-app").exists());
    // Its own cgroup beside the sandbox's.
    let cgroups = h.cgroup_root().unwrap().to_path_buf();
    assert!(cgroups.join("container-1").is_dir());

    // An exec in the second container, then it is removed; the sandbox goes on.
    let app2 = ContainerRef(2);
    let (_, _) = h
        .create_container(
            app2,
            Some(ContainerRef::FIRST),
            &second_rootfs(&h, "app2-rootfs"),
            &config(&["sleep", "1000"]),
            Want::OUTPUT,
            vec![],
        )
        .unwrap();
    h.ok(Request::Start { container: app2 });
    let (_, io) = h
        .exec_in(app2, 7, &json!({"args": ["sh", "-c", "echo in-app2; test -e /only-in-app || echo own-root"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]}), Want::OUTPUT)
        .unwrap();
    assert_eq!(h.wait_exit(ProcessRef::Exec(ExecId(7))), exited(0));
    assert_eq!(io.stdout.text(), "in-app2\nown-root\n");
    h.ok(Request::Freeze {
        container: app2,
        frozen: true,
    });
    assert_eq!(
        std::fs::read_to_string(cgroups.join("container-2/cgroup.freeze"))
            .unwrap()
            .trim(),
        "1"
    );
    h.ok(Request::Freeze {
        container: app2,
        frozen: false,
    });
    h.ok(Request::Remove { container: app2 });
    assert!(!cgroups.join("container-2").exists(), "its cgroup went");
    let e = h.request(Request::Start { container: app2 }).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidState, "{e}");
    let e = h
        .request(Request::Remove {
            container: ContainerRef::FIRST,
        })
        .unwrap_err();
    assert!(e.message.contains("Shutdown"), "{e}");
    assert!(common::alive(sandbox_pid), "the sandbox goes on");
    h.ok(Request::Signal {
        target: SignalTarget::All(ContainerRef::FIRST),
        signal: 9,
    });
    assert!(matches!(
        h.wait_exit(ProcessRef::Init(ContainerRef::FIRST)),
        WaitStatus::Signaled { signal: 9, .. }
    ));
}

#[test]
fn joining_a_namespace_by_path_needs_a_pod() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let mut cfg = config(&["true"]);
    cfg["linux"]["namespaces"] =
        json!([{"type": "ipc", "path": "/proc/1/ns/ipc"}, {"type": "mount"}]);
    let e = h.create(&cfg, Want::OUTPUT).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unsupported);
    assert!(e.message.contains("not part of a pod"), "{e}");
    // Naming a container that is not there.
    let rootfs = h.rootfs();
    let e = h
        .create_container(
            ContainerRef(1),
            Some(ContainerRef::FIRST),
            &rootfs,
            &cfg,
            Want::OUTPUT,
            vec![],
        )
        .unwrap_err();
    assert!(e.message.contains("is not running"), "{e}");
}
