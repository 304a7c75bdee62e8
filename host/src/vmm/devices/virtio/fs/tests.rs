//! Device tests: the test plays the guest's FUSE driver on real guest memory (queues laid out
//! by hand, requests built from the FUSE ABI structs) against real files in a temporary
//! directory.

use std::ffi::CStr;
use std::mem::size_of;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, Dirent, EntryOut, FsOptions, GetattrIn, GetxattrIn, GetxattrOut, InHeader,
    InitIn, InitIn2, InitOut, KERNEL_MINOR_VERSION, KERNEL_VERSION, LinkIn, LseekIn, LseekOut,
    MkdirIn, MknodIn, Opcode, OpenIn, OpenOptions, OpenOut, OutHeader, ROOT_ID, ReadIn, ReleaseIn,
    Rename2In, SetattrIn, SetattrValid, SetxattrIn, WriteIn, WriteOut,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Fs, FsError, HIPRIO, MAX_CHAINS_PER_CALL, REQUEST};
use crate::vmm::devices::persist::Persist;
use crate::vmm::devices::virtio::test_utils::{Buf, TestQueue, guest_memory, read_guest};
use crate::vmm::devices::virtio::{DeviceQueue, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice};

const TAG: &str = "rootfs";
const QSIZE: u16 = 256;
/// Room for a reply body in each request chain.
const OUT_BODY: u32 = 16 * 1024;
const HDR: usize = size_of::<InHeader>();
const OUT_HDR: u32 = 16;

/// A directory for the test's files, removed afterwards.
struct TestDir(PathBuf);

impl TestDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("husk-fs-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A FUSE request: header fields the test sets, and the bytes after the header.
struct Msg {
    opcode: Opcode,
    nodeid: u64,
    uid: u32,
    gid: u32,
    body: Vec<u8>,
}

impl Msg {
    fn new(opcode: Opcode, nodeid: u64) -> Self {
        Self {
            opcode,
            nodeid,
            uid: 0,
            gid: 0,
            body: Vec::new(),
        }
    }

    /// Appends a request struct.
    fn arg<T: ByteValued>(mut self, arg: T) -> Self {
        self.body.extend_from_slice(arg.as_slice());
        self
    }

    /// Appends a NUL-terminated name.
    fn name(mut self, name: &str) -> Self {
        self.body.extend_from_slice(name.as_bytes());
        self.body.push(0);
        self
    }

    fn bytes(mut self, data: &[u8]) -> Self {
        self.body.extend_from_slice(data);
        self
    }

    fn creds(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    fn encode(&self, unique: u64) -> Vec<u8> {
        let header = InHeader {
            len: u32::try_from(HDR + self.body.len()).unwrap(),
            opcode: self.opcode as u32,
            unique,
            nodeid: self.nodeid,
            uid: self.uid,
            gid: self.gid,
            pid: 42,
            padding: 0,
        };
        let mut raw = header.as_slice().to_vec();
        raw.extend_from_slice(&self.body);
        raw
    }
}

/// A reply as the guest reads it.
#[derive(Debug)]
struct Reply {
    header: OutHeader,
    body: Vec<u8>,
    /// The used length the device reported.
    used: u32,
}

impl Reply {
    fn errno(&self) -> i32 {
        -self.header.error
    }

    /// The reply struct, after checking that the request succeeded.
    fn ok<T: ByteValued>(&self) -> T {
        assert_eq!(self.header.error, 0, "request failed: {self:?}");
        *T::from_slice(&self.body[..size_of::<T>()]).unwrap()
    }
}

/// The guest driver: both queues, buffers in guest memory, and the device under test.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    dev: Fs,
    irq: Arc<Interrupt>,
    queues: Vec<TestQueue<'a>>,
    kicks: Vec<EventFd>,
    next_buf: u64,
    unique: u64,
    dir: TestDir,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let dir = TestDir::new();
        let dev = Fs::new(TAG, &dir.0).unwrap();
        let mut guest = Self {
            mem,
            dev,
            irq: Arc::new(Interrupt::new().unwrap()),
            queues: Vec::new(),
            kicks: Vec::new(),
            next_buf: 0x10_0000,
            unique: 0,
            dir,
        };
        guest.activate();
        guest
    }

    /// What the transport does at DRIVER_OK: fresh queues and notification eventfds.
    fn activate(&mut self) {
        self.queues = (0..2)
            .map(|i| TestQueue::new(self.mem, 0x1_0000 * (i + 1), QSIZE))
            .collect();
        self.kicks = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let queues = self
            .queues
            .iter()
            .zip(&self.kicks)
            .map(|(q, kick)| DeviceQueue {
                queue: q.queue(),
                notify: kick.try_clone().unwrap(),
            })
            .collect();
        self.dev.ack_features(VIRTIO_F_VERSION_1);
        self.dev
            .activate(self.mem.clone(), self.irq.clone(), queues)
            .unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len).next_multiple_of(16);
        if self.next_buf + len > 0xf0_0000 {
            self.next_buf = 0x10_0000;
        }
        let addr = self.next_buf;
        self.next_buf += len;
        addr
    }

    /// Makes a chain available on `queue`: `request` in one readable buffer, then writable
    /// buffers of the sizes in `out`. Returns the head and the writable buffers' addresses.
    fn push(&mut self, queue: usize, request: &[u8], out: &[u32]) -> (u16, Vec<u64>) {
        let len = u32::try_from(request.len()).unwrap();
        let addr = self.alloc(len);
        self.mem.write_slice(request, GuestAddress(addr)).unwrap();
        let mut bufs = vec![Buf::readable(addr, len)];
        let mut out_addrs = Vec::new();
        for &size in out {
            let out_addr = self.alloc(size);
            // What a previous request left there: the device must not mistake it for a reply.
            self.mem
                .write_slice(
                    &vec![0xa5; usize::try_from(size).unwrap()],
                    GuestAddress(out_addr),
                )
                .unwrap();
            bufs.push(Buf::writable(out_addr, size));
            out_addrs.push(out_addr);
        }
        (self.queues[queue].add_chain(&bufs), out_addrs)
    }

    /// Notifies `queue` and lets the device run once.
    fn kick(&mut self, queue: usize) {
        self.kicks[queue].write(1).unwrap();
        self.dev.process_events();
    }

    /// Sends `msg` the way Linux lays a request out (the reply header and the reply body in
    /// separate writable buffers) and returns the reply.
    fn call(&mut self, msg: Msg) -> Reply {
        self.call_with_room(msg, OUT_BODY)
    }

    /// [`Guest::call`] with `room` bytes for the reply body.
    fn call_with_room(&mut self, msg: Msg, room: u32) -> Reply {
        self.unique += 2;
        let unique = self.unique;
        let (head, out) = self.push(REQUEST, &msg.encode(unique), &[OUT_HDR, room]);
        self.kick(REQUEST);
        let used = self.queues[REQUEST].take_used();
        assert_eq!(used.len(), 1, "one chain used: {used:?}");
        assert_eq!(used[0].0, head);
        let reply = self.read_reply(used[0].1, &out);
        assert_eq!(reply.header.unique, unique, "{reply:?}");
        assert_eq!(
            reply.header.len, reply.used,
            "header length matches the used length"
        );
        reply
    }

    /// The reply in the writable buffers at `out` (header, body), `used` bytes long.
    fn read_reply(&self, used: u32, out: &[u64]) -> Reply {
        let header = if used >= OUT_HDR {
            *OutHeader::from_slice(&read_guest(self.mem, out[0], 16)).unwrap()
        } else {
            OutHeader::default()
        };
        let body_len = usize::try_from(used.saturating_sub(OUT_HDR)).unwrap();
        let body = match out.get(1) {
            Some(&addr) => read_guest(self.mem, addr, body_len),
            None => Vec::new(),
        };
        Reply { header, body, used }
    }

    /// INIT as Linux 6.1 sends it (7.37, the extended flags, readdirplus, large pages).
    fn init(&mut self) -> InitOut {
        let flags = (FsOptions::ASYNC_READ
            | FsOptions::BIG_WRITES
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::MAX_PAGES
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::AUTO_INVAL_DATA
            | FsOptions::INIT_EXT)
            .bits();
        let msg = Msg::new(Opcode::Init, 0)
            .arg(InitIn {
                major: 7,
                minor: 37,
                max_readahead: 128 * 1024,
                flags: u32::try_from(flags & 0xffff_ffff).unwrap(),
            })
            .arg(InitIn2 {
                flags2: u32::try_from(flags >> 32).unwrap(),
                unused: [0; 11],
            });
        self.call(msg).ok()
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Reply {
        self.call(Msg::new(Opcode::Lookup, parent).name(name))
    }

    fn lookup_ok(&mut self, parent: u64, name: &str) -> EntryOut {
        self.lookup(parent, name).ok()
    }

    fn open(&mut self, opcode: Opcode, nodeid: u64, flags: i32) -> u64 {
        let msg = Msg::new(opcode, nodeid).arg(OpenIn {
            flags: u32::try_from(flags).unwrap(),
            fuse_flags: 0,
        });
        self.call(msg).ok::<OpenOut>().fh
    }

    fn read(&mut self, opcode: Opcode, nodeid: u64, fh: u64, offset: u64, size: u32) -> Reply {
        self.call(Msg::new(opcode, nodeid).arg(ReadIn {
            fh,
            offset,
            size,
            ..ReadIn::default()
        }))
    }

    fn getattr(&mut self, nodeid: u64) -> Reply {
        self.call(Msg::new(Opcode::Getattr, nodeid).arg(GetattrIn::default()))
    }
}

