//! Pods through the CRI, as kubelet makes them: containerd's CRI plugin started by the test
//! (`husk_e2e::cri::Cri`: its own containerd, pause image, CNI bridge) and driven over gRPC.
//!
//! Every check takes the runtime handler and runs with `runc` and with `husk`: the same
//! checks, so what a pod does under runc is what it does in one VM (the sandbox's pause
//! container owns it; each later container is created inside it, see `husk`'s `oci::pod`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use husk_e2e::cgroups;
use husk_e2e::cri::api::ContainerState;
use husk_e2e::cri::{Cri, Handler, IDLE, POD_MEMORY_LIMIT, Pod};
use husk_e2e::engines;

/// How long a container may take to do what a check waits for (a husk start boots a VM).
const LIMIT: Duration = engines::ENGINE_LIMIT;

/// How long a pod's teardown may take to leave nothing behind (shims exit after it).
const CLEAN_LIMIT: Duration = Duration::from_secs(60);

/// The server: busybox httpd serving /www (the test image's index.html) on port 8080, under a
/// shell that ends on SIGTERM.
const SERVE: &[&str] = &[
    "sh",
    "-c",
    "trap 'exit 0' TERM; httpd -f -p 8080 -h /www & wait",
];

/// What the server serves.
const BODY: &str = "served-from-the-container\n";

/// ExecSync of `cmd` in `id`, asserted to exit `code`; its stdout.
fn exec(cri: &Cri, id: &str, cmd: &[&str], code: i32) -> String {
    let out = cri
        .exec_sync(id, cmd, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.exit_code, code, "{cmd:?} in {id}: {out:?}");
    out.stdout
}

/// The command line of pid 1 as container `id` sees it, spaces between the arguments.
fn pid1(cri: &Cri, id: &str) -> String {
    exec(cri, id, &["cat", "/proc/1/cmdline"], 0)
        .trim_end_matches('\0')
        .replace('\0', " ")
}

/// Stops and removes `pod` and waits until nothing of it is left.
fn remove_pod_leaving_nothing(cri: &Cri, pod: &Pod) {
    let t = Instant::now();
    cri.stop_pod(pod).unwrap();
    cri.remove_pod(pod).unwrap();
    if let Err(left) = cri.wait_clean(CLEAN_LIMIT) {
        panic!("pod {} ({:?}) {left}", pod.name, pod.handler);
    }
    eprintln!(
        "pod {} stopped, removed, clean in {:?}",
        pod.name,
        t.elapsed()
    );
}

/// kubelet's pod cgroup holds the whole pod, so its limits bound it: every thread of the
/// sandbox's process (with husk, the pod VM's monitor, vCPUs included) and of each container's
/// (with husk, the process that stands for it) is in a cgroup below the pod's, in the memory,
/// cpu and pids hierarchies, and the pod's memory limit is the one kubelet set.
fn assert_pod_in_its_cgroup(cri: &Cri, pod: &Pod, containers: &[&str]) {
    if !cgroups::is_v1() {
        eprintln!("skipping the pod cgroup check: the host has no v1 hierarchies");
        return;
    }
    let mut pids = vec![pod.pid.expect("the sandbox's pid")];
    for id in containers {
        pids.push(cri.container_pid(id).unwrap().expect("the container's pid"));
    }
    for controller in ["memory", "cpu", "pids"] {
        let dir = cri.pod_cgroup(pod, controller).unwrap();
        for &pid in &pids {
            for tid in cgroups::threads_of(pid) {
                let inside = cgroups::tasks_below(&dir);
                // A thread that ended since the listing is in no cgroup.
                let alive = std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists();
                assert!(
                    inside.contains(&tid) || !alive,
                    "thread {tid} of {pid} is outside the pod's cgroup {}",
                    dir.display()
                );
            }
        }
    }
    let memory = cri.pod_cgroup(pod, "memory").unwrap();
    assert_eq!(
        cgroups::read(&memory, "memory.limit_in_bytes"),
        POD_MEMORY_LIMIT.to_string()
    );
    let used: u64 = cgroups::read(&memory, "memory.usage_in_bytes")
        .parse()
        .unwrap();
    eprintln!(
        "{:?}: pod {} uses {} MiB of its cgroup's memory",
        pod.handler,
        pod.name,
        used >> 20
    );
    assert!(
        used > 0,
        "the pod's cgroup {} holds no memory",
        memory.display()
    );
}

