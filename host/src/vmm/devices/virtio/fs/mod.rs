//! virtio-fs (device id 26): a host directory served to the guest over FUSE.
//!
//! The guest mounts it with `mount -t virtiofs <tag> <dir>`. Each FUSE request arrives as one
//! descriptor chain (the request in the device-readable part, room for the reply in the
//! device-writable part); [`fuse_backend_rs`] decodes it (`api::server::Server`) and carries it
//! out on the host directory (`passthrough::PassthroughFs`), and the device returns the chain
//! with the number of reply bytes written.
//!
//! # What the device does
//!
//! - Configuration space: `tag` (36 bytes, NUL padded) and `num_request_queues` = 1.
//! - Queues: 0 is the high-priority queue (Linux sends FORGET there), 1 the
//!   single request queue. Feature bits: `VIRTIO_F_VERSION_1` only (no `EVENT_IDX`, no
//!   indirect descriptors, so the guest sizes its requests to the request queue; it is 1024
//!   entries so a 1 MiB read or write, 256 pages plus headers, fits several times over).
//! - Requests are served synchronously on the VMM event loop, through the device's own epoll
//!   set over its two queue notification eventfds ([`Fs::epoll_fd`], [`Fs::process_events`]),
//!   the same shape as the vsock device.
//!
//! # What it does not do
//!
//! - No DAX window (no shared memory region: `SETUPMAPPING`/`REMOVEMAPPING` are answered with
//!   an error, and the transport reports no shared memory regions), so file data is always
//!   copied through the queue.
//! - No notification queue (`VIRTIO_FS_F_NOTIFICATION`), so the host cannot invalidate the
//!   guest's caches: a change made on the host behind the guest's back becomes visible once
//!   the guest's cached entries and attributes time out (see Caching below), file data when
//!   the refreshed attributes show another mtime or size.
//! - No multiqueue and no worker threads: one request at a time. No writeback cache.
//!
//! # Caching
//!
//! The shared directory is meant to be a container's root file system, which nothing but the
//! container writes while it runs, so the guest may cache: entry and attribute timeouts of one
//! second absorb the burst of lookups a process start makes without letting a host-side edit
//! stay invisible for long. File data stays cached across opens (`CachePolicy::Always`: the
//! server answers every open with `FOPEN_KEEP_CACHE`), and the device asks for
//! `AUTO_INVAL_DATA` in INIT, so the guest drops a file's pages when its refreshed attributes
//! show another mtime or size. Without keeping the cache, Linux throws a file's pages away at
//! every open, even while other processes have them mapped: each exec of the container's
//! busybox or shell read the whole binary through the share again (~0.5 MB/s on kvm_pvm, so
//! seconds per process start). Extended attributes are on (security labels, capabilities on
//! binaries); writeback caching is off, so every write reaches the host before the guest's
//! `write(2)` returns.
//!
//! # Security model
//!
//! The guest is untrusted; the passthrough file system runs inside the monitor, as root, on
//! the VMM thread. What stops the guest from reaching beyond the shared directory (verified in
//! fuse-backend-rs 0.14's `passthrough` module):
//!
//! - Every inode the guest can name is an `O_PATH` file descriptor the server opened itself;
//!   the guest only ever passes inode numbers and single path components. Each lookup is one
//!   `openat(parent_fd, name, O_PATH | O_NOFOLLOW)`, and names containing `/` are refused
//!   (`EINVAL`), so no path is ever resolved across several components and no symbolic link
//!   is ever followed on the host: a guest symlink `escape -> /etc` is returned to the guest
//!   as a link target, which the guest resolves in its own namespace.
//! - `..` is allowed in LOOKUP (for NFS-style reconnection), but looked up in the root it
//!   resolves to the root itself, so the guest cannot climb above the shared directory. (The
//!   one way out is a host-side move: if a host process moves a directory the guest holds out
//!   of the shared tree, the guest can keep using it and its `..`. Nothing in husk does that.)
//!   Creating and removing operations (`mkdir`, `create`, `mknod`, `symlink`, `link`,
//!   `rename`, `unlink`, `rmdir`) refuse `.` and `..` outright.
//! - Files are opened for I/O by reopening the `O_PATH` descriptor through `/proc/self/fd`,
//!   and only regular files and directories may be opened: a device node, FIFO or socket in
//!   the shared directory (a guest may create one with MKNOD) can be created and stat'ed but
//!   never opened by the host (`EBADF`), so a guest cannot reach a host device through it.
//! - Creating operations run with the requesting guest uid/gid as the thread's effective ids
//!   (`setresuid`/`setresgid` on the calling thread only), so new files are owned by the guest
//!   user; reads and writes are done as root, the guest kernel having checked permissions.
//! - Guest-chosen sizes are bounded: a chain with more than 1 MiB plus a page of request or of
//!   reply buffers, or an extended-attribute request for more than 1 MiB, is refused by the
//!   device before the server allocates anything for it; the server refuses a header claiming
//!   more. Replies are written only inside the guest's writable descriptors.
//! - The shared directory is resolved to an absolute path without symbolic links when the
//!   device is created, and opened by that path (last component `O_NOFOLLOW`) each time the
//!   guest mounts; a host process that can rename directories on that path can redirect the
//!   next mount.
//!
//! What it does not protect: the host directory is writable by the guest, as root on the
//! host, including setuid bits and device nodes it creates there; share only a directory
//! that the host does not execute from or trust. Each inode the guest keeps looked up holds
//! one file descriptor in the monitor until the guest forgets it, so the monitor's
//! `RLIMIT_NOFILE` bounds how much of the tree the guest can cache.
//!
//! # Process-wide side effects
//!
//! The passthrough file system sets the process umask to 0 when the guest mounts (so that new
//! files get exactly the mode the guest asked for; the guest applies its own umask). The umask
//! is shared by every thread of the monitor unless the serving thread has its own
//! (`unshare(CLONE_FS)`).
//!
//! # Guest mistakes
//!
//! A chain whose buffers lie outside guest memory, a request shorter than a FUSE header, an
//! oversized request (above), an opcode the FUSE ABI leaves unassigned, or a request the server
//! cannot decode is logged (rate limited) and the chain returned: with an error reply
//! (`EINVAL`, `ENOSYS` or `EIO`) when the request has a reply and the chain has room for one,
//! with 0 bytes used otherwise. The device keeps serving the other requests.
//!
//! # INIT and DESTROY
//!
//! INIT (the guest mounts) opens the shared directory as the root inode; DESTROY (it
//! unmounts) drops every inode and handle of the session, so the next INIT starts afresh. A
//! driver reset without DESTROY (the guest crashed or unbound the driver) drops them too,
//! before the next driver's first request. The device widens the server's INIT reply to the
//! request sizes the server handles (`MAX_PAGES`, `BIG_WRITES`: 1 MiB) and to
//! `AUTO_INVAL_DATA` (see Caching), which the passthrough file system does not ask for itself.

