//! The control protocol against the real husk-init binary: a host that misbehaves gets an
//! error reply (for a request that does not fit) or a prompt exit of husk-init with a message
//! naming what was wrong (for a broken connection), never a hang; and whatever container
//! it built dies with it.
//!
//! These need root (husk-init builds real containers); without it each test prints
//! `SKIPPED: needs root` and passes.

mod common;

use std::process::Command;

use common::{Host, Options, Want, config, sh, skip_unless_root};
use husk_proto::{
    ContainerRef, ErrorCode, ExecId, GuestMessage, Hello, HostMessage, PROTOCOL_VERSION,
    PrepareRequest, ProcessRef, Request, RequestId, Response, SignalTarget, WindowSize,
};
use serde_json::json;

/// husk-init exits unsuccessfully and its log holds every one of `needles`.
fn assert_fails_with(h: &mut Host, needles: &[&str]) {
    let (status, log) = h.wait_husk_exit();
    assert!(!status.success(), "husk-init exited {status}: {log}");
    for n in needles {
        assert!(log.contains(n), "{n:?} missing from husk-init's log: {log}");
    }
}

/// A host that has started `sleep 100` in a container; returns its pid.
fn with_running_container(h: &mut Host) -> u32 {
    let (pid, io) = h
        .create(&sh("echo ready; exec sleep 100"), Want::OUTPUT)
        .unwrap();
    h.ok(Request::Start {
        container: ContainerRef::FIRST,
    });
    io.stdout.wait_for("ready");
    pid
}

#[test]
fn no_host_to_connect_to_is_reported_at_once() {
    if skip_unless_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_husk-init"))
        .arg("--connect")
        .arg(format!("unix:{}/nobody", dir.path().display()))
        .arg("--cgroup-root")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("no host to talk to"), "{log}");
    assert!(
        log.contains("No such file or directory"),
        "the cause is named: {log}"
    );
}

#[test]
fn the_guest_says_hello_first_with_its_version() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::spawn(Options::default());
    assert_eq!(
        h.recv(),
        Some(GuestMessage::Hello(Hello {
            version: PROTOCOL_VERSION
        }))
    );
}

#[test]
fn a_wrong_version_hello_ends_husk_init_with_both_versions_named() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::spawn(Options::default());
    assert!(matches!(h.recv(), Some(GuestMessage::Hello(_))));
    h.send(&HostMessage::Hello(Hello { version: 999 }));
    // Nothing more comes: the guest closes the connection.
    assert_eq!(h.recv(), None);
    assert_fails_with(
        &mut h,
        &[
            "handshake",
            "version mismatch",
            &format!("{PROTOCOL_VERSION}"),
            "999",
        ],
    );
}

#[test]
fn garbage_instead_of_a_hello_ends_husk_init() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::spawn(Options::default());
    assert!(matches!(h.recv(), Some(GuestMessage::Hello(_))));
    // A lost HTTP client: its first four bytes read as a 542 MB length.
    h.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_fails_with(&mut h, &["handshake", "exceeds the limit"]);
}

#[test]
fn a_request_before_the_hello_ends_husk_init() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::spawn(Options::default());
    assert!(matches!(h.recv(), Some(GuestMessage::Hello(_))));
    h.send(&HostMessage::Request {
        id: RequestId(1),
        request: Request::ListPids {
            container: ContainerRef::FIRST,
        },
    });
    assert_fails_with(&mut h, &["handshake", "expected Hello"]);
}

#[test]
fn a_host_that_vanishes_during_the_handshake_ends_husk_init() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::spawn(Options::default());
    assert!(matches!(h.recv(), Some(GuestMessage::Hello(_))));
    h.close_control();
    assert_fails_with(&mut h, &["closed the control connection"]);
}

#[test]
fn a_truncated_frame_ends_husk_init_and_its_container() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let pid = with_running_container(&mut h);
    // A header announcing 50 bytes, 10 of them, then EOF.
    let mut frame = 50u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&[0u8; 10]);
    h.send_raw(&frame);
    h.close_control();
    assert_fails_with(&mut h, &["middle of a frame", "14 of 54 bytes"]);
    assert!(common::gone(pid), "the container outlived husk-init");
}

#[test]
fn an_undecodable_frame_ends_husk_init_and_its_container() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let pid = with_running_container(&mut h);
    let mut frame = 8u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&[0xff; 8]);
    h.send_raw(&frame);
    assert_fails_with(&mut h, &["control connection", "malformed message"]);
    assert!(common::gone(pid), "the container outlived husk-init");
}

