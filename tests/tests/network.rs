//! The container's network: the test plays the engine (a network namespace with a veth,
//! addresses and a default route, named in the spec), and checks both directions through the
//! VM's virtio-net device with one VM boot: the container fetches 1 MiB from an HTTP server
//! on the host side, and the host fetches a page and the same 1 MiB back from busybox httpd
//! in the container. Then
//! nothing of husk's is left in the namespace, and it is as the engine made it.
//!
//! Needs root, /dev/kvm, the guest image, busybox-static and iproute2 (`ip`, `tc`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use husk_e2e::{
    ContainerRoot, TempDir, busybox_bundle, guest_image, husk, husk_binary, is_root, kvm_available,
    skip,
};

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn has_iproute2() -> bool {
    Command::new("ip").arg("-V").output().is_ok() && Command::new("tc").arg("-V").output().is_ok()
}

/// What an engine makes: a namespace with `eth0` (`<subnet>.2/24`, default route via
/// `<subnet>.1`), its veth peer in the host namespace with `<subnet>.1/24`. Deleted on drop.
struct EngineNetns {
    name: String,
    subnet: String,
}

impl EngineNetns {
    fn new(tag: &str) -> Self {
        let pid = std::process::id();
        let name = format!("husk-e2e-{tag}-{pid}");
        // Unique per process and test, away from the subnets the unit tests use.
        let subnet = format!(
            "10.{}.{}",
            200 + pid % 50,
            (pid / 50 + u32::from(tag.as_bytes()[0])) % 250
        );
        let host_end = format!("hn{}{}", &tag[..2], pid % 100_000);
        let ns = Self { name, subnet };
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}.1/24", ns.subnet),
            "dev",
            &host_end,
        ]);
        ip(&["link", "set", &host_end, "up"]);
        ns.ip(&["addr", "add", &format!("{}.2/24", ns.subnet), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &format!("{}.1", ns.subnet),
        ]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn tc(&self, args: &[&str]) -> String {
        let out = Command::new("tc")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("running tc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for EngineNetns {
    fn drop(&mut self) {
        // Deleting the namespace deletes eth0 and with it the host end.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Adds the applets the test uses and names `netns` as the network namespace.
fn network_bundle(dir: &Path, script: &str, netns: Option<&Path>) -> Option<PathBuf> {
    let bundle = busybox_bundle(dir, &["sh", "-c", script])?;
    for applet in ["wget", "httpd", "nc", "ip", "wc", "mkdir", "date"] {
        let link = bundle.join("rootfs/bin").join(applet);
        // busybox_bundle already links some of them.
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link).unwrap();
        }
    }
    let path = bundle.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut ns = serde_json::json!({"type": "network"});
    if let Some(p) = netns {
        ns["path"] = p.to_str().unwrap().into();
    }
    v["linux"]["namespaces"].as_array_mut().unwrap().push(ns);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    Some(bundle)
}

/// Serves `body` to every GET until the listener is dropped with the process; reports how
/// long each transfer took, from accepting the connection to the last byte written.
fn serve(listener: TcpListener, body: Vec<u8>, took: std::sync::mpsc::Sender<Duration>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let start = Instant::now();
            let mut request = [0u8; 1024];
            let _ = conn.read(&mut request);
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                body.len()
            );
            if conn.write_all(head.as_bytes()).is_ok() && conn.write_all(&body).is_ok() {
                let _ = conn.shutdown(std::net::Shutdown::Write);
                // Wait for the client to close: the data has then arrived.
                let _ = conn.read(&mut request);
                let _ = took.send(start.elapsed());
            }
        }
    });
}