mod request;
#[cfg(test)]
mod tests;

use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EpollEvent};

use self::request::Served;
use super::{
    ActivateError, Active, DeviceQueue, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, guest_log,
};
use crate::vmm::devices::persist::Persist;

/// `VIRTIO_ID_FS`.
const VIRTIO_ID_FS: u32 = 26;

/// Longest tag the configuration space holds.
pub const TAG_MAX_LEN: usize = 36;

/// `struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }`
const CONFIG_LEN: usize = TAG_MAX_LEN + 4;

/// The high-priority queue (FORGET, BATCH_FORGET).
const HIPRIO: usize = 0;
/// The request queue.
const REQUEST: usize = 1;

/// Queue max sizes. See the module docs for the request queue's size.
const QUEUE_SIZES: [u16; 2] = {
    let mut sizes = [0; 2];
    sizes[HIPRIO] = 256;
    sizes[REQUEST] = 1024;
    sizes
};

/// Most chains served from one queue per [`Fs::process_events`] call. A request can be a 1 MiB
/// read or write or a large directory listing, so a full request queue is seconds of work
/// on a slow disk; the VMM thread also carries stop requests and the vsock control channel,
/// which must not wait that long. What is left is picked up on the next turn of the event loop
/// (the device re-arms its own notification).
const MAX_CHAINS_PER_CALL: usize = 32;

/// How long the guest may cache names and attributes (see the module docs).
const CACHE_TIMEOUT: Duration = Duration::from_secs(1);

/// The file system the device serves.
type Passthrough = PassthroughFs<()>;

