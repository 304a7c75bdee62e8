use std::process::Command;

use super::*;

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace `name` with `eth0` (10.<n>.<m>.2/24, default route via .1) whose peer
/// stays in the host namespace; deleted on drop.
struct EngineNetns {
    name: String,
}

impl EngineNetns {
    fn new(tag: &str) -> Option<Self> {
        // SAFETY: geteuid(2) has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let has_ip = Command::new("ip").arg("-V").output().is_ok();
        if !root || !has_ip {
            eprintln!("SKIPPED: needs root and iproute2");
            return None;
        }
        let pid = std::process::id();
        let name = format!("husk-{tag}-{pid}");
        let host_end = format!("hk{}{}", &tag[..2], pid % 100_000);
        let ns = Self { name };
        let subnet = format!("10.{}.{}", 100 + pid % 100, pid / 100 % 250);
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        let n = |args: &[&str]| {
            let mut all = vec!["-n", ns.name.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        };
        n(&["addr", "add", &format!("{subnet}.2/24"), "dev", "eth0"]);
        n(&["link", "set", "eth0", "mtu", "1400", "up"]);
        n(&["link", "set", "lo", "up"]);
        n(&["route", "add", "default", "via", &format!("{subnet}.1")]);
        Some(ns)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for EngineNetns {
    fn drop(&mut self) {
        // Deleting the namespace deletes eth0 and with it its peer.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn assert_as_the_engine_made_it(ns: &EngineNetns) {
    let links = ns.ip(&["-o", "link"]);
    assert!(!links.contains("_husk"), "a tap is left: {links}");
    assert!(!ns.ip(&["-o", "addr", "show", "dev", "eth0"]).is_empty());
    assert!(
        ns.ip(&["-o", "-4", "addr", "show", "dev", "eth0"])
            .contains("/24")
    );
    assert!(
        ns.ip(&["route"]).contains("default via"),
        "{}",
        ns.ip(&["route"])
    );
    let qdiscs = Command::new("tc")
        .args(["-n", &ns.name, "qdisc", "show", "dev", "eth0", "ingress"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(qdiscs.is_empty(), "an ingress qdisc is left: {qdiscs}");
}

#[test]
fn setup_takes_the_veth_and_drop_gives_it_back() {
    let Some(ns) = EngineNetns::new("setup") else {
        return;
    };
    let state = std::env::temp_dir().join(format!("husk-net-state-{}", ns.name));
    std::fs::create_dir_all(&state).unwrap();
    let network = setup(&Netns::Path(ns.path()), &state).unwrap().unwrap();
    assert_eq!(network.devices.len(), 1);
    assert_eq!(network.devices[0].mtu, 1400);
    assert_eq!(network.guest.interfaces[0].name, "eth0");
    let addrs = &network.guest.interfaces[0].addresses;
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    assert_eq!(addrs[0].prefix_len, 24);
    assert!(
        network
            .guest
            .routes
            .iter()
            .any(|r| r.destination.is_none() && r.gateway.is_some()),
        "{:?}",
        network.guest.routes
    );
    assert!(state.join(RECORD_FILE).is_file());
    // In the namespace: the tap, up, with the veth's MTU; ingress qdiscs with a filter
    // each way; the veth without its IPv4 address.
    let tap = ns.ip(&["-o", "link", "show", "tap0_husk"]);
    assert!(tap.contains("mtu 1400") && tap.contains("UP"), "{tap}");
    assert!(
        ns.ip(&["-o", "-4", "addr", "show", "dev", "eth0"])
            .is_empty()
    );
    let nl = &network.nl;
    let links = nl.links().unwrap();
    let index = |name: &str| links.iter().find(|l| l.name == name).unwrap().index;
    assert!(nl.has_ingress_qdisc(index("eth0")).unwrap());
    assert!(nl.has_ingress_qdisc(index("tap0_husk")).unwrap());
    let filters = Command::new("tc")
        .args(["-n", &ns.name, "filter", "show", "dev", "eth0", "ingress"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !filters.is_empty() {
        assert!(filters.contains("tap0_husk"), "{filters}");
    }
    // A second VM in the same namespace is refused.
    let state2 = state.join("second");
    std::fs::create_dir_all(&state2).unwrap();
    let err = setup(&Netns::Path(ns.path()), &state2).unwrap_err();
    assert!(matches!(err, NetworkError::Busy { .. }), "{err}");

    drop(network);
    assert!(!state.join(RECORD_FILE).exists());
    assert_as_the_engine_made_it(&ns);
    std::fs::remove_dir_all(&state).unwrap();
}

/// The monitor's own namespace, as Docker fills it: made on a thread of its own (as the
/// monitor's main thread makes it), `lo` up, and what appears in it (here one end of a veth
/// with an address and a default route, put there by `ip` run from that thread, as a hook
/// would from `husk create`) is taken for the VM.
#[test]
fn a_new_namespace_is_made_filled_by_a_hook_and_taken() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("ip").arg("-V").output().is_err() {
        eprintln!("SKIPPED: needs root and iproute2");
        return;
    }
    let spec: oci_spec::runtime::Spec = serde_json::from_str(
        r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "network"}]}}"#,
    )
    .unwrap();
    let host_ns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let state = std::env::temp_dir().join(format!("husk-net-own-{}", std::process::id()));
    std::fs::create_dir_all(&state).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let t = std::time::Instant::now();
            let netns = Netns::for_spec(&spec).unwrap();
            // What every container asking for a new namespace now pays in `create`.
            eprintln!("network: a new namespace with lo up took {:?}", t.elapsed());
            let own_ns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
            assert_ne!(own_ns, host_ns);
            assert!(ip(&["-o", "link", "show", "lo"]).contains("UP"));
            // (Its hooks run in husk create, in the host's namespace: e2e `hooks`.)
            // `ip` forked from this thread works in the new namespace.
            // The peer goes to the host's namespace (that of this process's main
            // thread): only eth0 is the container's. It goes when this namespace does.
            let pid = std::process::id().to_string();
            let peer = format!("hko{}", std::process::id() % 100_000);
            ip(&[
                "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", &pid,
            ]);
            ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
            ip(&["link", "set", "eth0", "up"]);
            ip(&["route", "add", "default", "via", "10.77.0.1"]);
            let network = setup(&netns, &state).unwrap().unwrap();
            assert_eq!(network.guest.interfaces.len(), 1);
            assert_eq!(network.guest.interfaces[0].name, "eth0");
            assert!(network.record.own);
            assert!(ip(&["-o", "link"]).contains("tap0_husk"));
            // A killed monitor's record of its own namespace: nothing to undo later.
            let record = std::fs::read(state.join(RECORD_FILE)).unwrap();
            drop(network);
            std::fs::write(state.join(RECORD_FILE), record).unwrap();
            teardown(&state).unwrap();
            assert!(!state.join(RECORD_FILE).exists());
        });
    });
    std::fs::remove_dir_all(&state).unwrap();
}

#[test]
fn a_killed_monitor_is_cleaned_up_from_the_record() {
    let Some(ns) = EngineNetns::new("record") else {
        return;
    };
    let state = std::env::temp_dir().join(format!("husk-net-state-{}", ns.name));
    std::fs::create_dir_all(&state).unwrap();
    let network = setup(&Netns::Path(ns.path()), &state).unwrap().unwrap();
    // As if the monitor were killed: nothing undone, the tap fd stays open.
    std::mem::forget(network);
    teardown(&state).unwrap();
    assert!(!state.join(RECORD_FILE).exists());
    assert_as_the_engine_made_it(&ns);
    std::fs::remove_dir_all(&state).unwrap();
}