/// The names in a READDIR reply.
fn dirent_names(mut body: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    while body.len() >= size_of::<Dirent>() {
        let dirent = *Dirent::from_slice(&body[..size_of::<Dirent>()]).unwrap();
        let namelen = usize::try_from(dirent.namelen).unwrap();
        let name = &body[size_of::<Dirent>()..size_of::<Dirent>() + namelen];
        names.push(String::from_utf8(name.to_vec()).unwrap());
        let step = (size_of::<Dirent>() + namelen).next_multiple_of(8);
        body = &body[step.min(body.len())..];
    }
    names.sort();
    names
}

#[test]
fn new_checks_the_tag_and_the_directory() {
    let dir = TestDir::new();
    let file = dir.0.join("file");
    std::fs::write(&file, b"x").unwrap();
    let missing = dir.0.join("missing");

    assert!(matches!(
        Fs::new("", &dir.0),
        Err(FsError::TagLength { len: 0, .. })
    ));
    let long = "t".repeat(37);
    assert!(matches!(
        Fs::new(&long, &dir.0),
        Err(FsError::TagLength { len: 37, .. })
    ));
    assert!(Fs::new(&"t".repeat(36), &dir.0).is_ok(), "36 bytes fit");
    assert!(matches!(
        Fs::new("a\0b", &dir.0),
        Err(FsError::TagCharacter(_))
    ));
    let err = Fs::new(TAG, &missing).unwrap_err();
    assert!(matches!(err, FsError::SharedDir { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
    let err = Fs::new(TAG, &file).unwrap_err();
    assert!(matches!(err, FsError::NotADirectory(_)), "{err:?}");
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
}

#[test]
fn config_space_holds_the_tag_and_one_request_queue() {
    let dir = TestDir::new();
    let dev = Fs::new(TAG, &dir.0).unwrap();
    assert_eq!(dev.device_type(), 26);
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
    assert_eq!(dev.queue_max_sizes(), &[256, 1024]);
    assert_eq!(dev.tag(), TAG);
    assert_eq!(dev.shared_dir(), dir.0.canonicalize().unwrap());

    let mut tag = [0xffu8; 36];
    dev.read_config(0, &mut tag);
    assert_eq!(&tag[..TAG.len()], TAG.as_bytes());
    assert!(tag[TAG.len()..].iter().all(|&b| b == 0), "NUL padded");
    let mut queues = [0u8; 4];
    dev.read_config(36, &mut queues);
    assert_eq!(u32::from_le_bytes(queues), 1);
    // Partial and unaligned reads, as a driver reading byte by byte does.
    let mut byte = [0u8; 1];
    dev.read_config(1, &mut byte);
    assert_eq!(byte[0], TAG.as_bytes()[1]);
    // Beyond the configuration space: left zeroed, no panic.
    let mut beyond = [0u8; 4];
    dev.read_config(38, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    dev.read_config(u64::MAX, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}

#[test]
fn init_replies_with_major_7() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let out = g.init();
    assert_eq!(out.major, KERNEL_VERSION);
    assert_eq!(out.major, 7);
    assert_eq!(out.minor, KERNEL_MINOR_VERSION);
    let flags = FsOptions::from_bits_truncate(u64::from(out.flags) | (u64::from(out.flags2) << 32));
    assert!(flags.contains(FsOptions::DO_READDIRPLUS));
    assert!(
        !flags.contains(FsOptions::WRITEBACK_CACHE),
        "no writeback cache"
    );
    // Granted by the device on top of the server's reply.
    assert!(flags.contains(FsOptions::MAX_PAGES | FsOptions::BIG_WRITES));
    assert!(
        flags.contains(FsOptions::AUTO_INVAL_DATA),
        "the guest checks its cached file data against refreshed attributes"
    );
    assert_eq!(out.max_pages, 256);
    assert_eq!(out.max_write, 1 << 20);
    assert_eq!(g.irq.status(), 1, "the guest was interrupted");
    assert!(g.irq.irq_evt().read().unwrap() >= 1);

    // A guest that offers nothing gets nothing beyond the server's reply.
    let plain: InitOut = g
        .call(Msg::new(Opcode::Init, 0).arg(InitIn {
            major: 7,
            minor: 31,
            ..InitIn::default()
        }))
        .ok();
    assert_eq!(
        (plain.major, plain.max_pages, plain.max_write),
        (7, 0, 4096)
    );
    // A 7.22 guest gets the 24-byte compat reply, left as the server wrote it.
    let old = g.call(Msg::new(Opcode::Init, 0).arg(InitIn {
        major: 7,
        minor: 22,
        flags: u32::try_from(FsOptions::BIG_WRITES.bits()).unwrap(),
        ..InitIn::default()
    }));
    assert_eq!(old.header.error, 0);
    assert_eq!(old.used, OUT_HDR + 24);
    assert_eq!(u32::from_le_bytes(old.body[0..4].try_into().unwrap()), 7);
    // A guest speaking a major version below 7 is refused.
    let ancient = g.call(Msg::new(Opcode::Init, 0).arg(InitIn {
        major: 6,
        ..InitIn::default()
    }));
    assert_eq!(ancient.errno(), libc::EPROTO);
}

#[test]
fn one_request_carries_a_mebibyte() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let out = g.init();
    let max = usize::try_from(out.max_write).unwrap();
    let create = Msg::new(Opcode::Create, ROOT_ID)
        .arg(CreateIn {
            flags: u32::try_from(libc::O_RDWR).unwrap(),
            mode: libc::S_IFREG | 0o644,
            umask: 0,
            fuse_flags: 0,
        })
        .name("big");
    let reply = g.call(create);
    let file: EntryOut = reply.ok();
    let fh = OpenOut::from_slice(&reply.body[size_of::<EntryOut>()..][..size_of::<OpenOut>()])
        .unwrap()
        .fh;
    let data: Vec<u8> = (0..max).map(|i| u8::try_from(i % 251).unwrap()).collect();
    let write = Msg::new(Opcode::Write, file.nodeid)
        .arg(WriteIn {
            fh,
            offset: 0,
            size: out.max_write,
            ..WriteIn::default()
        })
        .bytes(&data);
    let written: WriteOut = g.call(write).ok();
    assert_eq!(written.size, out.max_write);
    assert_eq!(std::fs::read(g.path("big")).unwrap(), data);
    let read = Msg::new(Opcode::Read, file.nodeid).arg(ReadIn {
        fh,
        offset: 0,
        size: out.max_write,
        ..ReadIn::default()
    });
    let reply = g.call_with_room(read, out.max_write);
    assert_eq!(reply.header.error, 0);
    assert!(reply.body == data, "read back what was written");
}

#[test]
fn lookup_getattr_open_read() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let data = b"hello, virtio-fs\n";
    std::fs::write(g.path("hello.txt"), data).unwrap();
    g.init();

    let entry = g.lookup_ok(ROOT_ID, "hello.txt");
    assert_ne!(entry.nodeid, 0);
    assert_eq!(entry.attr.size, u64::try_from(data.len()).unwrap());
    assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(entry.entry_valid, 1, "one-second entry timeout");

    let attr: AttrOut = g.getattr(entry.nodeid).ok();
    assert_eq!(attr.attr.size, u64::try_from(data.len()).unwrap());
    assert_eq!(attr.attr.ino, entry.attr.ino);
    let root: AttrOut = g.getattr(ROOT_ID).ok();
    assert_eq!(root.attr.mode & libc::S_IFMT, libc::S_IFDIR);

    let opened: OpenOut = g
        .call(Msg::new(Opcode::Open, entry.nodeid).arg(OpenIn {
            flags: u32::try_from(libc::O_RDONLY).unwrap(),
            fuse_flags: 0,
        }))
        .ok();
    // The guest keeps the file's cached pages across opens (module docs, Caching).
    assert!(
        OpenOptions::from_bits_truncate(opened.open_flags).contains(OpenOptions::KEEP_CACHE),
        "no FOPEN_KEEP_CACHE"
    );
    let fh = opened.fh;
    let reply = g.read(Opcode::Read, entry.nodeid, fh, 0, 4096);
    assert_eq!(reply.header.error, 0);
    assert_eq!(reply.body, data);
    assert_eq!(reply.used, OUT_HDR + u32::try_from(data.len()).unwrap());
    let reply = g.read(Opcode::Read, entry.nodeid, fh, 7, 5);
    assert_eq!(reply.body, b"virti");
    let reply = g.read(Opcode::Read, entry.nodeid, fh, 1000, 5);
    assert_eq!(reply.header.error, 0);
    assert!(reply.body.is_empty(), "EOF");

    let release = Msg::new(Opcode::Release, entry.nodeid).arg(ReleaseIn {
        fh,
        ..ReleaseIn::default()
    });
    assert_eq!(g.call(release).header.error, 0);
}

#[test]
fn readdir_lists_the_entries() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    std::fs::write(g.path("a.txt"), b"a").unwrap();
    std::fs::create_dir(g.path("sub")).unwrap();
    std::os::unix::fs::symlink("a.txt", g.path("link")).unwrap();
    g.init();

    let fh = g.open(Opcode::Opendir, ROOT_ID, libc::O_RDONLY);
    let reply = g.read(Opcode::Readdir, ROOT_ID, fh, 0, 4096);
    assert_eq!(reply.header.error, 0);
    assert_eq!(dirent_names(&reply.body), ["a.txt", "link", "sub"]);
}

#[test]
fn missing_names_and_bad_inodes_are_errors_in_the_reply() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    g.init();
    let reply = g.lookup(ROOT_ID, "missing");
    assert_eq!(reply.errno(), libc::ENOENT);
    assert_eq!(reply.used, OUT_HDR);
    let reply = g.getattr(0xdead_beef);
    assert_ne!(reply.errno(), 0, "unknown inode");
    // Names with a slash are refused before anything is resolved.
    std::fs::create_dir(g.path("sub")).unwrap();
    std::fs::write(g.path("sub/f"), b"x").unwrap();
    assert_eq!(g.lookup(ROOT_ID, "sub/f").errno(), libc::EINVAL);
}

