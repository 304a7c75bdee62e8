//! The pod network of a [`super::Cri`]: a Linux bridge of its own with a /24 of its own, and the
//! CNI configuration that plugs pods into it (the `bridge`, `host-local` and `loopback` plugins
//! of Debian's `containernetworking-plugins`).
//!
//! The harness creates the bridge and gives it the gateway address itself, and the `bridge`
//! plugin runs with `isGateway: false` and `ipMasq: false`: so the plugin changes no host-wide
//! setting (with `isGateway` it turns on `net.ipv4.ip_forward`) and adds no iptables rule, and
//! the host still reaches every pod on its address. Pods get a default route through the
//! gateway from `host-local`, as on a Kubernetes node.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

/// Where Debian installs the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The plugins the configuration uses (`loopback` is containerd's own, for `lo`).
pub const CNI_PLUGINS: [&str; 3] = ["bridge", "host-local", "loopback"];

/// Where libcni caches the result of every attachment (the default, as containerd uses it).
const CNI_CACHE: &str = "/var/lib/cni/results";

/// How many /24s the harness picks from: 10.200.0.0/24 to 10.207.255.0/24, away from podman's
/// and containerd's 10.88.0.0/16, Docker's 172.17.0.0/16 and the usual Kubernetes ranges.
const SUBNETS: u32 = 8 * 256;

/// A bridge this harness created, with its /24; deleted on drop.
#[derive(Debug)]
pub struct Bridge {
    index: u32,
}

impl Bridge {
    /// Creates a bridge `hcri<N>` with the gateway address of `10.(200 + N / 256).(N % 256).1/24`,
    /// for an `N` no other bridge (another test process's harness) and no address on this host
    /// holds. The bridge's name is the claim: creating it fails when it exists.
    pub fn claim() -> Bridge {
        let start = std::process::id().wrapping_mul(7);
        let addresses = run(Command::new("ip").args(["-o", "-4", "addr", "show"]))
            .unwrap_or_else(|e| panic!("ip addr show: {e}"));
        for k in 0..SUBNETS {
            let index = (start + k) % SUBNETS;
            if addresses.contains(&format!(" {}", prefix(index))) {
                continue;
            }
            if run(Command::new("ip").args(["link", "add", &name(index), "type", "bridge"]))
                .is_err()
            {
                // Another harness's bridge (or a stale one): not ours to touch.
                continue;
            }
            let bridge = Bridge { index };
            let gateway = format!("{}/24", bridge.gateway());
            for args in [
                vec!["addr", "add", gateway.as_str(), "dev", &bridge.name()],
                vec!["link", "set", &bridge.name(), "up"],
            ] {
                if let Err(e) = run(Command::new("ip").args(&args)) {
                    panic!("ip {}: {e}", args.join(" "));
                }
            }
            return bridge;
        }
        panic!("no free bridge name and /24 among hcri0..hcri{SUBNETS}");
    }

    /// The bridge's name (`hcri<N>`).
    pub fn name(&self) -> String {
        name(self.index)
    }

    /// The CNI network's name, which names its results in libcni's cache.
    pub fn network(&self) -> String {
        format!("husk-test-{}", self.name())
    }

    fn prefix(&self) -> String {
        prefix(self.index)
    }

    /// The bridge's address: the pods' gateway, and the host's address on the pod network.
    pub fn gateway(&self) -> Ipv4Addr {
        format!("{}1", self.prefix())
            .parse()
            .expect("an IPv4 address")
    }

    /// The subnet, `10.x.y.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}0/24", self.prefix())
    }

    /// The CNI configuration list for this bridge, with host-local's leases in `ipam_dir`
    /// (not the host-wide /var/lib/cni/networks).
    pub fn conflist(&self, ipam_dir: &Path) -> String {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": self.network(),
            "plugins": [{
                "type": "bridge",
                "bridge": self.name(),
                "isGateway": false,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [[{"subnet": self.subnet(), "gateway": self.gateway().to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0", "gw": self.gateway().to_string()}],
                },
            }],
        })
        .to_string()
    }

    /// What pods left on this network: ports on the bridge (veths), leases in `ipam_dir`,
    /// results in libcni's cache, iptables rules naming the network or the bridge.
    pub fn leftovers(&self, ipam_dir: &Path) -> Vec<String> {
        let mut left = Vec::new();
        let ports = std::path::PathBuf::from("/sys/class/net")
            .join(self.name())
            .join("brif");
        for port in dir_names(&ports) {
            left.push(format!("interface {port} on bridge {}", self.name()));
        }
        let leases = ipam_dir.join(self.network());
        for lease in dir_names(&leases) {
            if lease.parse::<Ipv4Addr>().is_ok() {
                left.push(format!("address {lease} leased in {}", leases.display()));
            }
        }
        for result in self.cached_results() {
            left.push(format!("CNI result {CNI_CACHE}/{result}"));
        }
        if let Ok(rules) = run(&mut Command::new("iptables-save")) {
            for rule in rules
                .lines()
                .filter(|l| l.contains(&self.network()) || l.contains(&self.name()))
            {
                left.push(format!("iptables rule {rule}"));
            }
        }
        left
    }

    /// The entries of libcni's cache for this network.
    fn cached_results(&self) -> Vec<String> {
        let prefix = format!("{}-", self.network());
        dir_names(Path::new(CNI_CACHE))
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // A pod that was never torn down (containerd killed) leaves its cached result.
        for result in self.cached_results() {
            let _ = std::fs::remove_file(Path::new(CNI_CACHE).join(result));
        }
        let _ = run(Command::new("ip").args(["link", "del", &self.name()]));
    }
}

/// The name of bridge number `index`.
fn name(index: u32) -> String {
    format!("hcri{index}")
}

/// The first three octets of subnet number `index`, as text with a trailing dot (`10.200.7.`).
fn prefix(index: u32) -> String {
    format!("10.{}.{}.", 200 + index / 256, index % 256)
}

/// The names in `dir` (none when it cannot be read).
fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Runs `cmd`; its stdout, or what it said when it failed.
fn run(cmd: &mut Command) -> Result<String, String> {
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(e.to_string()),
    }
}