/// Why a virtio-fs device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// the virtio-fs tag {tag:?} is {len} bytes long; 1 to 36 are allowed
    #[error("the virtio-fs tag {tag:?} is {len} bytes long; 1 to 36 are allowed")]
    TagLength {
        /// The tag.
        tag: String,
        /// Its length in bytes.
        len: usize,
    },
    /// the virtio-fs tag {0:?} contains a NUL or newline, which Linux refuses
    #[error("the virtio-fs tag {0:?} contains a NUL or newline, which Linux refuses")]
    TagCharacter(String),
    /// cannot share {path}
    #[error("cannot share {path}")]
    SharedDir {
        /// The directory.
        path: PathBuf,
        /// Why it could not be resolved.
        #[source]
        source: io::Error,
    },
    /// cannot share {0}: not a directory
    #[error("cannot share {0}: not a directory")]
    NotADirectory(PathBuf),
    /// cannot share {0}: the path is not valid UTF-8
    #[error("cannot share {0}: the path is not valid UTF-8")]
    NonUtf8Path(PathBuf),
    /// cannot set up the passthrough file system for {path}
    #[error("cannot set up the passthrough file system for {path}")]
    Passthrough {
        /// The directory.
        path: PathBuf,
        /// What failed (opening `/proc/self/fd` or `/proc/self/mountinfo`).
        #[source]
        source: io::Error,
    },
    /// cannot set up the device's epoll set
    #[error("cannot set up the device's epoll set")]
    Epoll(#[source] io::Error),
    /// The saved guest had the share mounted.
    #[error(
        "the saved guest had virtio-fs {0:?} mounted: its FUSE session (inodes, open files) \
         lived in the VMM that saved it and cannot be restored"
    )]
    SavedMounted(String),
}

/// What a snapshot keeps of the device: its tag, and whether the guest had mounted it. Only
/// a device that was not mounted can be restored (onto another directory): a mount's inodes
/// and open files are fds of the VMM that saved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// The tag.
    pub tag: String,
    /// The guest had mounted it (INIT without DESTROY).
    pub mounted: bool,
}

impl Persist for Fs {
    type State = FsState;
    /// The directory the restored device serves.
    type ConstructorArgs = PathBuf;
    type Error = FsError;

    fn save(&self) -> FsState {
        FsState {
            tag: self.tag().to_owned(),
            mounted: self.mounted || self.stale_session,
        }
    }

    fn restore(shared_dir: PathBuf, state: &FsState) -> Result<Self, FsError> {
        if state.mounted {
            return Err(FsError::SavedMounted(state.tag.clone()));
        }
        Fs::new(&state.tag, &shared_dir)
    }
}

/// The virtio-fs device. See the module docs.
pub struct Fs {
    config: [u8; CONFIG_LEN],
    shared_dir: PathBuf,
    /// The file system, also held by `server`: [`Fs::reset`] needs to reach it.
    fs: Arc<Passthrough>,
    server: Server<Arc<Passthrough>>,
    epoll: Epoll,
    acked_features: u64,
    active: Option<Active>,
    /// The guest has mounted (INIT) and not yet unmounted (DESTROY).
    mounted: bool,
    /// The driver was reset while mounted: the inodes and handles of that session must be
    /// dropped before the next driver's requests are served.
    stale_session: bool,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("tag", &self.tag())
            .field("shared_dir", &self.shared_dir)
            .field("acked_features", &self.acked_features)
            .field("active", &self.active)
            .field("mounted", &self.mounted)
            .finish_non_exhaustive()
    }
}