#[test]
fn the_guest_cannot_climb_out_of_the_shared_directory() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    std::fs::create_dir(g.path("sub")).unwrap();
    std::os::unix::fs::symlink("/etc", g.path("escape")).unwrap();
    g.init();

    // `..` of the root is the root.
    let up = g.lookup_ok(ROOT_ID, "..");
    let root: AttrOut = g.getattr(ROOT_ID).ok();
    assert_eq!((up.nodeid, up.attr.ino), (ROOT_ID, root.attr.ino));
    // `..` of a subdirectory is the root inode itself (not another inode for the same
    // directory, whose `..` would then lead above it).
    let sub = g.lookup_ok(ROOT_ID, "sub");
    let up = g.lookup_ok(sub.nodeid, "..");
    assert_eq!(up.nodeid, ROOT_ID);
    let up = g.lookup_ok(up.nodeid, "..");
    assert_eq!(up.nodeid, ROOT_ID);
    // A symlink is an inode of its own, not what it points to on the host.
    let link = g.lookup_ok(ROOT_ID, "escape");
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(g.lookup(link.nodeid, "passwd").errno(), libc::ENOTDIR);
    let target = g.call(Msg::new(Opcode::Readlink, link.nodeid));
    assert_eq!(target.header.error, 0);
    assert_eq!(target.body, b"/etc");
    // Nothing can be created under `..`.
    let mkdir = Msg::new(Opcode::Mkdir, ROOT_ID)
        .arg(MkdirIn {
            mode: 0o755,
            umask: 0,
        })
        .name("..");
    assert_eq!(g.call(mkdir).errno(), libc::EINVAL);
}

