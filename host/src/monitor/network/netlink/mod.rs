//! The few rtnetlink requests the monitor needs, written by hand: list links, addresses and
//! routes; add and remove addresses and routes; set a link's MTU and state; delete a link;
//! add and remove an ingress qdisc; add a u32 filter with a mirred redirect.
//!
//! Why by hand and not `netlink-packet-route`: the messages are a dozen fixed layouts
//! (`ifinfomsg`, `ifaddrmsg`, `rtmsg`, `tcmsg`, `tc_u32_sel`, `tc_mirred`) and a type-length-value
//! attribute format; the crate family (packet-core, packet-utils, sys, route) would be four new
//! dependencies with an API that changes shape between minor versions, for less code than
//! this file. guest-init already talks rtnetlink the same way.
//!
//! A [`Netlink`] socket belongs to the network namespace of the thread that opened it, for
//! its whole life: the monitor opens it inside the container's namespace and then uses it
//! from any thread.

use std::io;
use std::net::IpAddr;
use std::os::fd::{FromRawFd, OwnedFd};

// Message types (linux/rtnetlink.h).
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;

// Flags.
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

// Attributes.
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_TABLE: u16 = 15;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_U32_SEL: u16 = 5;
const TCA_U32_ACT: u16 = 7;
const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const TCA_MIRRED_PARMS: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The main routing table.
pub const RT_TABLE_MAIN: u8 = 254;
/// `RTN_UNICAST`.
pub const RTN_UNICAST: u8 = 1;
/// `RTPROT_KERNEL`: routes the kernel made for an address.
pub const RTPROT_KERNEL: u8 = 2;
/// `ARPHRD_ETHER`.
pub const ARPHRD_ETHER: u16 = 1;
/// `IFF_UP`.
const IFF_UP: u32 = 1;
/// `IFF_LOOPBACK`.
pub const IFF_LOOPBACK: u32 = 8;

/// The ingress qdisc's handle (`ffff:`) and parent (`TC_H_INGRESS`).
const INGRESS_HANDLE: u32 = 0xffff_0000;
const TC_H_INGRESS: u32 = 0xffff_fff1;
/// `ETH_P_ALL`, in network byte order as `tcm_info` carries it.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();
/// `TC_U32_TERMINAL`: the key is the last; run the actions.
const TC_U32_TERMINAL: u8 = 1;
/// `TC_ACT_STOLEN`: the packet is consumed by the action.
const TC_ACT_STOLEN: i32 = 4;
/// `TCA_EGRESS_REDIR`: mirred redirects to the target's egress.
const TCA_EGRESS_REDIR: i32 = 1;

#[expect(clippy::cast_possible_truncation, reason = "AF_INET is 2")]
const AF_INET: u8 = libc::AF_INET as u8;
#[expect(clippy::cast_possible_truncation, reason = "AF_INET6 is 10")]
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// `ARPHRD_*`.
    pub link_type: u16,
    /// `IFF_*` flags.
    pub flags: u32,
    /// Its hardware address (6 bytes for Ethernet).
    pub mac: Vec<u8>,
    /// Its MTU.
    pub mtu: u32,
    /// The driver kind (`veth`, `tun`, ...), if it reports one.
    pub kind: Option<String>,
}

/// One address of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Address {
    /// The address.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
}

/// One route of the main table through an interface.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    /// Destination network; `None` for a default route.
    pub destination: Option<Address>,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// `RTPROT_*`.
    pub protocol: u8,
    /// `RT_SCOPE_*`.
    pub scope: u8,
    /// Metric.
    pub priority: Option<u32>,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
}