impl Fs {
    /// A device that serves `shared_dir` (which must exist and be a directory) under `tag`
    /// (1 to 36 bytes, no NUL or newline), the name the guest mounts it by.
    ///
    /// The directory is resolved now (symbolic links included) and opened again by that
    /// resolved path each time the guest mounts.
    pub fn new(tag: &str, shared_dir: &Path) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_MAX_LEN {
            return Err(FsError::TagLength {
                tag: tag.to_owned(),
                len: tag.len(),
            });
        }
        if tag.bytes().any(|b| b == 0 || b == b'\n') {
            return Err(FsError::TagCharacter(tag.to_owned()));
        }
        let dir = shared_dir
            .canonicalize()
            .map_err(|source| FsError::SharedDir {
                path: shared_dir.to_owned(),
                source,
            })?;
        let metadata = dir.metadata().map_err(|source| FsError::SharedDir {
            path: shared_dir.to_owned(),
            source,
        })?;
        if !metadata.is_dir() {
            return Err(FsError::NotADirectory(shared_dir.to_owned()));
        }
        let root_dir = dir
            .to_str()
            .ok_or_else(|| FsError::NonUtf8Path(shared_dir.to_owned()))?
            .to_owned();
        let fs_config = Config {
            root_dir,
            do_import: true,
            cache_policy: CachePolicy::Always,
            entry_timeout: CACHE_TIMEOUT,
            attr_timeout: CACHE_TIMEOUT,
            xattr: true,
            writeback: false,
            ..Config::default()
        };
        let fs = Arc::new(
            Passthrough::new(fs_config).map_err(|source| FsError::Passthrough {
                path: dir.clone(),
                source,
            })?,
        );
        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_MAX_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Ok(Self {
            config,
            shared_dir: dir,
            server: Server::new(fs.clone()),
            fs,
            epoll: Epoll::new().map_err(FsError::Epoll)?,
            acked_features: 0,
            active: None,
            mounted: false,
            stale_session: false,
        })
    }

    /// The tag the guest mounts the directory by.
    pub fn tag(&self) -> &str {
        let len = self.config[..TAG_MAX_LEN]
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(TAG_MAX_LEN);
        // `new` copied the bytes from a `&str`, cut where a NUL pad starts.
        std::str::from_utf8(&self.config[..len]).unwrap_or_default()
    }

    /// The shared directory, as resolved when the device was created.
    #[cfg(test)]
    pub fn shared_dir(&self) -> &Path {
        &self.shared_dir
    }

    /// The fd the VMM polls (for `EPOLLIN`); call [`Fs::process_events`] when it is readable.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Serves what the guest queued, without blocking on the guest: at most
    /// [`MAX_CHAINS_PER_CALL`] requests per queue, then, if more wait, signals itself so the
    /// event loop comes back after its other work. Interrupts the guest if it used any buffer.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); QUEUE_SIZES.len()];
        let ready = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                eprintln!("virtio-fs: epoll_wait: {e}");
                0
            }
        };
        if let Some(active) = &self.active {
            for event in &events[..ready] {
                // Clears the notification; both queues are looked at below either way.
                active.clear_notification(event.data());
            }
        }
        self.process_queues();
    }

    fn process_queues(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        if self.stale_session {
            // The previous driver went away without unmounting: forget its inodes and
            // handles (closing their fds) before the new one mounts. Done here, on the VMM
            // thread, not in `reset`, which runs on a vCPU thread.
            self.fs.destroy();
            self.stale_session = false;
        }
        let mut used = [false; QUEUE_SIZES.len()];
        for (index, used) in used.iter_mut().enumerate() {
            let outcome = serve_queue(&self.server, active, index);
            *used = outcome.used;
            if outcome.mounted.is_some() {
                self.mounted = outcome.mounted == Some(true);
            }
            if outcome.more {
                // The event loop calls again after serving its other fds.
                if let Err(e) = active.renotify(index) {
                    eprintln!("virtio-fs: cannot re-arm queue {index}: {e}");
                }
            }
        }
        let used: Vec<usize> = (0..used.len()).filter(|&i| used[i]).collect();
        active.notify_used(&used, "virtio-fs");
    }
}

/// What serving one queue did.
struct QueueOutcome {
    /// At least one chain went to the used ring.
    used: bool,
    /// Chains are still waiting (the budget ran out).
    more: bool,
    /// The last INIT (`Some(true)`) or DESTROY (`Some(false)`) served, if any.
    mounted: Option<bool>,
}

/// Serves up to [`MAX_CHAINS_PER_CALL`] chains of queue `index`.
fn serve_queue<F: FileSystem + Sync>(
    server: &Server<F>,
    active: &mut Active,
    index: usize,
) -> QueueOutcome {
    let mem = &active.mem;
    let queue = &mut active.queues[index];
    let mut outcome = QueueOutcome {
        used: false,
        more: false,
        mounted: None,
    };
    for _ in 0..MAX_CHAINS_PER_CALL {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return outcome;
        };
        let head = chain.head_index();
        let Served { len, session } = request::serve(server, mem, chain);
        if session.is_some() {
            outcome.mounted = session;
        }
        if let Err(e) = queue.add_used(mem, head, len) {
            guest_log!("virtio-fs: cannot return descriptor {head} of queue {index}: {e}");
        }
        outcome.used = true;
    }
    outcome.more = queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|idx| idx != Wrapping(queue.next_avail()));
    outcome
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    /// `struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }`
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space("virtio-fs", &self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        super::refuse_config_write("virtio-fs", offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<DeviceQueue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        // Requests the driver queued before DRIVER_OK are served when its notification (or
        // the next one) reaches the event loop.
        let want = QUEUE_SIZES.len();
        self.active = Some(Active::new(&self.epoll, 0, want, mem, interrupt, queues)?);
        Ok(())
    }

    fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        // The file system stays; what the old driver had looked up and opened goes before the
        // next driver is served (on the VMM thread, see `process_queues`).
        self.stale_session |= self.mounted;
        self.mounted = false;
    }
}
