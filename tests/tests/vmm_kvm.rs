//! husk's own VMM on KVM with the real guest image: `husk vm boot` boots vmlinux + initramfs
//! with a vsock device; this test plays the host side of the control protocol over the
//! device's Unix socket (`<uds>_1024`, where guest-initiated connections to port 1024 land),
//! exchanges the handshake in both directions, asks husk-init to shut down and checks that
//! the VM powers off with every boot phase reported. One VM boot (~30 s on kvm_pvm).

use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_e2e::{TempDir, guest_image, husk_binary, kvm_available, skip};
use husk_proto::{GuestMessage, Hello, HostMessage, Request, RequestId, Response};

#[test]
fn boots_real_guest_and_talks_to_husk_init_over_vsock() {
    let Some(image) = guest_image() else {
        return;
    };
    if !kvm_available() {
        skip::<()>("/dev/kvm is not available");
        return;
    }
    let dir = TempDir::new("vmm-vsock");
    let uds = dir.path().join("vsock.sock");
    let control = UnixListener::bind(dir.path().join("vsock.sock_1024")).unwrap();
    control.set_nonblocking(true).unwrap();

    let start = Instant::now();
    let mut child = Command::new(husk_binary())
        .args(["vm", "boot", "--json", "--timeout", "400", "--kernel"])
        .arg(&image.vmlinux)
        .arg("--initrd")
        .arg(&image.initramfs)
        .arg("--vsock")
        .arg(&uds)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();

    // husk-init connects right after its first boot marker.
    let mut conn = loop {
        match control.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("husk vm boot exited ({status}) before husk-init connected");
                }
                assert!(
                    start.elapsed() < Duration::from_secs(400),
                    "husk-init never connected"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let connected = start.elapsed();
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();

    // guest -> host
    let hello: Option<GuestMessage> = husk_proto::read_message(&mut conn).unwrap();
    assert_eq!(hello, Some(GuestMessage::Hello(Hello::current())));
    // host -> guest
    husk_proto::write_message(&mut conn, &HostMessage::Hello(Hello::current())).unwrap();
    husk_proto::write_message(
        &mut conn,
        &HostMessage::Request {
            id: RequestId(7),
            request: Request::Shutdown,
        },
    )
    .unwrap();
    let reply: Option<GuestMessage> = husk_proto::read_message(&mut conn).unwrap();
    match reply {
        Some(GuestMessage::Response { id, result }) => {
            assert_eq!(id, RequestId(7));
            assert_eq!(result, Ok(Response::Done));
        }
        other => panic!("expected the Shutdown response, got {other:?}"),
    }

    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "husk vm boot failed: {}", out.status);
    let report = String::from_utf8(out.stdout).unwrap();
    let report = report.lines().last().unwrap_or_default().to_string();
    for phase in [
        "\"exit\":\"power-off\"",
        "VM ready",
        "first vCPU entry",
        "marker init-started",
        "marker host-connected",
        "marker power-off",
    ] {
        assert!(report.contains(phase), "{phase} missing from {report}");
    }
    println!(
        "husk-init connected over vsock after {:.1} s; timeline: {report}",
        connected.as_secs_f64()
    );
    // The vsock device removed its socket; nothing else is left but our listener.
    assert!(!uds.exists(), "{} left behind", uds.display());
}
