//! The VM's network interfaces, configured as the host found them in the engine's network
//! namespace: interface renamed and sized with ioctls, addresses and routes with rtnetlink.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use husk_proto::{IpCidr, NetInterface, NetRoute, NetworkConfig};

const NLMSG_ERROR: u16 = 2;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;

/// Applies the configuration; errors name the interface, address or route.
pub fn configure(cfg: &NetworkConfig) -> Result<(), String> {
    crate::sys::loopback_up().map_err(|e| format!("bringing up lo: {e}"))?;
    let nl = Netlink::open().map_err(|e| format!("opening rtnetlink: {e}"))?;
    for iface in &cfg.interfaces {
        configure_interface(&nl, iface).map_err(|e| format!("interface {}: {e}", iface.name))?;
    }
    for r in &cfg.routes {
        add_route(&nl, r).map_err(|e| format!("route {}: {e}", describe(r)))?;
    }
    Ok(())
}

/// Takes the interface with MAC `mac` away from the VM: its virtio device is unbound from the
/// virtio-net driver, so the interface no longer exists (not merely down). For a template's
/// spare NIC that a container's network does not use.
pub fn remove(mac: &[u8; 6]) -> Result<(), String> {
    let name = find_by_mac(mac).map_err(|e| format!("a spare NIC: {e}"))?;
    let device = std::fs::read_link(format!("/sys/class/net/{name}/device"))
        .map_err(|e| format!("the device of {name}: {e}"))?;
    let device = device
        .file_name()
        .ok_or_else(|| format!("the device of {name}: {}", device.display()))?;
    std::fs::write(
        "/sys/bus/virtio/drivers/virtio_net/unbind",
        device.as_encoded_bytes(),
    )
    .map_err(|e| format!("unbinding {} ({name}): {e}", device.display()))
}

fn describe(r: &NetRoute) -> String {
    let dst = r
        .destination
        .map(|d| format!("{}/{}", d.addr, d.prefix_len))
        .unwrap_or_else(|| "default".into());
    match r.gateway {
        Some(gw) => format!("{dst} via {gw} dev {}", r.interface),
        None => format!("{dst} dev {}", r.interface),
    }
}

/// The guest interface with this MAC address.
fn find_by_mac(mac: &[u8; 6]) -> io::Result<String> {
    let want = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    for e in std::fs::read_dir("/sys/class/net")?.flatten() {
        let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if addr.trim() == want {
            return Ok(e.file_name().to_string_lossy().into_owned());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no network device with MAC {want}"),
    ))
}

fn ifindex(name: &str) -> io::Result<u32> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))?;
    s.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad ifindex"))
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

fn inet_socket() -> io::Result<OwnedFd> {
    Ok(nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn configure_interface(nl: &Netlink, iface: &NetInterface) -> io::Result<()> {
    let current = find_by_mac(&iface.device_mac)?;
    let sock = inet_socket()?;
    if iface.device_mac != iface.mac {
        // A restored template's NIC has the template's address: give it the container's,
        // before it is up (virtio-net without a control queue only changes it locally, which
        // is all a tap backend needs).
        let mut req = ifreq(&current)?;
        let mut addr: libc::sockaddr = libc::sockaddr {
            sa_family: libc::ARPHRD_ETHER,
            sa_data: [0; 14],
        };
        for (d, s) in addr.sa_data.iter_mut().zip(iface.mac) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = addr;
        // SAFETY: SIOCSIFHWADDR reads a live ifreq whose active member is ifru_hwaddr.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR, &req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("setting the MAC address of {current}: {e}"),
            ));
        }
    }
    if current != iface.name {
        let mut req = ifreq(&current)?;
        let new = ifreq(&iface.name)?;
        // ifru_newname is the union member SIOCSIFNAME reads.
        req.ifr_ifru.ifru_newname = new.ifr_name;
        // SAFETY: SIOCSIFNAME reads a live ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNAME, &req) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let mut req = ifreq(&iface.name)?;
    req.ifr_ifru.ifru_mtu = i32::try_from(iface.mtu).unwrap_or(1500);
    // SAFETY: SIOCSIFMTU reads a live ifreq whose active member is ifru_mtu.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    crate::sys::set_link_flags(&iface.name, crate::sys::IFF_UP, true)?;
    let index = ifindex(&iface.name)?;
    for a in &iface.addresses {
        add_address(nl, index, a).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("address {}/{}: {e}", a.addr, a.prefix_len),
            )
        })?;
    }
    Ok(())
}

