//! The `virtio_fs` target: FUSE requests through the virtio-fs device, served by the real
//! passthrough file system on a fresh scratch directory per input (holding a file, a
//! directory with a file, and a symbolic link pointing out of the share).
//!
//! Input: a queue-size byte, then operations (see `ops`); no host actions.
//!
//! The requests run as root on the host, as in the monitor: the guest may create, write and
//! grow files in the scratch directory. So that an input cannot fill the disk, the scratch
//! directories live on a 64 MiB tmpfs of their own, mounted in a private mount namespace of
//! the calling thread (`unshare(CLONE_NEWNS)` affects only that thread; libFuzzer calls the
//! target from one thread). A full tmpfs is `ENOSPC` for the guest. Without the privilege to
//! mount (not root), the target warns and uses the plain temporary directory, unbounded.
//!
//! (The bound used to be `RLIMIT_FSIZE`, which also capped the fuzzer's own log file: at
//! 16 MiB of log, the process died writing to stderr.)

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::mount::{MsFlags, mount};

use super::driver::{self, Device};
use super::ops::Ops;
use super::scratch::ScratchDir;
use crate::mount_ns::MountNsError;
use crate::vmm::devices::virtio::fs::Fs;

/// The options of the tmpfs the shares live on.
const SHARE_TMPFS: &str = "size=64m,mode=0755";

thread_local! {
    /// Where this thread's shares go (see the module docs).
    static SHARE_ROOT: PathBuf = share_root();
}

fn share_root() -> PathBuf {
    let tid = nix::unistd::gettid();
    let dir = std::env::temp_dir().join(format!("husk-fuzz-fs-{}-{tid}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the share root");
    let mounted = crate::mount_ns::enter()
        .map_err(|(MountNsError::Unshare(e) | MountNsError::MakePrivate(e))| e)
        .and_then(|()| {
            mount(
                Some("tmpfs"),
                &dir,
                Some("tmpfs"),
                MsFlags::empty(),
                Some(SHARE_TMPFS),
            )
        });
    match mounted {
        Ok(()) => dir,
        Err(e) => {
            eprintln!(
                "virtio_fs fuzz target: cannot mount a tmpfs for the shares ({e}); \
                 using {} with no bound on file sizes",
                std::env::temp_dir().display()
            );
            std::env::temp_dir()
        }
    }
}

pub(super) struct Harness {
    pub(super) dev: Arc<Mutex<Fs>>,
    // Last: removed after the device closed its descriptors.
    _dir: ScratchDir,
}

impl Harness {
    pub(super) fn new() -> Self {
        let dir = SHARE_ROOT.with(|root| ScratchDir::new_in(root, "fs"));
        let share = &dir.0;
        std::fs::write(share.join("file"), b"hello from the host\n").expect("populate");
        std::fs::create_dir(share.join("dir")).expect("populate");
        std::fs::write(share.join("dir/inner"), b"inner\n").expect("populate");
        std::os::unix::fs::symlink("/etc", share.join("escape")).expect("populate");
        let dev = Fs::new("fuzz", share).expect("a virtio-fs device");
        Self {
            dev: Arc::new(Mutex::new(dev)),
            _dir: dir,
        }
    }
}

impl Device for Harness {
    fn process(&mut self) {
        driver::lock(&self.dev).process_events();
    }
}

pub(super) fn run(data: &[u8]) {
    driver::run(data, Harness::new, |h| h.dev.clone());
}

// ---- Seeds -----------------------------------------------------------------------------------

const HIPRIO: u8 = 0;
const REQUEST: u8 = 1;
const ROOT: u64 = 1;

/// FUSE opcodes used by the seeds.
mod opc {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RENAME: u32 = 12;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const LSEEK: u32 = 46;
}

/// A request builder: each request gets its own request and reply buffers.
struct Fuse {
    ops: Ops,
    unique: u64,
}

impl Fuse {
    fn new(queue_size_byte: u8) -> Self {
        Self {
            ops: Ops::new(&[queue_size_byte]),
            unique: 0,
        }
    }

    /// Queues `opcode` on `nodeid` with `args`, a reply buffer of `reply` bytes (none if 0),
    /// and notifies.
    fn req(&mut self, queue: u8, opcode: u32, nodeid: u64, args: &[u8], reply: u32) -> &mut Self {
        self.unique += 2;
        let len = u32::try_from(40 + args.len()).expect("small");
        let mut msg = Vec::with_capacity(40 + args.len());
        msg.extend_from_slice(&len.to_le_bytes());
        msg.extend_from_slice(&opcode.to_le_bytes());
        msg.extend_from_slice(&self.unique.to_le_bytes());
        msg.extend_from_slice(&nodeid.to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes()); // uid
        msg.extend_from_slice(&0u32.to_le_bytes()); // gid
        msg.extend_from_slice(&1u32.to_le_bytes()); // pid
        msg.extend_from_slice(&[0; 4]); // total_extlen, padding
        msg.extend_from_slice(args);
        let request = self.ops.buf(&msg);
        if reply == 0 {
            self.ops.chain(queue, &[(request, len, false)]);
        } else {
            let out = self.ops.alloc(reply);
            self.ops
                .chain(queue, &[(request, len, false), (out, reply, true)]);
        }
        self.ops.notify(queue);
        self
    }

    fn init(&mut self) -> &mut Self {
        // major 7, minor 31, max_readahead, flags: none.
        self.req(REQUEST, opc::INIT, 0, &le(&[7, 31, 0x2_0000, 0]), 256)
    }

    fn finish(self) -> Vec<u8> {
        self.ops.finish()
    }
}

fn le(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn name(n: &str) -> Vec<u8> {
    let mut v = n.as_bytes().to_vec();
    v.push(0);
    v
}

/// `struct fuse_read_in` / `fuse_write_in`: fh, offset, size, flags, lock_owner, flags, pad.
fn io_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&fh.to_le_bytes());
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&size.to_le_bytes());
    v.extend_from_slice(&[0; 4 + 8 + 4 + 4]);
    v
}

