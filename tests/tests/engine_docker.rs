//! Docker runs husk as an added runtime (`dockerd --add-runtime husk=PATH`, `docker run
//! --runtime husk`), with a dockerd the test starts with its own data root, exec root, pid
//! file and socket (see `husk_e2e::engines::Dockerd`). One VM: `docker run --rm` holds the
//! container while the test execs into it, reads its logs, its `docker stats` and its host
//! cgroup, and stops it.
//!
//! The networking checks (default bridge, published ports) are a separate test: Docker 20.10
//! asks for a new network namespace and fills it from a prestart hook, which `husk create`
//! runs once the monitor has made that namespace, the state's `/proc/<pid>/ns/net`.

use husk_e2e::engines::{self, Dockerd, HttpServer, IMAGE, expect_code, expect_ok};
use husk_e2e::{cgroups, husk_binary};

fn prerequisites() -> Option<()> {
    engines::prerequisites("dockerd")
}

/// Polls `docker inspect` until the container's status is `status` (true), or until `gone`
/// says the `docker run` holding it ended (false). Panics after the engine time limit.
fn wait_for_status(docker: &Dockerd, id: &str, status: &str, gone: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + engines::ENGINE_LIMIT;
    loop {
        let out = engines::run(docker.docker(&["inspect", "--format", "{{.State.Status}}", id]));
        if out.code == Some(0) && out.output.trim() == status {
            return true;
        }
        if gone() {
            return false;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} never became {status}: {}\n{}",
            out.output,
            docker.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

#[test]
fn docker_runs_husk_as_an_added_runtime() {
    let Some(()) = prerequisites() else { return };
    let Some(docker) = Dockerd::start(&husk_binary(), false) else {
        return;
    };
    let run = docker.docker(&[
        "run",
        "--rm",
        "--runtime",
        "husk",
        "--network",
        "none",
        "--memory",
        "300m",
        "--name",
        "d1",
        IMAGE,
        "sh",
        "-c",
        "echo started; echo to-stderr >&2; trap 'echo got-term; exit 7' TERM; \
         while true; do sleep 1000 & wait $!; done",
    ]);
    std::thread::scope(|s| {
        let main = s.spawn(move || engines::run(run));
        if !wait_for_status(&docker, "d1", "running", || main.is_finished()) {
            let out = main.join().unwrap();
            panic!(
                "docker run ended ({:?}) before d1 ran:\n{}\n{}",
                out.code,
                out.output,
                docker.log()
            );
        }
        let runtime =
            expect_ok(docker.docker(&["inspect", "--format", "{{.HostConfig.Runtime}}", "d1"]));
        assert_eq!(runtime.trim(), "husk");
        // The host cgroup Docker named (cgroupsPath) holds the VM, bounded by --memory plus
        // what the VM costs, and `docker stats` reads it.
        let stats =
            expect_ok(docker.docker(&["stats", "--no-stream", "--format", "{{.MemUsage}}", "d1"]));
        let pid: u32 = expect_ok(docker.docker(&["inspect", "--format", "{{.State.Pid}}", "d1"]))
            .trim()
            .parse()
            .unwrap();
        let id = expect_ok(docker.docker(&["inspect", "--format", "{{.Id}}", "d1"]));
        eprintln!("docker stats: {}", stats.trim());
        cgroups::check_engine_cgroup("docker stats", &stats, pid, id.trim(), 300 << 20);

        let out = expect_code(
            docker.docker(&["exec", "d1", "sh", "-c", "echo in-exec; exit 4"]),
            4,
        );
        assert!(out.contains("in-exec"), "{out}");

        let logs = expect_ok(docker.docker(&["logs", "d1"]));
        assert!(
            logs.contains("started") && logs.contains("to-stderr"),
            "{logs}"
        );

        // stop: SIGTERM, which the trap turns into exit 7; run --rm returns it.
        expect_ok(docker.docker(&["stop", "-t", "300", "d1"]));
        let main = main.join().unwrap();
        assert_eq!(
            main.code,
            Some(7),
            "docker run:\n{}\n{}",
            main.output,
            docker.log()
        );
        assert!(main.output.contains("got-term"), "{}", main.output);
    });
    let left = expect_ok(docker.docker(&["ps", "-a", "-q"]));
    assert_eq!(left.trim(), "", "containers left: {left}");
    let root = docker.husk_root();
    let husk_left: Vec<_> = std::fs::read_dir(&root)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        husk_left.is_empty(),
        "husk state left in {}: {husk_left:?}",
        root.display()
    );
}

/// The host's address on Docker's default bridge. Docker 20.10 leaves `.IPAM.Config`'s
/// `Gateway` of the default bridge empty, so it is read from the bridge device itself.
fn bridge_gateway(docker: &Dockerd) -> String {
    let inspect = |format: &str| {
        expect_ok(docker.docker(&["network", "inspect", "bridge", "--format", format]))
            .trim()
            .to_owned()
    };
    let gateway = inspect("{{range .IPAM.Config}}{{.Gateway}}{{end}}");
    if !gateway.is_empty() {
        return gateway;
    }
    let device = inspect(r#"{{index .Options "com.docker.network.bridge.name"}}"#);
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", &device])
        .output()
        .expect("running ip");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .unwrap_or_else(|| panic!("no IPv4 address on the bridge {device:?}: {text}"))
        .to_owned()
}

#[test]
fn docker_bridge_network_reaches_the_host_and_publishes_a_port() {
    let Some(()) = prerequisites() else { return };
    let Some(docker) = Dockerd::start(&husk_binary(), true) else {
        return;
    };
    // The container fetches from a server on the host side of docker0...
    let server = HttpServer::start("hello-from-the-host\n");
    let gateway = bridge_gateway(&docker);
    let url = format!("http://{gateway}:{}/", server.port());
    let out = expect_ok(docker.docker(&[
        "run",
        "--rm",
        "--runtime",
        "husk",
        IMAGE,
        "wget",
        "-q",
        "-O",
        "-",
        &url,
    ]));
    assert!(out.contains("hello-from-the-host"), "{out}");
    // ...and the host reaches a server in a container through a published port.
    expect_ok(docker.docker(&[
        "run",
        "-d",
        "--runtime",
        "husk",
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
    let mapping = expect_ok(docker.docker(&["port", "web", "8080"]));
    let port: u16 = mapping
        .lines()
        .next()
        .and_then(|l| l.trim().rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("docker port: {mapping}"));
    let body = engines::http_get_local(port).unwrap_or_else(|e| panic!("GET :{port}: {e}"));
    assert!(body.contains("served-from-the-container"), "{body}");
    expect_ok(docker.docker(&["rm", "-f", "web"]));
}

#[test]
fn docker_on_overlay2_with_a_monitor_of_its_own_uid() {
    let Some(()) = prerequisites() else { return };
    // husk as it is (its monitor gets a uid of its own by default), and the overlay2 driver:
    // the rootfs is an overlay mount, which the monitor mounts anew on idmapped layers.
    let husk = husk_e2e::husk_binary();
    let Some(docker) = Dockerd::start_with(&husk, false, "overlay2") else {
        return;
    };
    expect_ok(docker.docker(&[
        "run",
        "-d",
        "--runtime",
        "husk",
        "--network",
        "none",
        "--name",
        "u1",
        IMAGE,
        "sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 1000 & wait $!; done",
    ]));
    let out = expect_ok(docker.docker(&["exec", "u1", "sh", "-c", engines::UID_WRITES]));
    let pid = expect_ok(docker.docker(&["inspect", "--format", "{{.State.Pid}}", "u1"]));
    let upper = expect_ok(docker.docker(&[
        "inspect",
        "--format",
        "{{.GraphDriver.Data.UpperDir}}",
        "u1",
    ]));
    engines::check_uid_writes(&out, &pid, &upper);
    // husk's work directory, in the layer's.
    let work = std::path::Path::new(upper.trim())
        .parent()
        .unwrap()
        .join("work");
    let husk_work: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("husk-"))
        .collect();
    assert_eq!(husk_work.len(), 1, "husk's work directory: {husk_work:?}");
    // TERM, which the container acts on (a KILL would leave the VM's power-off to race
    // dockerd's short wait).
    expect_ok(docker.docker(&["stop", "-t", "60", "u1"]));
    expect_ok(docker.docker(&["rm", "u1"]));
    let left: Vec<_> = std::fs::read_dir(docker.husk_root())
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "husk state left: {left:?}");
}