/// A NETLINK_ROUTE socket doing one request at a time.
#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
    seq: std::cell::Cell<u32>,
}

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
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
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            seq: std::cell::Cell::new(1),
        })
    }

    fn send(&self, typ: u16, flags: u16, payload: &[u8]) -> io::Result<u32> {
        let seq = self.seq.get();
        self.seq.set(seq.wrapping_add(1));
        let len = u32::try_from(16 + payload.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        let mut msg = Vec::with_capacity(16 + payload.len());
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&typ.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        nix::unistd::write(&self.fd, &msg)?;
        Ok(seq)
    }

    /// Reads the reply messages to `seq` until `NLMSG_DONE` (dumps) or an `NLMSG_ERROR`
    /// (acks); returns the payloads of the other messages.
    fn receive(&self, seq: u32, dump: bool) -> io::Result<Vec<(u16, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = nix::unistd::read(&self.fd, &mut buf)?;
            let mut rest = &buf[..n];
            while rest.len() >= 16 {
                let len = usize::try_from(u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]))
                    .unwrap_or(usize::MAX);
                if len < 16 || len > rest.len() {
                    return Err(invalid("truncated netlink message"));
                }
                let typ = u16::from_ne_bytes([rest[4], rest[5]]);
                let flags = u16::from_ne_bytes([rest[6], rest[7]]);
                let msg_seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
                let payload = &rest[16..len];
                rest = &rest[align(len).min(rest.len())..];
                if msg_seq != seq {
                    continue;
                }
                match typ {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .ok_or_else(|| invalid("short netlink error message"))?;
                        return if code == 0 {
                            Ok(out)
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    _ => {
                        out.push((typ, payload.to_vec()));
                        if !dump && flags & NLM_F_MULTI == 0 {
                            return Ok(out);
                        }
                    }
                }
            }
        }
    }

    /// Sends a request and waits for its acknowledgement.
    fn request(&self, typ: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
        let seq = self.send(typ, flags | NLM_F_ACK, payload)?;
        self.receive(seq, false).map(drop)
    }

    fn dump(&self, typ: u16, payload: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        let seq = self.send(typ, NLM_F_DUMP, payload)?;
        Ok(self
            .receive(seq, true)?
            .into_iter()
            .filter(|(t, _)| *t == typ - 2)
            .map(|(_, p)| p)
            .collect())
    }

    /// Every interface.
    pub fn links(&self) -> io::Result<Vec<Link>> {
        let mut links = Vec::new();
        for msg in self.dump(RTM_GETLINK, &ifinfomsg(0, 0, 0))? {
            if msg.len() < 16 {
                return Err(invalid("short ifinfomsg"));
            }
            let link_type = u16::from_ne_bytes([msg[2], msg[3]]);
            let index = u32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]);
            let flags = u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]);
            let mut link = Link {
                index,
                name: String::new(),
                link_type,
                flags,
                mac: Vec::new(),
                mtu: 0,
                kind: None,
            };
            for (typ, data) in attrs(&msg[16..]) {
                match typ {
                    IFLA_IFNAME => link.name = c_string(data),
                    IFLA_ADDRESS => link.mac = data.to_vec(),
                    IFLA_MTU => link.mtu = read_u32(data).unwrap_or(0),
                    IFLA_LINKINFO => {
                        link.kind = attrs(data)
                            .find(|(t, _)| *t == IFLA_INFO_KIND)
                            .map(|(_, d)| c_string(d));
                    }
                    _ => {}
                }
            }
            links.push(link);
        }
        Ok(links)
    }

    /// The addresses of interface `index`.
    pub fn addresses(&self, index: u32) -> io::Result<Vec<Address>> {
        let mut out = Vec::new();
        for msg in self.dump(RTM_GETADDR, &[0u8; 8])? {
            if msg.len() < 8 {
                return Err(invalid("short ifaddrmsg"));
            }
            let (family, prefix_len) = (msg[0], msg[1]);
            if u32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]) != index {
                continue;
            }
            let (mut local, mut address) = (None, None);
            for (typ, data) in attrs(&msg[8..]) {
                match typ {
                    IFA_LOCAL => local = ip(family, data),
                    IFA_ADDRESS => address = ip(family, data),
                    _ => {}
                }
            }
            // IFA_LOCAL is the interface's own address where a peer address is set.
            if let Some(addr) = local.or(address) {
                out.push(Address { addr, prefix_len });
            }
        }
        Ok(out)
    }

    /// The main-table unicast routes out of interface `index`.
    pub fn routes(&self, index: u32) -> io::Result<Vec<Route>> {
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            let mut req = [0u8; 12];
            req[0] = family;
            for msg in self.dump(RTM_GETROUTE, &req)? {
                if msg.len() < 12 {
                    return Err(invalid("short rtmsg"));
                }
                let (dst_len, mut table, protocol, scope, rtype) =
                    (msg[1], u32::from(msg[4]), msg[5], msg[6], msg[7]);
                let (mut dst, mut gateway, mut oif, mut priority) = (None, None, None, None);
                for (typ, data) in attrs(&msg[12..]) {
                    match typ {
                        RTA_DST => dst = ip(msg[0], data),
                        RTA_GATEWAY => gateway = ip(msg[0], data),
                        RTA_OIF => oif = read_u32(data),
                        RTA_PRIORITY => priority = read_u32(data),
                        RTA_TABLE => table = read_u32(data).unwrap_or(table),
                        _ => {}
                    }
                }
                if oif != Some(index) || table != u32::from(RT_TABLE_MAIN) || rtype != RTN_UNICAST {
                    continue;
                }
                out.push(Route {
                    destination: dst.map(|addr| Address {
                        addr,
                        prefix_len: dst_len,
                    }),
                    gateway,
                    protocol,
                    scope,
                    priority,
                    family: msg[0],
                });
            }
        }
        Ok(out)
    }

    /// Adds an address to interface `index`.
    pub fn add_address(&self, index: u32, a: &Address) -> io::Result<()> {
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &ifaddr(index, a))
    }

    /// Removes an address from interface `index`.
    pub fn delete_address(&self, index: u32, a: &Address) -> io::Result<()> {
        self.request(RTM_DELADDR, 0, &ifaddr(index, a))
    }

    /// Adds a main-table route out of interface `index`.
    pub fn add_route(&self, index: u32, r: &Route) -> io::Result<()> {
        let mut msg = vec![
            r.family,
            r.destination.map_or(0, |d| d.prefix_len),
            0,
            0,
            RT_TABLE_MAIN,
            r.protocol,
            r.scope,
            RTN_UNICAST,
        ];
        msg.extend_from_slice(&0u32.to_ne_bytes());
        if let Some(d) = r.destination {
            push_attr(&mut msg, RTA_DST, &ip_bytes(&d.addr));
        }
        if let Some(gw) = r.gateway {
            push_attr(&mut msg, RTA_GATEWAY, &ip_bytes(&gw));
        }
        if let Some(p) = r.priority {
            push_attr(&mut msg, RTA_PRIORITY, &p.to_ne_bytes());
        }
        push_attr(&mut msg, RTA_OIF, &index.to_ne_bytes());
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &msg)
    }

    /// Sets interface `index`'s MTU and brings it up.
    pub fn set_up(&self, index: u32, mtu: u32) -> io::Result<()> {
        let mut msg = ifinfomsg(index, IFF_UP, IFF_UP);
        push_attr(&mut msg, IFLA_MTU, &mtu.to_ne_bytes());
        self.request(RTM_NEWLINK, 0, &msg)
    }

    /// Deletes interface `index`.
    pub fn delete_link(&self, index: u32) -> io::Result<()> {
        self.request(RTM_DELLINK, 0, &ifinfomsg(index, 0, 0))
    }

    /// Adds the ingress qdisc to interface `index`.
    pub fn add_ingress_qdisc(&self, index: u32) -> io::Result<()> {
        let mut msg = tcmsg(index, INGRESS_HANDLE, TC_H_INGRESS, 0);
        push_attr(&mut msg, TCA_KIND, b"ingress\0");
        self.request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, &msg)
    }

    /// Removes the ingress qdisc of interface `index`, and with it its filters.
    pub fn delete_ingress_qdisc(&self, index: u32) -> io::Result<()> {
        let msg = tcmsg(index, INGRESS_HANDLE, TC_H_INGRESS, 0);
        self.request(RTM_DELQDISC, 0, &msg)
    }

    /// Adds to the ingress qdisc of `from` a filter that takes every frame and redirects it
    /// to the egress of `to`: `tc filter add dev FROM parent ffff: protocol all u32 match u8
    /// 0 0 action mirred egress redirect dev TO`.
    pub fn add_redirect(&self, from: u32, to: u32) -> io::Result<()> {
        let mut msg = tcmsg(from, 0, INGRESS_HANDLE, u32::from(ETH_P_ALL_BE));
        push_attr(&mut msg, TCA_KIND, b"u32\0");
        let options = nest_start(&mut msg, TCA_OPTIONS);
        // struct tc_u32_sel: flags, offshift, nkeys, pad, offmask (be16), off (u16),
        // offoff (s16), hoff (s16), hmask (be32); then one tc_u32_key (mask, val, off,
        // offmask: 4 x u32) of all zeroes, which matches everything.
        let mut sel = vec![TC_U32_TERMINAL, 0, 1, 0];
        sel.extend_from_slice(&[0u8; 12]);
        sel.extend_from_slice(&[0u8; 16]);
        push_attr(&mut msg, TCA_U32_SEL, &sel);
        let actions = nest_start(&mut msg, TCA_U32_ACT);
        let action = nest_start(&mut msg, 1);
        push_attr(&mut msg, TCA_ACT_KIND, b"mirred\0");
        let act_options = nest_start(&mut msg, TCA_ACT_OPTIONS);
        // struct tc_mirred: tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex.
        let mut parms = Vec::with_capacity(28);
        parms.extend_from_slice(&0u32.to_ne_bytes());
        parms.extend_from_slice(&0u32.to_ne_bytes());
        parms.extend_from_slice(&TC_ACT_STOLEN.to_ne_bytes());
        parms.extend_from_slice(&0i32.to_ne_bytes());
        parms.extend_from_slice(&0i32.to_ne_bytes());
        parms.extend_from_slice(&TCA_EGRESS_REDIR.to_ne_bytes());
        parms.extend_from_slice(&to.to_ne_bytes());
        push_attr(&mut msg, TCA_MIRRED_PARMS, &parms);
        nest_end(&mut msg, act_options);
        nest_end(&mut msg, action);
        nest_end(&mut msg, actions);
        nest_end(&mut msg, options);
        self.request(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL, &msg)
    }

    /// Whether interface `index` has an ingress qdisc.
    #[cfg(test)]
    pub fn has_ingress_qdisc(&self, index: u32) -> io::Result<bool> {
        const RTM_GETQDISC: u16 = 38;
        let msgs = self.dump(RTM_GETQDISC, &tcmsg(0, 0, 0, 0))?;
        Ok(msgs.iter().any(|m| {
            m.len() >= 20
                && u32::from_ne_bytes([m[4], m[5], m[6], m[7]]) == index
                && u32::from_ne_bytes([m[12], m[13], m[14], m[15]]) == TC_H_INGRESS
        }))
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

fn align(len: usize) -> usize {
    len.div_ceil(4) * 4
}

fn read_u32(data: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(..4)?.try_into().ok()?))
}

