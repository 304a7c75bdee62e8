//! One value of every message, for round-trip tests and fuzz seed corpora.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::*;

/// A message of each kind the host sends.
pub fn host_messages() -> Vec<HostMessage> {
    let req = |id, request| HostMessage::Request {
        id: RequestId(id),
        request,
    };
    let pipes = Stdio::Pipes {
        stdin: Some(VsockPort(2048)),
        stdout: Some(VsockPort(2049)),
        stderr: None,
    };
    vec![
        HostMessage::Hello(Hello::current()),
        req(
            1,
            Request::Create(Box::new(CreateRequest {
                container: ContainerRef::FIRST,
                join: None,
                container_id: ContainerId::new("c1").expect("valid id"),
                config_json: br#"{"ociVersion":"1.0.2"}"#.to_vec(),
                rootfs: FsSource::Share {
                    tag: SHARE_TAG.into(),
                    path: "rootfs".into(),
                },
                mounts: vec![MountSource {
                    index: 3,
                    source: FsSource::Guest("/srv/data".into()),
                }],
                stdio: pipes,
            })),
        ),
        req(
            2,
            Request::ConfigureNetwork(NetworkConfig {
                interfaces: vec![NetInterface {
                    name: "eth0".into(),
                    device_mac: [2, 0x68, 0x75, 0x73, 0x6b, 0],
                    mac: [2, 0, 0, 0, 0, 1],
                    mtu: 1500,
                    addresses: vec![
                        IpCidr {
                            addr: IpAddr::V4(Ipv4Addr::new(10, 88, 0, 2)),
                            prefix_len: 16,
                        },
                        IpCidr {
                            addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
                            prefix_len: 64,
                        },
                    ],
                }],
                routes: vec![NetRoute {
                    destination: None,
                    gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 88, 0, 1))),
                    interface: "eth0".into(),
                }],
            }),
        ),
        req(
            3,
            Request::Start {
                container: ContainerRef::FIRST,
            },
        ),
        req(
            4,
            Request::Signal {
                target: SignalTarget::Process(ProcessRef::Exec(ExecId(7))),
                signal: 15,
            },
        ),
        req(
            5,
            Request::Signal {
                target: SignalTarget::All(ContainerRef(2)),
                signal: 9,
            },
        ),
        req(
            6,
            Request::Exec(Box::new(ExecRequest {
                container: ContainerRef(1),
                exec_id: ExecId(1),
                process_json: br#"{"args":["sh"],"cwd":"/"}"#.to_vec(),
                stdio: Stdio::Terminal {
                    port: VsockPort(2050),
                },
            })),
        ),
        req(
            7,
            Request::ResizePty {
                process: ProcessRef::Init(ContainerRef::FIRST),
                size: WindowSize { rows: 24, cols: 80 },
            },
        ),
        req(
            8,
            Request::CloseStdin {
                process: ProcessRef::Init(ContainerRef(1)),
            },
        ),
        req(
            9,
            Request::ListPids {
                container: ContainerRef::FIRST,
            },
        ),
        req(
            10,
            Request::Stats {
                container: ContainerRef(1),
            },
        ),
        req(11, Request::Shutdown),
        req(
            12,
            Request::Prepare(PrepareRequest {
                entropy: (0..=255).collect(),
                realtime_ns: 1_796_000_000_000_000_000,
                spare_nics: vec![[2, 0x68, 0x75, 0x73, 0x6b, 0]],
            }),
        ),
        req(
            13,
            Request::Create(Box::new(CreateRequest {
                container: ContainerRef(1),
                join: Some(ContainerRef::FIRST),
                container_id: ContainerId::new("app").expect("valid id"),
                config_json: br#"{"ociVersion":"1.0.2"}"#.to_vec(),
                rootfs: FsSource::Share {
                    tag: SHARE_TAG.into(),
                    path: "app/rootfs".into(),
                },
                mounts: vec![],
                stdio: Stdio::NULL,
            })),
        ),
        req(
            14,
            Request::Remove {
                container: ContainerRef(1),
            },
        ),
        req(
            15,
            Request::Freeze {
                container: ContainerRef(1),
                frozen: true,
            },
        ),
        req(
            16,
            Request::Update {
                container: ContainerRef::FIRST,
                resources_json: br#"{"memory":{"limit":104857600},"pids":{"limit":64}}"#.to_vec(),
            },
        ),
    ]
}

/// A message of each kind the guest sends.
pub fn guest_messages() -> Vec<GuestMessage> {
    let resp = |id, result| GuestMessage::Response {
        id: RequestId(id),
        result,
    };
    vec![
        GuestMessage::Hello(Hello::current()),
        resp(1, Ok(Response::Created { pid: 42 })),
        resp(2, Ok(Response::Started)),
        resp(3, Ok(Response::ExecStarted { pid: 43 })),
        resp(4, Ok(Response::Pids(vec![1, 42, 43]))),
        resp(
            5,
            Ok(Response::Stats(ContainerStats {
                cpu_usage_ns: 1,
                memory_usage: 2,
                memory_limit: u64::MAX,
                ..ContainerStats::default()
            })),
        ),
        resp(6, Ok(Response::Done)),
        resp(
            7,
            Err(ErrorReply {
                code: ErrorCode::ExecutableNotFound,
                message: "exec: \"/bin/nope\": no such file or directory".into(),
            }),
        ),
        GuestMessage::Event(Event::Exited {
            process: ProcessRef::Init(ContainerRef(1)),
            status: WaitStatus::Exited(3),
        }),
        GuestMessage::Event(Event::Exited {
            process: ProcessRef::Exec(ExecId(2)),
            status: WaitStatus::Signaled {
                signal: 9,
                core_dumped: false,
            },
        }),
    ]
}