/// Everything a container's root file system sees besides reads: the test doubles as the
/// list of syscalls the serving path makes (run it under `strace -f`).
#[test]
fn writes_and_metadata_reach_the_host() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    // Guest user 1000 creates in the root: the host checks that as uid 1000 (with the mode
    // set explicitly, as the passthrough's umask(0) on INIT makes the process umask depend
    // on which test mounted first).
    std::fs::set_permissions(&g.dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    g.init();

    // MKDIR and CREATE as a guest user: the host files belong to that user.
    let mkdir = Msg::new(Opcode::Mkdir, ROOT_ID)
        .creds(1000, 1000)
        .arg(MkdirIn {
            mode: 0o750,
            umask: 0o022,
        })
        .name("dir");
    let dir: EntryOut = g.call(mkdir).ok();
    let meta = std::fs::metadata(g.path("dir")).unwrap();
    assert!(meta.is_dir());
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    assert_eq!(meta.permissions().mode() & 0o777, 0o750);

    let create = Msg::new(Opcode::Create, dir.nodeid)
        .creds(1000, 1000)
        .arg(CreateIn {
            flags: u32::try_from(libc::O_RDWR).unwrap(),
            mode: libc::S_IFREG | 0o640,
            umask: 0o022,
            fuse_flags: 0,
        })
        .name("file");
    let reply = g.call(create);
    let file: EntryOut = reply.ok();
    let fh = OpenOut::from_slice(&reply.body[size_of::<EntryOut>()..][..size_of::<OpenOut>()])
        .unwrap()
        .fh;
    assert_eq!(std::fs::metadata(g.path("dir/file")).unwrap().uid(), 1000);

    // WRITE, FSYNC, FALLOCATE, LSEEK.
    let data = b"written by the guest";
    let write = Msg::new(Opcode::Write, file.nodeid)
        .arg(WriteIn {
            fh,
            offset: 0,
            size: u32::try_from(data.len()).unwrap(),
            ..WriteIn::default()
        })
        .bytes(data);
    let written: WriteOut = g.call(write).ok();
    assert_eq!(written.size, u32::try_from(data.len()).unwrap());
    assert_eq!(std::fs::read(g.path("dir/file")).unwrap(), data);
    let fsync = Msg::new(Opcode::Fsync, file.nodeid).arg(fuse_backend_rs::abi::fuse_abi::FsyncIn {
        fh,
        ..Default::default()
    });
    assert_eq!(g.call(fsync).header.error, 0);
    let fdatasync =
        Msg::new(Opcode::Fsync, file.nodeid).arg(fuse_backend_rs::abi::fuse_abi::FsyncIn {
            fh,
            fsync_flags: 1, // FUSE_FSYNC_FDATASYNC
            padding: 0,
        });
    assert_eq!(g.call(fdatasync).header.error, 0);
    // FLUSH: Linux sends one on every close(2) of the file.
    let flush = Msg::new(Opcode::Flush, file.nodeid).arg(fuse_backend_rs::abi::fuse_abi::FlushIn {
        fh,
        ..Default::default()
    });
    assert_eq!(g.call(flush).header.error, 0);
    let fallocate =
        Msg::new(Opcode::Fallocate, file.nodeid).arg(fuse_backend_rs::abi::fuse_abi::FallocateIn {
            fh,
            offset: 0,
            length: 8192,
            mode: 0,
            padding: 0,
        });
    assert_eq!(g.call(fallocate).header.error, 0);
    assert_eq!(std::fs::metadata(g.path("dir/file")).unwrap().len(), 8192);
    let lseek = Msg::new(Opcode::Lseek, file.nodeid).arg(LseekIn {
        fh,
        offset: 0,
        whence: 3, // SEEK_DATA
        padding: 0,
    });
    assert_eq!(g.call(lseek).ok::<LseekOut>().offset, 0);

    // SETATTR: truncate, chmod, chown, times.
    let setattr = Msg::new(Opcode::Setattr, file.nodeid).arg(SetattrIn {
        valid: (SetattrValid::SIZE
            | SetattrValid::MODE
            | SetattrValid::UID
            | SetattrValid::GID
            | SetattrValid::ATIME
            | SetattrValid::MTIME)
            .bits(),
        size: 7,
        mode: 0o600,
        uid: 2000,
        gid: 2000,
        atime: 1_000_000,
        mtime: 2_000_000,
        ..SetattrIn::default()
    });
    let attr: AttrOut = g.call(setattr).ok();
    assert_eq!(attr.attr.size, 7);
    let meta = std::fs::metadata(g.path("dir/file")).unwrap();
    assert_eq!(meta.len(), 7);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (2000, 2000));
    assert_eq!(meta.mtime(), 2_000_000);

    // SETATTR through the open handle, as ftruncate(2), fchmod(2) and futimens(2) send it.
    let setattr = Msg::new(Opcode::Setattr, file.nodeid).arg(SetattrIn {
        valid: (SetattrValid::SIZE | SetattrValid::MODE | SetattrValid::MTIME).bits()
            | fuse_backend_rs::abi::fuse_abi::FATTR_FH,
        fh,
        size: 5,
        mode: 0o640,
        mtime: 3_000_000,
        ..SetattrIn::default()
    });
    let attr: AttrOut = g.call(setattr).ok();
    assert_eq!((attr.attr.size, attr.attr.mode & 0o777), (5, 0o640));
    assert_eq!(
        std::fs::metadata(g.path("dir/file")).unwrap().mtime(),
        3_000_000
    );

    // Extended attributes.
    let value = b"guest value";
    let setxattr = Msg::new(Opcode::Setxattr, file.nodeid)
        .arg(SetxattrIn {
            size: u32::try_from(value.len()).unwrap(),
            flags: 0,
        })
        .name("user.husk")
        .bytes(value);
    assert_eq!(g.call(setxattr).header.error, 0);
    let getxattr = |size| {
        Msg::new(Opcode::Getxattr, file.nodeid)
            .arg(GetxattrIn { size, padding: 0 })
            .name("user.husk")
    };
    let probe: GetxattrOut = g.call(getxattr(0)).ok();
    assert_eq!(probe.size, u32::try_from(value.len()).unwrap());
    let reply = g.call(getxattr(64));
    assert_eq!(reply.header.error, 0);
    assert_eq!(reply.body, value);
    let reply = g.call(Msg::new(Opcode::Listxattr, file.nodeid).arg(GetxattrIn {
        size: 256,
        padding: 0,
    }));
    assert_eq!(reply.header.error, 0);
    assert!(reply.body.starts_with(b"user.husk\0"), "{:?}", reply.body);
    let removexattr = Msg::new(Opcode::Removexattr, file.nodeid).name("user.husk");
    assert_eq!(g.call(removexattr).header.error, 0);

    // SYMLINK, READLINK, LINK, MKNOD (a FIFO), RENAME2, UNLINK, RMDIR, STATFS.
    let symlink = Msg::new(Opcode::Symlink, ROOT_ID)
        .name("sym")
        .name("dir/file");
    let sym: EntryOut = g.call(symlink).ok();
    assert_eq!(
        std::fs::read_link(g.path("sym")).unwrap(),
        Path::new("dir/file")
    );
    let target = g.call(Msg::new(Opcode::Readlink, sym.nodeid));
    assert_eq!(target.body, b"dir/file");
    let link = Msg::new(Opcode::Link, ROOT_ID)
        .arg(LinkIn {
            oldnodeid: file.nodeid,
        })
        .name("hard");
    let hard: EntryOut = g.call(link).ok();
    assert_eq!(hard.attr.nlink, 2);
    let mknod = Msg::new(Opcode::Mknod, ROOT_ID)
        .arg(MknodIn {
            mode: libc::S_IFIFO | 0o600,
            rdev: 0,
            umask: 0,
            padding: 0,
        })
        .name("fifo");
    let fifo: EntryOut = g.call(mknod).ok();
    // The guest user cannot create where the host's permissions forbid it.
    std::fs::set_permissions(&g.dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let denied = Msg::new(Opcode::Mkdir, ROOT_ID)
        .creds(1000, 1000)
        .arg(MkdirIn {
            mode: 0o755,
            umask: 0,
        })
        .name("denied");
    assert_eq!(g.call(denied).errno(), libc::EACCES);
    // The host never opens anything but regular files and directories.
    let open = Msg::new(Opcode::Open, fifo.nodeid).arg(OpenIn {
        flags: u32::try_from(libc::O_RDONLY).unwrap(),
        fuse_flags: 0,
    });
    assert_eq!(g.call(open).errno(), libc::EBADF);
    let rename = Msg::new(Opcode::Rename2, ROOT_ID)
        .arg(Rename2In {
            newdir: dir.nodeid,
            flags: 0,
            padding: 0,
        })
        .name("hard")
        .name("moved");
    assert_eq!(g.call(rename).header.error, 0);
    assert!(g.path("dir/moved").exists());
    for (parent, name) in [(dir.nodeid, "moved"), (ROOT_ID, "sym"), (ROOT_ID, "fifo")] {
        let unlink = Msg::new(Opcode::Unlink, parent).name(name);
        assert_eq!(g.call(unlink).header.error, 0, "unlink {name}");
    }
    let statfs = g.call(Msg::new(Opcode::Statfs, ROOT_ID));
    assert_eq!(statfs.header.error, 0);
    let release = Msg::new(Opcode::Release, file.nodeid).arg(ReleaseIn {
        fh,
        ..ReleaseIn::default()
    });
    assert_eq!(g.call(release).header.error, 0);
    let unlink = Msg::new(Opcode::Unlink, dir.nodeid).name("file");
    assert_eq!(g.call(unlink).header.error, 0);
    let rmdir = Msg::new(Opcode::Rmdir, ROOT_ID).name("dir");
    assert_eq!(g.call(rmdir).header.error, 0);
    assert!(!g.path("dir").exists());

    // READDIRPLUS over what is left.
    std::fs::write(g.path("left"), b"").unwrap();
    let fh = g.open(Opcode::Opendir, ROOT_ID, libc::O_RDONLY);
    let reply = g.read(Opcode::Readdirplus, ROOT_ID, fh, 0, 4096);
    assert_eq!(reply.header.error, 0);
    let first = EntryOut::from_slice(&reply.body[..size_of::<EntryOut>()]).unwrap();
    assert_ne!(first.nodeid, 0);
    let releasedir = Msg::new(Opcode::Releasedir, ROOT_ID).arg(ReleaseIn {
        fh,
        ..ReleaseIn::default()
    });
    assert_eq!(g.call(releasedir).header.error, 0);
}