fn c_string(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

fn ip(family: u8, data: &[u8]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::from(<[u8; 4]>::try_from(data.get(..4)?).ok()?)),
        AF_INET6 => Some(IpAddr::from(<[u8; 16]>::try_from(data.get(..16)?).ok()?)),
        _ => None,
    }
}

fn ip_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// The `AF_*` of an address.
pub fn family(a: &IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

/// The attributes in `buf`, as (type without flags, payload); stops at the first malformed one.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let typ = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let data = &buf[4..len];
        buf = &buf[align(len).min(buf.len())..];
        Some((typ, data))
    })
}

fn push_attr(buf: &mut Vec<u8>, typ: u16, data: &[u8]) {
    let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&typ.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(align(buf.len()), 0);
}

/// Starts a nested attribute; returns where its length goes.
fn nest_start(buf: &mut Vec<u8>, typ: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(typ | NLA_F_NESTED).to_ne_bytes());
    at
}

fn nest_end(buf: &mut [u8], at: usize) {
    let len = u16::try_from(buf.len() - at).unwrap_or(u16::MAX);
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

/// `struct ifinfomsg` for `index` (AF_UNSPEC).
fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut msg = vec![0u8; 4];
    msg.extend_from_slice(&index.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&change.to_ne_bytes());
    msg
}

/// `struct ifaddrmsg` with the address attributes.
fn ifaddr(index: u32, a: &Address) -> Vec<u8> {
    let mut msg = vec![family(&a.addr), a.prefix_len, 0, 0];
    msg.extend_from_slice(&index.to_ne_bytes());
    push_attr(&mut msg, IFA_LOCAL, &ip_bytes(&a.addr));
    push_attr(&mut msg, IFA_ADDRESS, &ip_bytes(&a.addr));
    msg
}

/// `struct tcmsg`.
fn tcmsg(index: u32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
    let mut msg = vec![0u8; 4];
    msg.extend_from_slice(&index.to_ne_bytes());
    msg.extend_from_slice(&handle.to_ne_bytes());
    msg.extend_from_slice(&parent.to_ne_bytes());
    msg.extend_from_slice(&info.to_ne_bytes());
    msg
}

#[cfg(test)]
mod tests;