#[test]
fn an_oversized_frame_is_refused_from_its_header() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    // Only the header: husk-init must refuse it without waiting for (or allocating) 4 GiB.
    h.send_raw(&u32::MAX.to_le_bytes());
    assert_fails_with(&mut h, &["4294967295 bytes exceeds the limit"]);
}

#[test]
fn a_second_hello_ends_husk_init() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    h.send(&HostMessage::Hello(Hello::current()));
    assert_fails_with(&mut h, &["second Hello"]);
}

#[test]
fn requests_that_do_not_fit_get_error_replies() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    let code = |h: &mut Host, r: Request| h.request(r).unwrap_err().code;
    assert_eq!(
        code(
            &mut h,
            Request::Start {
                container: ContainerRef::FIRST
            }
        ),
        ErrorCode::InvalidState
    );
    assert_eq!(
        code(
            &mut h,
            Request::ListPids {
                container: ContainerRef::FIRST
            }
        ),
        ErrorCode::InvalidState
    );
    let e = h
        .exec(
            1,
            &json!({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
            Want::OUTPUT,
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidState, "{e}");

    // A config.json that is not JSON.
    let mut bad = config(&["true"]);
    bad["process"]["args"] = json!("not a list");
    let e = h.create(&bad, Want::OUTPUT).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidSpec, "{e}");
    assert!(e.message.contains("config.json"), "{e}");

    let pid = with_running_container(&mut h);
    let e = h.create(&config(&["true"]), Want::OUTPUT).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidState, "a second Create: {e}");
    assert_eq!(
        code(
            &mut h,
            Request::Start {
                container: ContainerRef::FIRST
            }
        ),
        ErrorCode::InvalidState
    );
    let unknown = ProcessRef::Exec(ExecId(42));
    let sig = |target, signal| Request::Signal { target, signal };
    assert_eq!(
        code(&mut h, sig(SignalTarget::Process(unknown), 15)),
        ErrorCode::NoSuchProcess
    );
    assert_eq!(
        code(
            &mut h,
            sig(
                SignalTarget::Process(ProcessRef::Init(ContainerRef::FIRST)),
                999
            )
        ),
        ErrorCode::InvalidSpec
    );
    assert_eq!(
        code(&mut h, Request::CloseStdin { process: unknown }),
        ErrorCode::NoSuchProcess
    );
    let resize = |process| Request::ResizePty {
        process,
        size: WindowSize { rows: 1, cols: 1 },
    };
    assert_eq!(
        code(&mut h, resize(ProcessRef::Init(ContainerRef::FIRST))),
        ErrorCode::InvalidState
    );
    let e = h
        .exec(1, &json!({"args": [], "cwd": "/"}), Want::OUTPUT)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidSpec, "{e}");
    // An exec id in use.
    let (_, _io) = h
        .exec(
            5,
            &json!({"args": ["sleep", "100"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
            Want::OUTPUT,
        )
        .unwrap();
    let e = h
        .exec(
            5,
            &json!({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
            Want::OUTPUT,
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Protocol, "{e}");

    // None of it disturbed the container; a clean shutdown ends everything.
    assert!(common::alive(pid));
    assert_eq!(h.ok(Request::Shutdown), Response::Done);
    let (status, log) = h.wait_husk_exit();
    assert!(status.success(), "{log}");
    assert!(common::gone(pid));
}

#[test]
fn exec_after_the_container_stopped_is_refused() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    assert_eq!(h.run(&config(&["true"])).status.exit_code(), 0);
    let e = h
        .exec(
            1,
            &json!({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
            Want::OUTPUT,
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidState, "{e}");
    let e = h
        .request(Request::Signal {
            target: SignalTarget::Process(ProcessRef::Init(ContainerRef::FIRST)),
            signal: 9,
        })
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NoSuchProcess, "{e}");
}

#[test]
fn husk_init_connects_again_until_it_is_asked_for_something() {
    if skip_unless_root() {
        return;
    }
    let mut h = Host::start();
    // Prepare does not count (a restored VM's new host sends it first).
    h.ok(Request::Prepare(PrepareRequest {
        entropy: vec![1, 2, 3],
        realtime_ns: 0,
        spare_nics: vec![],
    }));
    h.reconnect();
    let run = h.run(&common::config(&["echo", "again"]));
    assert_eq!(run.stdout, "again\n", "{run:?}");
    // Asked for something, it treats a lost connection as the host's end.
    h.close_control();
    let (status, log) = h.wait_husk_exit();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("the host closed the control connection"),
        "{log}"
    );
}
