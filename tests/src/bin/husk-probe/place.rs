//! Taking the thread's place in the probe's child: its namespaces (those owned by the host's
//! user namespace first, while the child is still root there), then its ids mapped into the
//! monitor's user namespace, its capability sets, no_new_privs and dumpability, all read from
//! the thread's `/proc/PID/task/TID/status`.

use std::os::fd::{AsRawFd, OwnedFd};

use crate::args::Args;
use crate::exit::die;

/// One field of a `/proc/.../status` file.
pub(crate) fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn hex(status: &str, name: &str) -> u64 {
    u64::from_str_radix(&field(status, name), 16).unwrap_or(0)
}

/// The first host id of a `uid_map`/`gid_map` whose namespace id is `inside`, as the
/// (namespace id, host id, count) lines map it; `id` is a host id, the result the namespace's.
fn to_namespace(map: &str, id: u32) -> u32 {
    for line in map.lines() {
        let v: Vec<u32> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [inside, outside, count] = v[..]
            && id >= outside
            && id - outside < count
        {
            return inside + (id - outside);
        }
    }
    die(&format!(
        "host id {id} is not mapped in the monitor's namespace"
    ))
}

pub(crate) fn open_ns(pid: i32, tid: i32, name: &str) -> (OwnedFd, u64) {
    let path = format!("/proc/{pid}/task/{tid}/ns/{name}");
    let file = std::fs::File::open(&path).unwrap_or_else(|_| die(&path));
    let ino = std::os::unix::fs::MetadataExt::ino(&file.metadata().unwrap_or_else(|_| die(&path)));
    (file.into(), ino)
}

pub(crate) fn own_ns(name: &str) -> u64 {
    let path = format!("/proc/self/ns/{name}");
    std::fs::metadata(&path)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or_else(|_| die(&path))
}

pub(crate) fn setns(fd: &OwnedFd, what: &str) {
    // SAFETY: setns takes a namespace descriptor and a type (0: any).
    if unsafe { libc::setns(fd.as_raw_fd(), 0) } != 0 {
        die(&format!("setns {what}"));
    }
}

/// In the child: the thread's namespaces and credentials.
pub(crate) fn take_place(
    a: &Args,
    status: &str,
    uid_map: &str,
    gid_map: &str,
    ns: &[(&str, OwnedFd, u64)],
) {
    // The namespaces owned by the host's user namespace first, while this is root there.
    for (name, fd, ino) in ns {
        if matches!(*name, "user" | "mnt") || *ino == own_ns(name) {
            continue;
        }
        setns(fd, name);
    }
    for (name, fd, ino) in ns {
        if *name == "user" && *ino != own_ns("user") {
            setns(fd, "user");
        }
    }
    for (name, fd, _) in ns {
        if *name == "mnt" {
            setns(fd, "mnt");
        }
    }
    // SAFETY: chdir with a static NUL-terminated path.
    unsafe { libc::chdir(c"/".as_ptr()) };
    let ids = |name: &str, map: &str| -> Vec<u32> {
        field(status, name)
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .map(|id| to_namespace(map, id))
            .collect()
    };
    let uids = ids("Uid", uid_map);
    let gids = ids("Gid", gid_map);
    let groups: Vec<libc::gid_t> = field(status, "Groups")
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .map(|g| to_namespace(gid_map, g))
        .collect();
    // Bounding set first (dropping needs CAP_SETPCAP, which the effective set may lose).
    let bnd = hex(status, "CapBnd");
    for cap in 0..64u64 {
        if bnd & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments; an unknown capability is EINVAL, ignored.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        }
    }
    // SAFETY: prctl, setgroups, setres[ug]id with integers and a live slice.
    unsafe {
        libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0);
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
            die("setgroups");
        }
        if libc::setresgid(gids[0], gids[1], gids[2]) != 0 {
            die("setresgid");
        }
        if libc::setresuid(uids[0], uids[1], uids[2]) != 0 {
            die("setresuid");
        }
    }
    let (eff, prm, inh) = (
        hex(status, "CapEff"),
        hex(status, "CapPrm"),
        hex(status, "CapInh"),
    );
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let low = |v: u64| u32::try_from(v & 0xffff_ffff).unwrap_or(0);
    let data = [
        Data {
            effective: low(eff),
            permitted: low(prm),
            inheritable: low(inh),
        },
        Data {
            effective: low(eff >> 32),
            permitted: low(prm >> 32),
            inheritable: low(inh >> 32),
        },
    ];
    // SAFETY: capset reads the header and two data records, which live on this stack.
    if unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) } != 0 {
        die("capset");
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        if field(status, "NoNewPrivs") == "1" {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        }
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let _ = a;
}