/// A pod of two containers, one serving HTTP and one fetching from it over localhost (the
/// pod's network namespace); the host fetches from the pod's IP. Each container has its own
/// pid namespace and root filesystem, both the pod's hostname; ExecSync works in each; the pod
/// lives in the cgroup kubelet made for it. One is
/// stopped and removed while the other keeps running; then the pod is stopped and removed
/// with a container still running, and nothing is left.
fn pod_of_two_containers(handler: Handler) {
    let Some(cri) = Cri::for_handler(handler) else {
        return;
    };
    let t = Instant::now();
    let pod = cri.run_pod("web", handler).unwrap();
    let server = cri.run_container(&pod, "server", SERVE).unwrap();
    let client = cri.run_container(&pod, "client", IDLE).unwrap();
    eprintln!(
        "{handler:?}: a pod of 2 running containers in {:?}",
        t.elapsed()
    );
    assert_pod_in_its_cgroup(&cri, &pod, &[&server, &client]);

    let fetch = &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"];
    let got = cri.exec_until_ok(&client, fetch, LIMIT).unwrap();
    assert_eq!(got.stdout, BODY, "{got:?}");
    let reply = engines::http_get(SocketAddr::new(pod.ip, 8080))
        .unwrap_or_else(|e| panic!("GET {}:8080 from the host: {e}", pod.ip));
    assert!(reply.ends_with(BODY), "{reply}");

    for id in [&server, &client] {
        assert_eq!(exec(&cri, id, &["hostname"], 0).trim(), "web");
    }
    // One kernel for the pod: the host's with runc, the pod's VM's with husk.
    let boot_id = |id: &str| exec(&cri, id, &["cat", "/proc/sys/kernel/random/boot_id"], 0);
    let pod_kernel = boot_id(&server);
    assert_eq!(boot_id(&client), pod_kernel);
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(pod_kernel == host_kernel, handler == Handler::Runc);
    // Each container is pid 1 of a namespace of its own (not the sandbox's either).
    assert!(
        pid1(&cri, &server).contains("httpd -f"),
        "{}",
        pid1(&cri, &server)
    );
    assert!(
        pid1(&cri, &client).contains("while true"),
        "{}",
        pid1(&cri, &client)
    );
    // A file made in one root filesystem is not in the other.
    exec(&cri, &server, &["touch", "/made-in-server"], 0);
    exec(&cri, &server, &["sh", "-c", "[ -e /made-in-server ]"], 0);
    exec(&cri, &client, &["sh", "-c", "[ -e /made-in-server ]"], 1);

    cri.stop_container(&server, Duration::from_secs(30))
        .unwrap();
    let stopped = cri
        .wait_container_state(&server, ContainerState::ContainerExited, LIMIT)
        .unwrap();
    assert_eq!(stopped.exit_code, 0, "the server's trap: {stopped:?}");
    cri.remove_container(&server).unwrap();
    let gone = cri.container_status(&server).unwrap_err();
    assert_eq!(gone.code, tonic::Code::NotFound, "{gone}");
    let client_status = cri.container_status(&client).unwrap();
    assert_eq!(
        client_status.state,
        ContainerState::ContainerRunning as i32,
        "{client_status:?}"
    );
    let refused = cri
        .exec_sync(&client, fetch, Duration::from_secs(60))
        .unwrap();
    assert_ne!(refused.exit_code, 0, "the server is gone: {refused:?}");
    assert_eq!(pid1(&cri, &client), IDLE.join(" "));

    remove_pod_leaving_nothing(&cri, &pod);
}

