//! podman runs husk unchanged (`--runtime PATH`), with its own storage and configuration
//! (see `husk_e2e::engines::Podman`). VM boots are few on purpose (~35 s each on nested
//! kvm_pvm): one long-running container carries exec, logs, kill, stop, volumes, env, user and
//! resource limits; a second checks `run --rm -it` and exit codes. `rm -f` of a running
//! container has its own test.
//!
//! The networking checks (default bridge, published ports) are separate tests.

use std::process::Command;

use husk_e2e::engines::{self, HttpServer, IMAGE, Podman, expect_code, expect_ok};
use husk_e2e::{TempDir, cgroups, husk_binary};

/// Root, KVM and the guest image, or a skip.
fn prerequisites() -> Option<()> {
    engines::prerequisites("engine storage")
}

/// `cmd` as one shell line (for `script -c`), its environment included.
fn shell_line(cmd: &Command) -> String {
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
    let mut words: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), quote(v))))
        .collect();
    words.push(quote(cmd.get_program()));
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

/// Nothing of husk's is left once podman removed its containers. podman deletes from the
/// runtime in `rm` or in the cleanup process conmon starts when a container ends, which may
/// still be running: poll (up to the engine limit) rather than look once.
fn assert_no_husk_containers(podman: &Podman) {
    let deadline = std::time::Instant::now() + engines::ENGINE_LIMIT;
    loop {
        let left: Vec<String> = std::fs::read_dir(podman.husk_root())
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "husk state left behind: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

#[test]
fn podman_runs_husk_containers() {
    let Some(()) = prerequisites() else { return };
    let husk = husk_binary();
    let Some(podman) = Podman::new(&husk) else {
        return;
    };
    let tmp = TempDir::new("podman-vol");
    let vol = tmp.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    // The container runs as 1000:1000 and writes into the volume.
    std::fs::set_permissions(&vol, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::write(vol.join("from-host"), "volume-data\n").unwrap();
    let volume = format!("{}:/vol", vol.display());

    expect_ok(podman.with(&[
        "run",
        "-d",
        "--name",
        "c1",
        "--network",
        "none",
        "--user",
        "1000:1000",
        "-v",
        &volume,
        "--env",
        "FOO=bar",
        "--memory",
        "300m",
        "--cpus",
        "2",
        IMAGE,
        "sh",
        "-c",
        // `wait` returns as soon as a trapped signal comes (a `sleep 1` loop would run the
        // trap only once that sleep ends, seconds later in this guest, and keep its vCPU busy
        // starting processes meanwhile).
        "echo started; echo to-stderr >&2; trap 'echo got-usr1' USR1; \
         trap 'echo got-term; exit 7' TERM; while true; do sleep 1000 & wait $!; done",
    ]));

    // exec: the container's env, user, volume, and the limits as the VM shows them; its exit
    // code comes back.
    let out = expect_code(
        podman.with(&[
            "exec",
            "c1",
            "sh",
            "-c",
            "echo FOO=$FOO; id -u; cat /vol/from-host; echo from-container > /vol/from-container; \
             echo nproc=$(nproc); head -1 /proc/meminfo; exit 5",
        ]),
        5,
    );
    assert!(out.contains("FOO=bar"), "{out}");
    assert!(
        out.contains("\n1000\n") || out.starts_with("1000\n"),
        "uid: {out}"
    );
    assert!(out.contains("volume-data"), "{out}");
    assert_eq!(
        std::fs::read_to_string(vol.join("from-container")).unwrap(),
        "from-container\n"
    );
    // --cpus 2: two vCPUs. --memory 300m: the VM has the limit plus husk's overhead (64 MiB),
    // less what the guest kernel keeps.
    assert!(out.contains("nproc=2"), "{out}");
    let mem_kib: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {out}"));
    assert!(
        (300 * 1024..=364 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} kB for --memory 300m"
    );
    // The host cgroup podman named (cgroupsPath) holds the VM, bounded by --memory plus what
    // the VM costs, with --cpus as its quota; `podman stats` reads it; `podman update` changes
    // the limits there and in the guest, and refuses what would grow the VM. (podman 4.3's
    // update has no --pids-limit; the pids limit is checked through husk in host_cgroups.)
    let host_cgroup = check_host_cgroup(&podman, "c1", 300 << 20);
    expect_ok(podman.with(&["update", "--memory", "200m", "--cpu-shares", "512", "c1"]));
    if let Some(dirs) = &host_cgroup {
        assert_eq!(cgroups::read(&dirs[2], "cpu.shares"), "512");
        // The host's memory bound stays the VM's.
        assert_eq!(
            cgroups::read(&dirs[0], "memory.limit_in_bytes"),
            cgroups::host_memory_limit(300 << 20).to_string()
        );
    }
    // In the guest: the memory limit, and shares 512 as cgroup v2's weight (runc's mapping).
    let guest = expect_ok(podman.with(&[
        "exec",
        "c1",
        "sh",
        "-c",
        "read l < /proc/self/cgroup; d=/sys/fs/cgroup${l#0::}; cat $d/memory.max $d/cpu.weight",
    ]));
    assert_eq!(guest, format!("{}\n20\n", 200u64 << 20));
    let out = expect_code(podman.with(&["update", "--memory", "4g", "c1"]), 125);
    assert!(
        out.contains("linux.resources.memory.limit") && out.contains("does not grow"),
        "{out}"
    );
    // exec --user overrides the container's user.
    let out = expect_ok(podman.with(&["exec", "--user", "0", "c1", "id", "-u"]));
    assert_eq!(out.trim(), "0");
    // exec of something that is not there: podman's "not found" exit code.
    let out = expect_code(podman.with(&["exec", "c1", "/no/such/program"]), 127);
    assert!(out.contains("/no/such/program"), "{out}");

    // kill delivers a signal without ending it; logs has both streams. The trap's line is
    // waited for: a TERM that came before the shell ran the USR1 trap could end it first.
    expect_ok(podman.with(&["kill", "-s", "USR1", "c1"]));
    let deadline = std::time::Instant::now() + engines::ENGINE_LIMIT;
    loop {
        let logs = expect_ok(podman.with(&["logs", "c1"]));
        if logs.lines().any(|l| l == "got-usr1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the USR1 trap never ran:\n{logs}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // stop: SIGTERM, which the trap turns into exit 7.
    expect_ok(podman.with(&["stop", "-t", "300", "c1"]));
    let status = expect_ok(podman.with(&[
        "inspect",
        "c1",
        "--format",
        "{{.State.Status}} {{.State.ExitCode}}",
    ]));
    assert_eq!(status.trim(), "exited 7");
    let logs = expect_ok(podman.with(&["logs", "c1"]));
    for line in ["started", "to-stderr", "got-usr1", "got-term"] {
        assert!(
            logs.lines().any(|l| l == line),
            "{line:?} not in logs:\n{logs}"
        );
    }
    expect_ok(podman.with(&["rm", "c1"]));
    // The container's cgroup went with it.
    for dir in host_cgroup.iter().flatten() {
        assert!(!dir.exists(), "{} is left after rm", dir.display());
    }

    // run --rm -it on a terminal (script gives podman a pty): the process's stdio is a
    // terminal, its exit code is podman's, and nothing is left.
    let out = run_it(&podman, "ls -l /proc/self/fd/0; exit 3", 3);
    assert!(out.contains("-> /dev/pts/"), "no terminal: {out}");
    let ps = expect_ok(podman.with(&["ps", "-a", "-q"]));
    assert_eq!(ps.trim(), "", "--rm left: {ps}");
    assert_no_husk_containers(&podman);
}

#[test]
fn podman_rm_force_removes_a_running_container() {
    let Some(()) = prerequisites() else { return };
    let Some(podman) = Podman::new(&husk_binary()) else {
        return;
    };
    // rm -f of a running container ends its VM. (Booted after c1 is gone, not alongside it:
    // podman gives a create 240 s, which two VMs booting at once on a busy machine can miss.)
    // `-t 60`, not `-t 0`: after SIGKILL podman waits only 5 s for the container's pid, and
    // that pid (the monitor) ends when the VM has powered off, which on a busy nested host
    // can take longer (a known limit); a TERM the process acts on exercises the same removal.
    expect_ok(podman.with(&[
        "run",
        "-d",
        "--name",
        "doomed",
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        "trap 'exit 0' TERM; echo trap-set; while true; do sleep 1000 & wait $!; done",
    ]));
    // A TERM that comes before the trap is set is lost (pid 1 ignores it by default).
    let deadline = std::time::Instant::now() + engines::ENGINE_LIMIT;
    while !expect_ok(podman.with(&["logs", "doomed"])).contains("trap-set") {
        assert!(
            std::time::Instant::now() < deadline,
            "doomed never set its trap"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let state = expect_ok(podman.with(&["inspect", "doomed", "--format", "{{.State.Status}}"]));
    assert_eq!(state.trim(), "running");
    expect_ok(podman.with(&["rm", "-f", "-t", "60", "doomed"]));
    let ps = expect_ok(podman.with(&["ps", "-a", "-q"]));
    assert_eq!(ps.trim(), "", "containers left: {ps}");
    assert_no_husk_containers(&podman);
}

/// Checks the host cgroup of podman's container `name` (created with `--memory limit` and
/// `--cpus 2`) and that `podman stats` reads its memory (see `cgroups::check_engine_cgroup`);
/// returns its memory, pids and cpu directories (`None` on a v2 host).
fn check_host_cgroup(podman: &Podman, name: &str, limit: u64) -> Option<[std::path::PathBuf; 3]> {
    let stats =
        expect_ok(podman.with(&["stats", "--no-stream", "--format", "{{.MemUsage}}", name]));
    let pid: u32 = expect_ok(podman.with(&["inspect", name, "--format", "{{.State.Pid}}"]))
        .trim()
        .parse()
        .unwrap();
    let id = expect_ok(podman.with(&["inspect", name, "--format", "{{.Id}}"]));
    let dirs = cgroups::check_engine_cgroup("podman stats", &stats, pid, id.trim(), limit)?;
    assert_eq!(cgroups::read(&dirs[2], "cpu.cfs_quota_us"), "200000");
    Some(dirs)
}

/// `podman run --rm -it IMAGE sh -c SCRIPT` under `script` (a pty for podman); asserts the
/// exit code and returns the output.
fn run_it(podman: &Podman, script_text: &str, code: i32) -> String {
    let it = podman.with(&[
        "run",
        "--rm",
        "-it",
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        script_text,
    ]);
    let mut script = Command::new("script");
    script.args(["-q", "-e", "-c", &shell_line(&it), "/dev/null"]);
    expect_code(script, code)
}

#[test]
fn podman_it_terminal_has_a_name_in_the_container() {
    let Some(()) = prerequisites() else { return };
    let Some(podman) = Podman::new(&husk_binary()) else {
        return;
    };
    let out = run_it(&podman, "tty", 0);
    assert!(out.contains("/dev/pts/"), "{out}");
}

#[test]
fn podman_bad_runtime_input_is_reported() {
    // A bundle that husk refuses reaches podman's user as husk's own message.
    let Some(()) = prerequisites() else { return };
    let Some(podman) = Podman::new(&husk_binary()) else {
        return;
    };
    let out = engines::run(podman.with(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--annotation",
        "io.husk.vm.vcpus=many",
        IMAGE,
        "true",
    ]));
    assert!(out.code.is_some_and(|c| c != 0), "{out:?}");
    assert!(
        out.output.contains("io.husk.vm.vcpus=\"many\""),
        "{}",
        out.output
    );
    assert_no_husk_containers(&podman);
}

#[test]
fn podman_bridge_network_reaches_a_server_on_the_host() {
    let Some(()) = prerequisites() else { return };
    let Some(podman) = Podman::new(&husk_binary()) else {
        return;
    };
    let server = HttpServer::start("hello-from-the-host\n");
    // The default network's gateway is the host side of podman's bridge.
    let gateway = expect_ok(podman.with(&[
        "network",
        "inspect",
        "podman",
        "--format",
        "{{range .Subnets}}{{.Gateway}}{{end}}",
    ]));
    let url = format!("http://{}:{}/", gateway.trim(), server.port());
    let out = expect_ok(podman.with(&["run", "--rm", IMAGE, "wget", "-q", "-O", "-", &url]));
    assert!(out.contains("hello-from-the-host"), "{out}");
}

#[test]
fn podman_publishes_a_port_of_the_container() {
    let Some(()) = prerequisites() else { return };
    let Some(podman) = Podman::new(&husk_binary()) else {
        return;
    };
    expect_ok(podman.with(&[
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        "127.0.0.1::8080",
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]));
    let mapping = expect_ok(podman.with(&["port", "web", "8080"]));
    let port: u16 = mapping
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("podman port: {mapping}"));
    let body = engines::http_get_local(port).unwrap_or_else(|e| panic!("GET :{port}: {e}"));
    assert!(body.contains("served-from-the-container"), "{body}");
    // Not asserted: after SIGKILL podman waits only 5 s for the monitor, which outlives the
    // process until the VM has powered off (a known limit); the Podman guard removes it anyway.
    let _ = engines::run(podman.with(&["rm", "-f", "-t", "0", "web"]));
}

#[test]
fn podman_on_overlay_storage_with_a_monitor_of_its_own_uid() {
    let Some(()) = prerequisites() else { return };
    // podman's overlay driver: the rootfs is an overlay mount, which the monitor (a uid of
    // its own, the default) mounts anew on idmapped layers.
    let Some(podman) = Podman::configured(&husk_binary(), "overlay", &[]) else {
        return;
    };
    expect_ok(podman.with(&[
        "run",
        "-d",
        "--name",
        "u1",
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 1000 & wait $!; done",
    ]));
    let out = expect_ok(podman.with(&["exec", "u1", "sh", "-c", engines::UID_WRITES]));
    let pid = expect_ok(podman.with(&["inspect", "u1", "--format", "{{.State.Pid}}"]));
    let upper = expect_ok(podman.with(&[
        "inspect",
        "u1",
        "--format",
        "{{.GraphDriver.Data.UpperDir}}",
    ]));
    engines::check_uid_writes(&out, &pid, &upper);
    expect_ok(podman.with(&["rm", "-f", "-t", "60", "u1"]));
    assert_no_husk_containers(&podman);
}

/// A podman pod is one VM: its infra container owns it, and the pod's containers, which podman
/// puts in the infra container's network namespace, are created in it (husk matches them by
/// that namespace). They reach each other on localhost, each with its own root filesystem,
/// and removing the pod leaves nothing.
#[test]
fn podman_pod_is_one_vm() {
    let Some(()) = prerequisites() else { return };
    let Some(podman) = Podman::new(&husk_binary()) else {
        return;
    };
    expect_ok(podman.with(&[
        "pod",
        "create",
        "--name",
        "p1",
        "--network",
        "none",
        "--infra-image",
        IMAGE,
        "--infra-command",
        "sleep 100000",
    ]));
    expect_ok(podman.with(&[
        "run",
        "-d",
        "--pod",
        "p1",
        "--name",
        "server",
        IMAGE,
        "sh",
        "-c",
        "trap 'exit 0' TERM; httpd -f -p 8080 -h /www & wait",
    ]));
    expect_ok(podman.with(&[
        "run",
        "-d",
        "--pod",
        "p1",
        "--name",
        "client",
        IMAGE,
        "sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 1000 & wait $!; done",
    ]));
    // Three containers, one VM: the guest kernel's boot id is the same in each.
    let boot_id = |name: &str| {
        expect_ok(podman.with(&["exec", name, "cat", "/proc/sys/kernel/random/boot_id"]))
    };
    let infra =
        expect_ok(podman.with(&["pod", "inspect", "p1", "--format", "{{.InfraContainerID}}"]));
    let infra = infra.trim();
    let vm = boot_id(infra);
    assert_eq!(boot_id("server"), vm);
    assert_eq!(boot_id("client"), vm);
    let mut fetch = podman.cmd();
    fetch.args(["exec", "client", "sh", "-c"]).arg(
        "i=0; while [ $i -lt 30 ]; do wget -q -O - http://127.0.0.1:8080/ && exit 0; \
         sleep 1; i=$((i + 1)); done; exit 1",
    );
    assert_eq!(expect_ok(fetch), "served-from-the-container\n");
    expect_ok(podman.with(&["exec", "server", "touch", "/made-in-server"]));
    expect_code(
        podman.with(&["exec", "client", "sh", "-c", "[ -e /made-in-server ]"]),
        1,
    );
    let on_host = std::fs::read_dir(podman.husk_root()).unwrap().count();
    assert_eq!(on_host, 3, "a husk container each, on the host");

    expect_ok(podman.with(&["pod", "rm", "-f", "-t", "0", "p1"]));
    assert_no_husk_containers(&podman);
}
