use super::netlink::Address;
use super::netns::{Requested, requested};
use super::*;

fn route(dst: Option<&str>, gw: Option<&str>, protocol: u8) -> Route {
    Route {
        destination: dst.map(|d| {
            let (a, p) = d.split_once('/').unwrap();
            Address {
                addr: a.parse().unwrap(),
                prefix_len: p.parse().unwrap(),
            }
        }),
        gateway: gw.map(|g| g.parse().unwrap()),
        protocol,
        scope: 0,
        priority: None,
        family: 2,
    }
}

#[test]
fn guest_routes_skip_kernel_and_link_local_routes() {
    let routes = [
        route(Some("10.1.2.0/24"), None, RTPROT_KERNEL),
        route(None, Some("10.1.2.1"), 3),
        route(Some("fe80::/64"), None, 3),
        route(Some("192.168.0.0/16"), Some("10.1.2.254"), 4),
    ];
    let got = guest_routes("eth0", &routes);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].destination, None);
    assert_eq!(got[0].gateway, Some("10.1.2.1".parse().unwrap()));
    assert_eq!(got[1].interface, "eth0");
}

#[test]
fn link_local_addresses_are_recognised() {
    assert!(is_link_local(&"fe80::1".parse().unwrap()));
    assert!(is_link_local(&"169.254.1.1".parse().unwrap()));
    assert!(!is_link_local(&"fd00::1".parse().unwrap()));
    assert!(!is_link_local(&"10.0.0.1".parse().unwrap()));
}

#[test]
fn loopback_taps_and_non_ethernet_are_not_taken() {
    let link = |name: &str, link_type, flags| Link {
        index: 1,
        name: name.into(),
        link_type,
        flags,
        mac: vec![2, 0, 0, 0, 0, 1],
        mtu: 1500,
        kind: None,
    };
    assert!(eligible(&link("eth0", ARPHRD_ETHER, 0)));
    assert!(!eligible(&link("lo", 772, IFF_LOOPBACK)));
    assert!(!eligible(&link("tap0_husk", ARPHRD_ETHER, 0)));
    assert!(!eligible(&link("wg0", 65534, 0)));
}

#[test]
fn the_spec_asks_for_no_namespace_a_path_or_a_new_one() {
    let spec = |namespaces: &str| -> oci_spec::runtime::Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion": "1.0.2", "root": {{"path": "rootfs"}},
                "linux": {{"namespaces": [{namespaces}]}}}}"#
        ))
        .unwrap()
    };
    assert_eq!(requested(&spec(r#"{"type": "pid"}"#)), Requested::None);
    assert_eq!(requested(&spec(r#"{"type": "network"}"#)), Requested::New);
    assert_eq!(
        requested(&spec(
            r#"{"type": "pid"}, {"type": "network", "path": "/run/netns/x"}"#
        )),
        Requested::Path(PathBuf::from("/run/netns/x"))
    );
}

#[test]
fn teardown_without_a_record_does_nothing() {
    let dir = std::env::temp_dir().join(format!("husk-net-norecord-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    teardown(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_namespace_is_a_clear_error() {
    let netns = Netns::Path(PathBuf::from("/nonexistent/netns"));
    let err = setup(&netns, Path::new("/tmp")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
}