#[test]
fn destroy_then_init_remounts() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    std::fs::write(g.path("f"), b"1234").unwrap();
    g.init();
    let before = g.lookup_ok(ROOT_ID, "f");

    // DESTROY has a reply (the server reports 0 bytes for it; the device finds the header).
    let reply = g.call(Msg::new(Opcode::Destroy, 0));
    assert_eq!(reply.header.error, 0);
    assert_eq!(reply.used, OUT_HDR);
    assert_ne!(g.getattr(before.nodeid).errno(), 0, "inodes forgotten");

    let out = g.init();
    assert_eq!(out.major, 7);
    let after = g.lookup_ok(ROOT_ID, "f");
    assert_eq!(after.attr.size, 4);
    let fh = g.open(Opcode::Open, after.nodeid, libc::O_RDONLY);
    assert_eq!(g.read(Opcode::Read, after.nodeid, fh, 0, 64).body, b"1234");
}

#[test]
fn reset_drops_the_queues_and_the_old_session_but_keeps_the_file_system() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    std::fs::write(g.path("f"), b"abc").unwrap();
    g.init();
    let old = g.lookup_ok(ROOT_ID, "f");
    let old_fh = g.open(Opcode::Open, old.nodeid, libc::O_RDONLY);

    g.dev.reset();
    // Notifications after the reset reach nobody.
    let (_, _) = g.push(
        REQUEST,
        &Msg::new(Opcode::Getattr, ROOT_ID).encode(99),
        &[16],
    );
    g.kick(REQUEST);
    assert!(
        g.queues[REQUEST].take_used().is_empty(),
        "no queues after reset"
    );

    // A new driver: the same directory, none of the old driver's inodes or handles.
    g.activate();
    g.init();
    assert_ne!(g.getattr(old.nodeid).errno(), 0, "old inode dropped");
    let reply = g.read(Opcode::Read, old.nodeid, old_fh, 0, 16);
    assert_ne!(reply.errno(), 0, "old handle dropped");
    let new = g.lookup_ok(ROOT_ID, "f");
    assert_eq!(new.attr.size, 3);
}