#[test]
fn container_reaches_the_host_and_the_host_reaches_the_container() {
    if guest_image().is_none() {
        return;
    }
    if !kvm_available() || !is_root() || !has_iproute2() {
        skip::<()>("needs /dev/kvm, root and iproute2");
        return;
    }
    let ns = EngineNetns::new("both");
    let mac_before = ns.ip(&["-o", "link", "show", "eth0"]);
    let mac = mac_before
        .split("link/ether ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_owned();
    let host_ip = format!("{}.1", ns.subnet);
    let guest_ip = format!("{}.2", ns.subnet);

    // The host's HTTP server: 1 MiB of a known pattern.
    let body: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let listener = TcpListener::bind(format!("{host_ip}:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (took_tx, took) = channel();
    serve(listener, body.clone(), took_tx);

    let script = format!(
        "ip -o addr show dev eth0; ip route; \
         wget -q -O /tmp/f http://{host_ip}:{port}/file && echo WGET-BYTES $(wc -c < /tmp/f); \
         mkdir /tmp/www && echo hello-from-the-vm > /tmp/www/index.html && cp /tmp/f /tmp/www/big; \
         nc -l -p 9000 > /tmp/bye & NC=$!; \
         httpd -p 8080 -h /tmp/www && echo READY; \
         wait $NC; echo GOT $(cat /tmp/bye)"
    );
    let tmp = TempDir::new("net-both");
    let root = tmp.path().join("state");
    let _cleanup = ContainerRoot(root.clone());
    let bundle_dir = tmp.path().join("bundle");
    std::fs::create_dir_all(&bundle_dir).unwrap();
    let Some(bundle) = network_bundle(&bundle_dir, &script, Some(&ns.path())) else {
        return;
    };
    let mut child = Command::new(husk_binary())
        .arg("--root")
        .arg(&root)
        .args(["run", "net1", "--bundle"])
        .arg(&bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut output = Vec::new();
    // Boot (~30-50 s on nested kvm_pvm) and 1 MiB at a few hundred KB/s.
    let wait = Duration::from_secs(400);
    loop {
        match lines.recv_timeout(wait) {
            Ok(line) => {
                let ready = line == "READY";
                output.push(line);
                if ready {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "the container never got ready; stdout {output:#?}\nstderr {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    let text = output.join("\n");
    assert!(
        text.contains(&format!("inet {guest_ip}/24")),
        "eth0 has the veth's address: {text}"
    );
    assert!(text.contains(&format!("default via {host_ip}")), "{text}");
    assert!(
        text.contains(&format!("WGET-BYTES {}", body.len())),
        "the container fetched the host's file: {text}"
    );
    let wget_time = took.recv_timeout(Duration::from_secs(5)).unwrap();
    // Frames the tap handed the VM so far (with TSO, far fewer than 1 MiB / 1500).
    let stats = ns.ip(&["-s", "-o", "link", "show", "tap0_husk"]);
    eprintln!("network: tap0_husk after the transfer: {stats}");

    // Host to container: busybox httpd in the VM.
    let mut conn = TcpStream::connect((guest_ip.as_str(), 8080)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
    let mut page = String::new();
    conn.read_to_string(&mut page).unwrap();
    assert!(page.contains("hello-from-the-vm"), "{page}");
    // And the 1 MiB file back, container to host.
    let start = Instant::now();
    let mut conn = TcpStream::connect((guest_ip.as_str(), 8080)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    conn.write_all(b"GET /big HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).unwrap();
    let upload_time = start.elapsed();
    let split = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        reply[split..] == body[..],
        "got {} bytes back",
        reply.len() - split
    );
    // nc was started before READY but may not listen yet (every exec is slow in a nested
    // guest): a refused connection is retried, a bounded number of times.
    let mut bye = None;
    for _ in 0..60 {
        match TcpStream::connect((guest_ip.as_str(), 9000)) {
            Ok(c) => {
                bye = Some(c);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => panic!("connecting to nc in the container: {e}"),
        }
    }
    let mut bye = bye.expect("nc in the container never listened on port 9000");
    bye.write_all(b"bye\n").unwrap();
    drop(bye);

    let out = child.wait_with_output().unwrap();
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(
        out.status.success(),
        "husk run: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rest.iter().any(|l| l == "GOT bye"), "{rest:?}");
    eprintln!(
        "network: 1 MiB host -> container by wget in {:.2} s ({:.0} KiB/s), \
         container -> host from httpd in {:.2} s ({:.0} KiB/s)",
        wget_time.as_secs_f64(),
        1024.0 / wget_time.as_secs_f64(),
        upload_time.as_secs_f64(),
        1024.0 / upload_time.as_secs_f64()
    );

    // Nothing of ours is left, and the namespace is as the engine made it.
    let links = ns.ip(&["-o", "link"]);
    assert!(!links.contains("_husk"), "a tap is left: {links}");
    assert!(links.contains(&mac), "eth0 keeps its MAC: {links}");
    assert!(
        ns.tc(&["qdisc", "show", "dev", "eth0", "ingress"])
            .is_empty()
    );
    assert!(
        ns.tc(&["filter", "show", "dev", "eth0", "ingress"])
            .is_empty()
    );
    assert!(
        ns.ip(&["-o", "-4", "addr", "show", "dev", "eth0"])
            .contains(&format!("{guest_ip}/24"))
    );
    assert!(
        ns.ip(&["route"])
            .contains(&format!("default via {host_ip}"))
    );
    assert_eq!(
        std::fs::read_dir(&root).map(|d| d.count()).unwrap_or(0),
        0,
        "state left"
    );
}

#[test]
fn a_missing_network_namespace_is_a_clear_error_and_leaves_nothing() {
    if guest_image().is_none() {
        return;
    }
    if !kvm_available() || !is_root() {
        skip::<()>("needs /dev/kvm and root");
        return;
    }
    let tmp = TempDir::new("net-missing");
    let root = tmp.path().join("state");
    let _cleanup = ContainerRoot(root.clone());
    let bundle_dir = tmp.path().join("bundle");
    std::fs::create_dir_all(&bundle_dir).unwrap();
    let missing = Path::new("/run/netns/husk-does-not-exist");
    let Some(bundle) = network_bundle(&bundle_dir, "true", Some(missing)) else {
        return;
    };
    let (code, _, err) = husk(
        &root,
        &["create", "n1", "--bundle", bundle.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("network namespace") && err.contains("husk-does-not-exist"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&root).map(|d| d.count()).unwrap_or(0),
        0,
        "state left"
    );
}

/// What `podman --network none` makes: a namespace with only `lo`, named by path. The VM gets
/// no virtio-net device and only `lo` (the spec-level rule, no namespace or one without a
/// path, is a unit test of the monitor).
#[test]
fn a_namespace_with_only_loopback_gives_the_vm_only_lo() {
    if guest_image().is_none() {
        return;
    }
    if !kvm_available() || !is_root() || !has_iproute2() {
        skip::<()>("needs /dev/kvm, root and iproute2");
        return;
    }
    let name = format!("husk-e2e-lo-{}", std::process::id());
    ip(&["netns", "add", &name]);
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _del = Del(name.clone());
    let tmp = TempDir::new("net-lo");
    let root = tmp.path().join("state");
    let _cleanup = ContainerRoot(root.clone());
    let bundle_dir = tmp.path().join("bundle");
    std::fs::create_dir_all(&bundle_dir).unwrap();
    let netns = PathBuf::from("/run/netns").join(&name);
    let Some(bundle) = network_bundle(&bundle_dir, "ip -o link", Some(&netns)) else {
        return;
    };
    let (code, out, err) = husk(&root, &["run", "lo1", "--bundle", bundle.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    let links: Vec<&str> = out.lines().collect();
    assert_eq!(links.len(), 1, "{out}");
    assert!(
        links[0].contains(": lo:") && links[0].contains("UP"),
        "{out}"
    );
    // Nothing was created in the namespace.
    assert!(!ip(&["-n", &name, "-o", "link"]).contains("_husk"));
}