/// Address families as the `u8` rtnetlink messages carry them (2 and 10 fit).
#[expect(clippy::cast_possible_truncation, reason = "AF_INET is 2")]
const AF_INET_U8: u8 = libc::AF_INET as u8;
#[expect(clippy::cast_possible_truncation, reason = "AF_INET6 is 10")]
const AF_INET6_U8: u8 = libc::AF_INET6 as u8;

fn addr_bytes(a: &IpAddr) -> (u8, Vec<u8>) {
    match a {
        IpAddr::V4(v) => (AF_INET_U8, v.octets().to_vec()),
        IpAddr::V6(v) => (AF_INET6_U8, v.octets().to_vec()),
    }
}

fn add_address(nl: &Netlink, index: u32, a: &IpCidr) -> io::Result<()> {
    let (family, bytes) = addr_bytes(&a.addr);
    let mut msg = Vec::new();
    msg.extend_from_slice(&[family, a.prefix_len, 0, RT_SCOPE_UNIVERSE]);
    msg.extend_from_slice(&index.to_ne_bytes());
    push_attr(&mut msg, IFA_LOCAL, &bytes);
    push_attr(&mut msg, IFA_ADDRESS, &bytes);
    nl.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &msg)
}

fn add_route(nl: &Netlink, r: &NetRoute) -> io::Result<()> {
    let index = ifindex(&r.interface)?;
    let family = match (r.destination, r.gateway) {
        (Some(d), _) => addr_bytes(&d.addr).0,
        (None, Some(gw)) => addr_bytes(&gw).0,
        (None, None) => AF_INET_U8,
    };
    let dst_len = r.destination.map(|d| d.prefix_len).unwrap_or(0);
    let scope = if r.gateway.is_some() {
        RT_SCOPE_UNIVERSE
    } else {
        RT_SCOPE_LINK
    };
    let mut msg = vec![
        family,
        dst_len,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        scope,
        RTN_UNICAST,
    ];
    msg.extend_from_slice(&0u32.to_ne_bytes());
    if let Some(d) = r.destination {
        push_attr(&mut msg, RTA_DST, &addr_bytes(&d.addr).1);
    }
    if let Some(gw) = r.gateway {
        push_attr(&mut msg, RTA_GATEWAY, &addr_bytes(&gw).1);
    }
    push_attr(&mut msg, RTA_OIF, &index.to_ne_bytes());
    match nl.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &msg) {
        // The kernel adds the on-link route of each address itself.
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

fn push_attr(buf: &mut Vec<u8>, typ: u16, data: &[u8]) {
    let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&typ.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// A NETLINK_ROUTE socket doing one acknowledged request at a time.
struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    fn request(&self, typ: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(16 + payload.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        let mut msg = Vec::with_capacity(16 + payload.len());
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&typ.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
        msg.extend_from_slice(payload);
        nix::unistd::write(&self.fd, &msg)?;
        let mut buf = [0u8; 4096];
        let n = nix::unistd::read(&self.fd, &mut buf)?;
        let reply = &buf[..n];
        if reply.len() < 20 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "short netlink reply",
            ));
        }
        let rtype = u16::from_ne_bytes([reply[4], reply[5]]);
        if rtype != NLMSG_ERROR {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected netlink reply",
            ));
        }
        let code = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
        if code == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(-code))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let mut b = Vec::new();
        push_attr(&mut b, 1, &[1, 2, 3, 4, 5]);
        assert_eq!(b.len(), 12);
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), 9);
    }

    #[test]
    fn routes_describe_themselves() {
        let r = NetRoute {
            destination: None,
            gateway: Some("10.0.0.1".parse().unwrap()),
            interface: "eth0".into(),
        };
        assert_eq!(describe(&r), "default via 10.0.0.1 dev eth0");
    }
}