#[test]
fn malformed_chains_are_returned_without_stopping_the_device() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    g.init();

    // A request shorter than the FUSE header.
    let (short, _) = g.push(REQUEST, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[16, 64]);
    // A request buffer outside guest memory, and one running off its end.
    let outside = g.queues[REQUEST].add_chain(&[
        Buf::readable(0x1_0000_0000, 64),
        Buf::writable(0x20_0000, 64),
    ]);
    let straddles = g.queues[REQUEST].add_chain(&[
        Buf::readable((16 << 20) - 8, 64),
        Buf::writable(0x20_0000, 64),
    ]);
    // A reply buffer outside guest memory.
    let request = Msg::new(Opcode::Getattr, ROOT_ID)
        .arg(GetattrIn::default())
        .encode(7);
    let addr = g.alloc(64);
    mem.write_slice(&request, GuestAddress(addr)).unwrap();
    let bad_reply = g.queues[REQUEST].add_chain(&[
        Buf::readable(addr, u32::try_from(request.len()).unwrap()),
        Buf::writable(0x2_0000_0000, 4096),
    ]);
    // A request that needs a reply but offers no room for one.
    let (no_room, _) = g.push(REQUEST, &request, &[]);
    // A header claiming more bytes than the chain holds: answered with EINVAL, the reply
    // header spread over three descriptors.
    let mut lying = Msg::new(Opcode::Lookup, ROOT_ID).name("x").encode(11);
    lying[..4].copy_from_slice(&4096u32.to_le_bytes());
    let (lies, lies_out) = g.push(REQUEST, &lying, &[4, 4, 8, 256]);
    // An opcode the FUSE ABI leaves unassigned.
    let mut unassigned = Msg::new(Opcode::Getattr, ROOT_ID)
        .arg(GetattrIn::default())
        .encode(13);
    unassigned[4..8].copy_from_slice(&7u32.to_le_bytes());
    let (unknown, unknown_out) = g.push(REQUEST, &unassigned, &[16, 64]);
    // A name without its NUL: the server answers EINVAL itself.
    let mut no_nul = Msg::new(Opcode::Lookup, ROOT_ID).bytes(b"abc").encode(15);
    no_nul.truncate(HDR + 3);
    let (nameless, nameless_out) = g.push(REQUEST, &no_nul, &[16, 64]);
    g.kick(REQUEST);

    let used = g.queues[REQUEST].take_used();
    let heads: Vec<u16> = used.iter().map(|&(h, _)| h).collect();
    assert_eq!(
        heads,
        [
            short, outside, straddles, bad_reply, no_room, lies, unknown, nameless
        ]
    );
    for &(head, len) in &used[..5] {
        assert_eq!(len, 0, "descriptor {head} returned with nothing written");
    }
    let mut header = Vec::new();
    for (&addr, len) in lies_out.iter().zip([4, 4, 8]) {
        header.extend(read_guest(&mem, addr, len));
    }
    let header = *OutHeader::from_slice(&header).unwrap();
    assert_eq!((used[5].1, header.len), (16, 16));
    assert_eq!((header.error, header.unique), (-libc::EINVAL, 11));
    let reply = g.read_reply(used[6].1, &unknown_out);
    assert_eq!((reply.errno(), reply.header.unique), (libc::ENOSYS, 13));
    let reply = g.read_reply(used[7].1, &nameless_out);
    assert_eq!((reply.errno(), reply.header.unique), (libc::EINVAL, 15));

    // Still serving.
    let root: AttrOut = g.getattr(ROOT_ID).ok();
    assert_eq!(root.attr.mode & libc::S_IFMT, libc::S_IFDIR);
}