/// ContainerStatus gives a container's exit code (its own, and 137 for a SIGKILL at the end of
/// StopContainer's grace period); ExecSync gives a command's output and exit code.
fn exit_codes(handler: Handler) {
    let Some(cri) = Cri::for_handler(handler) else {
        return;
    };
    let pod = cri.run_pod("codes", handler).unwrap();
    let fails = cri
        .run_container(&pod, "fails", &["sh", "-c", "echo bye; exit 3"])
        .unwrap();
    let stubborn = cri
        .run_container(&pod, "stubborn", &["sleep", "1000"])
        .unwrap();

    let status = cri
        .wait_container_state(&fails, ContainerState::ContainerExited, LIMIT)
        .unwrap();
    if status.exit_code != 3 {
        // What the kernel said about it (a fault is logged there), for the failure below.
        let log = cri.exec_sync(&stubborn, &["busybox", "dmesg"], Duration::from_secs(60));
        eprintln!("the kernel's log, from the pod's other container: {log:?}");
    }
    assert_eq!(status.exit_code, 3, "{status:?}");
    assert_eq!(status.reason, "Error", "{status:?}");
    let log = cri.container_log(&pod, "fails");
    assert!(log.contains("stdout F bye"), "the container's log: {log:?}");

    let out = cri
        .exec_sync(
            &stubborn,
            &["sh", "-c", "echo out; echo err >&2; exit 5"],
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str(), out.exit_code),
        ("out\n", "err\n", 5)
    );
    // sleep, pid 1 of its pid namespace, ignores SIGTERM: SIGKILL after the grace period.
    cri.stop_container(&stubborn, Duration::from_secs(1))
        .unwrap();
    let status = cri
        .wait_container_state(&stubborn, ContainerState::ContainerExited, LIMIT)
        .unwrap();
    assert_eq!(status.exit_code, 137, "{status:?}");

    remove_pod_leaving_nothing(&cri, &pod);
}

/// A pod sandbox alone: ready, with an address in the harness's pod network, and seen by the
/// teardown check while it runs; stopped and removed, nothing is left.
fn sandbox_alone(handler: Handler) {
    let Some(cri) = Cri::for_handler(handler) else {
        return;
    };
    let t = Instant::now();
    let pod = cri.run_pod("alone", handler).unwrap();
    eprintln!("{handler:?}: a pod sandbox ready in {:?}", t.elapsed());
    let status = cri.pod_status(&pod).unwrap();
    assert_eq!(
        status.state,
        husk_e2e::cri::api::PodSandboxState::SandboxReady as i32
    );
    assert_eq!(status.runtime_handler, handler.name());
    let gateway = cri.gateway().octets();
    match pod.ip {
        std::net::IpAddr::V4(ip) => {
            assert_eq!(
                ip.octets()[..3],
                gateway[..3],
                "{ip} not in the pod network"
            );
            assert_ne!(ip.octets(), gateway);
        }
        ip => panic!("an IPv6 pod address {ip}"),
    }
    // What the teardown check looks for is there while the pod runs: it can fail.
    let running = cri.leftovers();
    for kind in [
        "pod ",
        "process ",
        "mount ",
        "state ",
        "interface ",
        "address ",
        "CNI result ",
    ] {
        assert!(
            running.iter().any(|l| l.starts_with(kind)),
            "no {kind:?} while the pod runs: {running:#?}"
        );
    }
    remove_pod_leaving_nothing(&cri, &pod);
}

#[test]
fn runc_pod_of_two_containers() {
    pod_of_two_containers(Handler::Runc);
}

#[test]
fn runc_exit_codes() {
    exit_codes(Handler::Runc);
}

#[test]
fn runc_sandbox_alone() {
    sandbox_alone(Handler::Runc);
}

/// The sandbox is one husk container (the pause image in a VM, its NIC plumbed into the
/// pod's network namespace); it starts, stops and is removed without a trace.
#[test]
fn husk_sandbox_alone() {
    sandbox_alone(Handler::Husk);
}

/// Two containers in the pod's one VM: localhost between them, the pod's IP from the host,
/// the pod's hostname, their own pid namespaces and root filesystems, one removed while the
/// other runs.
#[test]
fn husk_pod_of_two_containers() {
    pod_of_two_containers(Handler::Husk);
}

#[test]
fn husk_exit_codes() {
    exit_codes(Handler::Husk);
}