pub(super) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();

    // Mount, look around, read a file (inode 2 and handle 1 are the server's first).
    let mut f = Fuse::new(5);
    f.init()
        .req(REQUEST, opc::LOOKUP, ROOT, &name("file"), 256)
        .req(REQUEST, opc::GETATTR, 2, &[0; 16], 256)
        .req(REQUEST, opc::OPEN, 2, &le(&[0, 0]), 256)
        .req(REQUEST, opc::READ, 2, &io_in(1, 0, 4096), 4096 + 16)
        .req(
            REQUEST,
            opc::LSEEK,
            2,
            &[&1u64.to_le_bytes()[..], &[0; 16]].concat(),
            64,
        )
        .req(REQUEST, opc::FLUSH, 2, &[0; 24], 64)
        .req(REQUEST, opc::RELEASE, 2, &[0; 24], 64)
        .req(REQUEST, opc::STATFS, ROOT, &[], 256)
        .req(HIPRIO, opc::FORGET, 2, &1u64.to_le_bytes(), 0)
        .req(REQUEST, opc::DESTROY, 0, &[], 64);
    out.push(("mount_read", f.finish()));

    // Directories: list the root, follow the link, climb with "..".
    let mut f = Fuse::new(4);
    f.init()
        .req(REQUEST, opc::OPENDIR, ROOT, &le(&[0, 0]), 256)
        .req(REQUEST, opc::READDIR, ROOT, &io_in(1, 0, 4096), 4096)
        .req(REQUEST, opc::READDIRPLUS, ROOT, &io_in(1, 0, 4096), 4096)
        .req(REQUEST, opc::LOOKUP, ROOT, &name("escape"), 256)
        .req(REQUEST, opc::READLINK, 2, &[], 256)
        .req(REQUEST, opc::LOOKUP, ROOT, &name(".."), 256)
        .req(REQUEST, opc::LOOKUP, ROOT, &name("dir"), 256)
        .req(REQUEST, opc::LOOKUP, 4, &name("inner"), 256)
        .req(REQUEST, opc::LOOKUP, 4, &name(".."), 256);
    out.push(("directories", f.finish()));

    // Create and write: mkdir, create+write, symlink, mknod, xattrs, setattr, rename, unlink.
    let mut f = Fuse::new(6);
    let mut create = le(&[0o100_644, 0o644, 0o022, 0]);
    create.extend_from_slice(&name("new"));
    let mut write = io_in(1, 0, 5);
    write.extend_from_slice(b"data!");
    let mut setxattr = le(&[5, 0]);
    setxattr.extend_from_slice(&name("user.k"));
    setxattr.extend_from_slice(b"value");
    let mut setattr = vec![0u8; 88];
    setattr[0] = 1 << 3; // FATTR_SIZE
    setattr[16..24].copy_from_slice(&100u64.to_le_bytes());
    let mut rename = 1u64.to_le_bytes().to_vec();
    rename.extend_from_slice(&name("new"));
    rename.extend_from_slice(&name("renamed"));
    let mut mknod = le(&[0o010_644, 0, 0o022, 0]);
    mknod.extend_from_slice(&name("fifo"));
    f.init()
        .req(
            REQUEST,
            opc::MKDIR,
            ROOT,
            &[&le(&[0o755, 0o022])[..], &name("sub")].concat(),
            256,
        )
        .req(REQUEST, opc::CREATE, ROOT, &create, 256)
        .req(REQUEST, opc::WRITE, 3, &write, 64)
        .req(
            REQUEST,
            opc::FALLOCATE,
            3,
            &[
                &1u64.to_le_bytes()[..],
                &[0; 8],
                &4096u64.to_le_bytes(),
                &[0; 8],
            ]
            .concat(),
            64,
        )
        .req(REQUEST, opc::SETATTR, 3, &setattr, 256)
        .req(REQUEST, opc::SETXATTR, 3, &setxattr, 64)
        .req(
            REQUEST,
            opc::GETXATTR,
            3,
            &[&le(&[64, 0])[..], &name("user.k")].concat(),
            128,
        )
        .req(REQUEST, opc::LISTXATTR, 3, &le(&[64, 0]), 128)
        .req(
            REQUEST,
            opc::SYMLINK,
            ROOT,
            &[&name("ln")[..], &name("/")].concat(),
            256,
        )
        .req(REQUEST, opc::MKNOD, ROOT, &mknod, 256)
        .req(REQUEST, opc::RENAME, ROOT, &rename, 64)
        .req(REQUEST, opc::UNLINK, ROOT, &name("renamed"), 64);
    out.push(("create_write", f.finish()));

    // Malformed: a truncated header, no reply buffer, a header claiming a huge length, an
    // unassigned opcode, a request before INIT.
    let mut f = Fuse::new(3);
    let short = f.ops.buf(&[40, 0, 0, 0, 26, 0]);
    f.ops.chain(REQUEST, &[(short, 6, false)]);
    f.req(REQUEST, opc::GETATTR, ROOT, &[0; 16], 0)
        .req(REQUEST, 7, ROOT, &[], 64)
        .req(REQUEST, opc::LOOKUP, ROOT, &name("file"), 256);
    let huge = f.ops.buf(
        &[
            &0xffff_fff0u32.to_le_bytes()[..],
            &le(&[opc::WRITE, 9, 0, 2, 0, 0, 0, 0, 0]),
        ]
        .concat(),
    );
    let reply = f.ops.alloc(64);
    f.ops
        .chain(REQUEST, &[(huge, 40, false), (reply, 64, true)]);
    f.ops.notify(REQUEST);
    out.push(("malformed", f.finish()));

    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shares are bounded by a tmpfs, not by a process-wide file size limit (which also
    /// limited the fuzzer's own log and killed a 10-minute run at 16 MiB of log).
    #[test]
    fn shares_live_on_a_bounded_tmpfs_and_files_elsewhere_are_unbounded() {
        run(&super::seeds()[0].1);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct we pass, which lives across the call.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit) };
        assert_eq!(rc, 0);
        assert_eq!(limit.rlim_cur, libc::RLIM_INFINITY);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: the tmpfs for the shares needs root");
            return;
        }
        let root = SHARE_ROOT.with(Clone::clone);
        let fs = nix::sys::statfs::statfs(&root).unwrap();
        assert_eq!(fs.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC);
        let bytes = fs.blocks() * u64::try_from(fs.block_size()).unwrap();
        assert_eq!(bytes, 64 << 20);
    }
}