#[test]
fn oversized_requests_are_refused_before_the_server_allocates() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    g.init();
    let alias = g.alloc(256 * 1024);

    // Request buffers of 2 MiB (eight descriptors on the same 256 KiB) behind an IOCTL that
    // asks the server to copy them all.
    let ioctl = Msg::new(Opcode::Ioctl, ROOT_ID)
        .arg(fuse_backend_rs::abi::fuse_abi::IoctlIn {
            in_size: 2 << 20,
            ..Default::default()
        })
        .encode(21);
    let addr = g.alloc(u32::try_from(ioctl.len()).unwrap());
    mem.write_slice(&ioctl, GuestAddress(addr)).unwrap();
    let (hdr, body) = (g.alloc(16), g.alloc(64));
    let mut bufs = vec![Buf::readable(addr, u32::try_from(ioctl.len()).unwrap())];
    bufs.extend((0..8).map(|_| Buf::readable(alias, 256 * 1024)));
    bufs.extend([Buf::writable(hdr, 16), Buf::writable(body, 64)]);
    g.queues[REQUEST].add_chain(&bufs);
    // Reply buffers of 2 MiB behind a READDIR.
    let fh = {
        g.kick(REQUEST);
        let used = g.queues[REQUEST].take_used();
        let reply = g.read_reply(used[0].1, &[hdr, body]);
        assert_eq!((reply.errno(), reply.header.unique), (libc::EINVAL, 21));
        g.open(Opcode::Opendir, ROOT_ID, libc::O_RDONLY)
    };
    let readdir = Msg::new(Opcode::Readdir, ROOT_ID)
        .arg(ReadIn {
            fh,
            size: 2 << 20,
            ..ReadIn::default()
        })
        .encode(23);
    let addr = g.alloc(u32::try_from(readdir.len()).unwrap());
    mem.write_slice(&readdir, GuestAddress(addr)).unwrap();
    let hdr = g.alloc(16);
    let mut bufs = vec![
        Buf::readable(addr, u32::try_from(readdir.len()).unwrap()),
        Buf::writable(hdr, 16),
    ];
    bufs.extend((0..8).map(|_| Buf::writable(alias, 256 * 1024)));
    g.queues[REQUEST].add_chain(&bufs);
    g.kick(REQUEST);
    let used = g.queues[REQUEST].take_used();
    let reply = g.read_reply(used[0].1, &[hdr]);
    assert_eq!((reply.errno(), reply.header.unique), (libc::EINVAL, 23));
    // An extended attribute buffer of 4 GiB.
    let getxattr = Msg::new(Opcode::Getxattr, ROOT_ID)
        .arg(GetxattrIn {
            size: u32::MAX,
            padding: 0,
        })
        .name("user.x");
    assert_eq!(g.call(getxattr).errno(), libc::EINVAL);
    // What Linux sends still works.
    let getxattr = Msg::new(Opcode::Getxattr, ROOT_ID)
        .arg(GetxattrIn {
            size: 65536,
            padding: 0,
        })
        .name("user.x");
    let errno = g.call(getxattr).errno();
    assert!(
        [libc::ENODATA, libc::EOPNOTSUPP].contains(&errno),
        "{errno}"
    );
}

#[test]
fn forget_on_the_hiprio_queue_has_no_reply() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    std::fs::write(g.path("f"), b"").unwrap();
    g.init();
    let entry = g.lookup_ok(ROOT_ID, "f");
    let forget = Msg::new(Opcode::Forget, entry.nodeid)
        .arg(fuse_backend_rs::abi::fuse_abi::ForgetIn { nlookup: 1 })
        .encode(0);
    let (head, _) = g.push(HIPRIO, &forget, &[]);
    g.kick(HIPRIO);
    assert_eq!(g.queues[HIPRIO].take_used(), vec![(head, 0)]);
    assert_ne!(g.getattr(entry.nodeid).errno(), 0, "forgotten");
}

#[test]
fn a_full_queue_is_served_in_bounded_turns() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    g.init();
    let outer = Epoll::new().unwrap();
    outer
        .ctl(
            ControlOperation::Add,
            g.dev.epoll_fd(),
            EpollEvent::new(EventSet::IN, 1),
        )
        .unwrap();
    let mut events = [EpollEvent::default(); 2];
    assert_eq!(outer.wait(0, &mut events).unwrap(), 0, "idle");

    let total = MAX_CHAINS_PER_CALL + 8;
    for unique in 0..total {
        let msg = Msg::new(Opcode::Getattr, ROOT_ID)
            .arg(GetattrIn::default())
            .encode(u64::try_from(unique).unwrap());
        g.push(REQUEST, &msg, &[16, 256]);
    }
    g.kick(REQUEST);
    assert_eq!(g.queues[REQUEST].take_used().len(), MAX_CHAINS_PER_CALL);
    assert_eq!(
        outer.wait(0, &mut events).unwrap(),
        1,
        "the device asks to be called again"
    );
    g.dev.process_events();
    assert_eq!(g.queues[REQUEST].take_used().len(), 8);
    assert_eq!(outer.wait(0, &mut events).unwrap(), 0, "idle again");
}

#[test]
fn vmm_polls_one_fd_and_drives_the_device_through_mmio() {
    use std::sync::Mutex;

    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK,
    };
    use virtio_bindings::virtio_mmio as reg;

    use crate::vmm::devices::BusDevice;
    use crate::vmm::devices::virtio::SharedDevice;
    use crate::vmm::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};

    fn w(t: &mut MmioTransport, offset: u32, value: u32) {
        t.write(u64::from(offset), &value.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, offset: u32) -> u32 {
        let mut data = [0; 4];
        t.read(u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }
    fn halves(addr: u64) -> (u32, u32) {
        let bytes = addr.to_le_bytes();
        (
            u32::from_le_bytes(bytes[..4].try_into().unwrap()),
            u32::from_le_bytes(bytes[4..].try_into().unwrap()),
        )
    }

    let mem = guest_memory();
    let dir = TestDir::new();
    std::fs::write(dir.0.join("hello"), b"hi").unwrap();
    let fs = Arc::new(Mutex::new(Fs::new(TAG, &dir.0).unwrap()));
    let shared: SharedDevice = fs.clone();
    let mut t = MmioTransport::new(mem.clone(), shared).unwrap();
    assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_ID), 26);
    let mut config = Vec::new();
    for offset in (0..40).step_by(4) {
        let mut word = [0u8; 4];
        t.read(u64::from(reg::VIRTIO_MMIO_CONFIG + offset), &mut word);
        config.extend_from_slice(&word);
    }
    let tag = CStr::from_bytes_until_nul(&config[..36]).unwrap();
    assert_eq!(tag.to_str().unwrap(), TAG);
    assert_eq!(u32::from_le_bytes(config[36..].try_into().unwrap()), 1);

    // The driver's initialisation sequence.
    let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    w(&mut t, reg::VIRTIO_MMIO_STATUS, status);
    status |= VIRTIO_CONFIG_S_DRIVER;
    w(&mut t, reg::VIRTIO_MMIO_STATUS, status);
    w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    let high = r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES);
    w(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES, high);
    status |= VIRTIO_CONFIG_S_FEATURES_OK;
    w(&mut t, reg::VIRTIO_MMIO_STATUS, status);
    let mut queues: Vec<TestQueue<'_>> = (0..2u64)
        .map(|i| TestQueue::new(&mem, 0x1_0000 * (i + 1), QSIZE))
        .collect();
    for ((i, q), max) in (0u32..).zip(&queues).zip([256, 1024]) {
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, i);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), max);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        for (lo, hi, addr) in [
            (
                reg::VIRTIO_MMIO_QUEUE_DESC_LOW,
                reg::VIRTIO_MMIO_QUEUE_DESC_HIGH,
                q.desc_table(),
            ),
            (
                reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                q.avail_ring(),
            ),
            (
                reg::VIRTIO_MMIO_QUEUE_USED_LOW,
                reg::VIRTIO_MMIO_QUEUE_USED_HIGH,
                q.used_ring(),
            ),
        ] {
            let (l, h) = halves(addr);
            w(&mut t, lo, l);
            w(&mut t, hi, h);
        }
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }
    status |= VIRTIO_CONFIG_S_DRIVER_OK;
    w(&mut t, reg::VIRTIO_MMIO_STATUS, status);
    assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), status);

    // The VMM's loop: one fd for the whole device.
    let outer = Epoll::new().unwrap();
    let fs_fd = fs.lock().unwrap().epoll_fd();
    outer
        .ctl(
            ControlOperation::Add,
            fs_fd,
            EpollEvent::new(EventSet::IN, 7),
        )
        .unwrap();
    let mut events = [EpollEvent::default(); 4];
    assert_eq!(outer.wait(0, &mut events).unwrap(), 0, "idle");

    // INIT then LOOKUP on the request queue; the notification arrives as an MMIO write (no
    // ioeventfd in this test).
    let mut next = 0x20_0000;
    let mut send = |queue: &mut TestQueue<'_>, msg: Msg, unique| {
        let raw = msg.encode(unique);
        mem.write_slice(&raw, GuestAddress(next)).unwrap();
        let (hdr, body) = (next + 0x1000, next + 0x2000);
        queue.add_chain(&[
            Buf::readable(next, u32::try_from(raw.len()).unwrap()),
            Buf::writable(hdr, 16),
            Buf::writable(body, 4096),
        ]);
        next += 0x1_0000;
        (hdr, body)
    };
    let (init_hdr, init_body) = send(
        &mut queues[REQUEST],
        Msg::new(Opcode::Init, 0).arg(InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0,
            flags: 0,
        }),
        2,
    );
    let (lookup_hdr, lookup_body) = send(
        &mut queues[REQUEST],
        Msg::new(Opcode::Lookup, ROOT_ID).name("hello"),
        4,
    );
    t.write(
        QUEUE_NOTIFY_OFFSET,
        &u32::try_from(REQUEST).unwrap().to_le_bytes(),
    );
    assert_eq!(outer.wait(1000, &mut events).unwrap(), 1, "fs fd readable");
    assert_eq!(events[0].data(), 7);
    fs.lock().unwrap().process_events();
    let used = queues[REQUEST].take_used();
    assert_eq!(used.len(), 2);
    let header = *OutHeader::from_slice(&read_guest(&mem, init_hdr, 16)).unwrap();
    assert_eq!((header.error, header.unique), (0, 2));
    let init = *InitOut::from_slice(&read_guest(&mem, init_body, size_of::<InitOut>())).unwrap();
    assert_eq!(init.major, 7);
    let header = *OutHeader::from_slice(&read_guest(&mem, lookup_hdr, 16)).unwrap();
    assert_eq!((header.error, header.unique), (0, 4));
    let entry =
        *EntryOut::from_slice(&read_guest(&mem, lookup_body, size_of::<EntryOut>())).unwrap();
    assert_eq!(entry.attr.size, 2);
    assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    assert!(t.interrupt().irq_evt().read().unwrap() >= 1);
    w(&mut t, reg::VIRTIO_MMIO_INTERRUPT_ACK, 1);
    assert_eq!(outer.wait(0, &mut events).unwrap(), 0, "drained");

    // Reset through the status register stops the device.
    w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
    t.write(QUEUE_NOTIFY_OFFSET, &1u32.to_le_bytes());
    fs.lock().unwrap().process_events();
    assert_eq!(
        outer.wait(0, &mut events).unwrap(),
        0,
        "queue fds left the set"
    );
}

#[test]
fn only_an_unmounted_share_restores_and_then_onto_another_directory() {
    let mem = guest_memory();
    let mut g = Guest::new(&mem);
    let state = g.dev.save();
    assert_eq!(state.tag, TAG);
    assert!(!state.mounted);
    let other = TestDir::new();
    let restored = Fs::restore(other.0.clone(), &state).unwrap();
    assert_eq!(restored.tag(), TAG);
    assert_eq!(restored.shared_dir(), other.0.canonicalize().unwrap());
    g.init();
    let state = g.dev.save();
    assert!(state.mounted);
    let err = Fs::restore(other.0.clone(), &state).unwrap_err();
    assert!(matches!(err, FsError::SavedMounted(_)), "{err}");
}
