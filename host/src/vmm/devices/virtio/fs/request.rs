//! One FUSE request: a descriptor chain in, the server's reply out, and a reply of the device's
//! own where the server gives up on a request without answering it.
//!
//! The server writes its reply through a `Writer` it consumes, and on some errors it has
//! already written an error reply, on others nothing. So that the guest always gets either the
//! server's reply or an error (rather than a zero-length completion that Linux would take for
//! a reply whose `OutHeader` it never received), the device clears the reply's `OutHeader` in
//! guest memory before the server runs and reads it back afterwards: a non-zero `len` there
//! is the server's.

use std::mem::size_of;

use fuse_backend_rs::Error as FuseError;
use fuse_backend_rs::abi::fuse_abi::{
    FsOptions, GetxattrIn, InHeader, InitIn, InitOut, Opcode, OutHeader,
};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::{MAX_BUFFER_SIZE, MAX_REQ_PAGES, Server};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::vmm::devices::virtio::guest_log;

/// Bytes of the FUSE reply header.
const OUT_HEADER_LEN: usize = size_of::<OutHeader>();

/// The most bytes a chain's request or reply buffers may hold: the largest request the
/// server accepts (`MAX_BUFFER_SIZE` of data and a page of headers). The largest reply, a
/// 1 MiB READ with its header, is smaller.
const MAX_CHAIN_BYTES: usize = MAX_BUFFER_SIZE as usize + 4096;

/// FUSE opcodes that have no reply.
const NO_REPLY: [u32; 3] = [
    Opcode::Forget as u32,
    Opcode::BatchForget as u32,
    Opcode::Interrupt as u32,
];

/// Opcodes below the server's highest that the FUSE ABI leaves unassigned. fuse-backend-rs
/// converts a request's opcode into its `Opcode` enum with `transmute` when trace logging is
/// on, which is undefined behaviour for these; the device answers them itself.
const UNASSIGNED: [u32; 3] = [0, 7, 19];

/// The outcome of one chain.
pub(super) struct Served {
    /// Bytes written to the chain's device-writable buffers (the used length).
    pub len: u32,
    /// `Some(true)` after a successful INIT (the guest mounted), `Some(false)` after DESTROY.
    pub session: Option<bool>,
}

/// Serves the request in `chain` and returns how many bytes of reply it holds. Never fails:
/// whatever is wrong with the chain or the request is logged and answered as well as the chain
/// allows.
pub(super) fn serve<F: FileSystem + Sync>(
    server: &Server<F>,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Served {
    let head = chain.head_index();
    let dropped = Served {
        len: 0,
        session: None,
    };
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(reader) => reader,
        Err(e) => {
            guest_log!("virtio-fs: descriptor {head}: request buffers unusable: {e}");
            return dropped;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain.clone()) {
        Ok(writer) => writer,
        Err(e) => {
            guest_log!("virtio-fs: descriptor {head}: reply buffers unusable: {e}");
            return dropped;
        }
    };
    // A look at the header (the server reads its own copy): to name the request in the log,
    // and to answer it if the server does not.
    let mut peek = reader.clone();
    let header: InHeader = match peek.read_obj() {
        Ok(header) => header,
        Err(_) => {
            guest_log!(
                "virtio-fs: descriptor {head}: {} request bytes, fewer than a FUSE header",
                reader.available_bytes()
            );
            return dropped;
        }
    };
    let offered: Option<InitIn> = if header.opcode == Opcode::Init as u32 {
        peek.read_obj().ok()
    } else {
        None
    };
    let capacity = writer.available_bytes();
    let reply = WritablePrefix::locate(chain.clone(), OUT_HEADER_LEN);
    let expects_reply = !NO_REPLY.contains(&header.opcode);

    if UNASSIGNED.contains(&header.opcode) {
        guest_log!(
            "virtio-fs: request {} has the unassigned opcode {}",
            header.unique,
            header.opcode
        );
        return Served {
            len: answer_error(mem, reply.as_ref(), header.unique, libc::ENOSYS),
            session: None,
        };
    }
    if let Some(what) = oversized(&header, &peek, reader.available_bytes(), capacity) {
        guest_log!(
            "virtio-fs: request {} (opcode {}) refused: {what}",
            header.unique,
            header.opcode
        );
        let len = if expects_reply {
            answer_error(mem, reply.as_ref(), header.unique, libc::EINVAL)
        } else {
            0
        };
        return Served { len, session: None };
    }

    if let Some(reply) = &reply {
        reply.write_header(mem, &OutHeader::default());
    }
    let result = server.handle_message(reader, writer.into(), None, None);
    let written = reply.as_ref().and_then(|r| r.read_header(mem));
    let len = match result {
        Ok(len) if len > 0 => to_u32(len),
        // DESTROY writes its reply but reports 0 bytes; the no-reply opcodes write nothing.
        Ok(_) => written.map_or(0, |out| reply_len(&out, capacity)),
        Err(e) => {
            guest_log!(
                "virtio-fs: request {} (opcode {}) failed: {e}",
                header.unique,
                header.opcode
            );
            match written {
                // The server answered with an error before giving up: keep its answer.
                Some(out) if out.len != 0 && out.error != 0 => reply_len(&out, capacity),
                _ if expects_reply => {
                    answer_error(mem, reply.as_ref(), header.unique, errno_for(&e))
                }
                _ => 0,
            }
        }
    };
    let session = if header.opcode == Opcode::Init as u32 {
        // A failed INIT (an unsupported major version) leaves the guest unmounted.
        written
            .filter(|out| out.len != 0 && out.error == 0)
            .map(|_| true)
    } else if header.opcode == Opcode::Destroy as u32 {
        Some(false)
    } else {
        None
    };
    if let (Some(true), Some(offered)) = (session, offered) {
        widen_init_reply(mem, chain, &offered, len);
    }
    Served { len, session }
}

/// Raises the limits in a successful INIT reply to what the server handles, and asks for the
/// cache check that lets the guest keep file data between opens.
///
/// The passthrough file system asks for neither `BIG_WRITES` nor `MAX_PAGES`, so the server's
/// INIT reply holds Linux to 4 KiB per WRITE and 32 pages per READ, although the server takes
/// requests of up to 1 MiB (`MAX_BUFFER_SIZE`) and replies of 256 pages (`MAX_REQ_PAGES`).
/// Where the guest offered them, the device grants both, which cuts the requests (and VM exits)
/// of large sequential I/O by up to 256 times for writes and 8 times for reads.
///
/// Nor does it ask for `AUTO_INVAL_DATA`: with it, Linux drops a file's cached pages when the
/// attributes it refreshes (at most [`super::CACHE_TIMEOUT`] old) show another mtime or size,
/// which is what makes keeping the cache across opens (`CachePolicy::Always`, see the module
/// docs) see a change made on the host.
fn widen_init_reply(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    offered: &InitIn,
    used: u32,
) {
    const LEN: usize = OUT_HEADER_LEN + size_of::<InitOut>();
    // A shorter reply is the compat layout for a pre-7.23 guest, which has no `max_pages`.
    if usize::try_from(used) != Ok(LEN) {
        return;
    }
    let Some(prefix) = WritablePrefix::locate(chain, LEN) else {
        return;
    };
    let mut raw = [0u8; LEN];
    if !prefix.read(mem, &mut raw) {
        return;
    }
    let Some(out) = InitOut::from_mut_slice(&mut raw[OUT_HEADER_LEN..]) else {
        return;
    };
    let offered = FsOptions::from_bits_truncate(u64::from(offered.flags));
    for (option, max_pages) in [
        (FsOptions::BIG_WRITES, None),
        (FsOptions::MAX_PAGES, Some(MAX_REQ_PAGES)),
    ] {
        // Both flags live in the low word of the INIT flags.
        let Ok(bit) = u32::try_from(option.bits()) else {
            continue;
        };
        if offered.contains(option) {
            out.flags |= bit;
            out.max_write = MAX_BUFFER_SIZE;
            if let Some(pages) = max_pages {
                out.max_pages = pages;
            }
        }
    }
    if offered.contains(FsOptions::AUTO_INVAL_DATA)
        && let Ok(bit) = u32::try_from(FsOptions::AUTO_INVAL_DATA.bits())
    {
        out.flags |= bit;
    }
    prefix.write(mem, &raw);
}

/// Why a request is larger than any the server serves, if it is.
///
/// The server refuses a request whose header claims more than [`MAX_CHAIN_BYTES`], but it
/// trusts the chain's buffers and some size fields: IOCTL copies as many request bytes as the
/// chain holds into a buffer of its own, READDIR and GETXATTR/LISTXATTR allocate what the
/// request asks for. A guest can make a chain hold gigabytes by pointing many descriptors at
/// the same pages, and ask for any size, so without these bounds it could make the monitor
/// allocate gigabytes, or abort on a failed allocation. Linux never sends more than 1 MiB of
/// data plus headers per request, nor asks for more than 64 KiB of extended attributes.
fn oversized(
    header: &InHeader,
    body: &Reader<'_>,
    request_bytes: usize,
    reply_bytes: usize,
) -> Option<String> {
    if request_bytes > MAX_CHAIN_BYTES {
        return Some(format!("{request_bytes} bytes of request buffers"));
    }
    if reply_bytes > MAX_CHAIN_BYTES {
        return Some(format!("{reply_bytes} bytes of reply buffers"));
    }
    let xattr =
        header.opcode == Opcode::Getxattr as u32 || header.opcode == Opcode::Listxattr as u32;
    if xattr {
        let size = body
            .clone()
            .read_obj::<GetxattrIn>()
            .map_or(0, |arg| arg.size);
        if size > MAX_BUFFER_SIZE {
            return Some(format!("an extended attribute buffer of {size} bytes"));
        }
    }
    None
}

/// The errno for a request the server could not process.
fn errno_for(e: &FuseError) -> i32 {
    match e {
        FuseError::DecodeMessage(_)
        | FuseError::MissingParameter
        | FuseError::InvalidCString(_)
        | FuseError::InvalidHeaderLength
        | FuseError::InvalidXattrSize(_)
        | FuseError::InvalidMessage(_) => libc::EINVAL,
        _ => libc::EIO,
    }
}

/// Writes an error reply, if the chain has room for one; returns the bytes written.
fn answer_error(
    mem: &GuestMemoryMmap,
    reply: Option<&WritablePrefix>,
    unique: u64,
    errno: i32,
) -> u32 {
    let Some(reply) = reply else {
        return 0;
    };
    let header = OutHeader {
        len: to_u32(OUT_HEADER_LEN),
        error: -errno,
        unique,
    };
    if reply.write_header(mem, &header) {
        header.len
    } else {
        0
    }
}

/// The used length of a reply whose header says `out.len`: never more than the chain holds.
fn reply_len(out: &OutHeader, capacity: usize) -> u32 {
    out.len.min(to_u32(capacity))
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The first bytes of a chain's device-writable buffers, which may be spread over several
/// descriptors: where the reply's `OutHeader` (and, for INIT, the `InitOut` after it) lies.
struct WritablePrefix {
    parts: Vec<(GuestAddress, usize)>,
}

impl WritablePrefix {
    /// `None` if the writable buffers hold fewer than `len` bytes.
    fn locate(chain: DescriptorChain<&GuestMemoryMmap>, len: usize) -> Option<Self> {
        let mut parts = Vec::new();
        let mut covered = 0;
        for desc in chain.writable() {
            if covered == len {
                break;
            }
            let desc_len = usize::try_from(desc.len()).unwrap_or(usize::MAX);
            let take = desc_len.min(len - covered);
            if take > 0 {
                parts.push((desc.addr(), take));
                covered += take;
            }
        }
        (covered == len).then_some(Self { parts })
    }

    /// Writes `bytes` (at most the prefix's length) from the start of the prefix.
    fn write(&self, mem: &GuestMemoryMmap, mut bytes: &[u8]) -> bool {
        for &(addr, len) in &self.parts {
            let (part, rest) = bytes.split_at(len.min(bytes.len()));
            if mem.write_slice(part, addr).is_err() {
                return false;
            }
            bytes = rest;
        }
        true
    }

    /// Fills `bytes` (at most the prefix's length) from the start of the prefix.
    fn read(&self, mem: &GuestMemoryMmap, mut bytes: &mut [u8]) -> bool {
        for &(addr, len) in &self.parts {
            let (part, rest) = bytes.split_at_mut(len.min(bytes.len()));
            if mem.read_slice(part, addr).is_err() {
                return false;
            }
            bytes = rest;
        }
        true
    }

    fn write_header(&self, mem: &GuestMemoryMmap, header: &OutHeader) -> bool {
        self.write(mem, header.as_slice())
    }

    fn read_header(&self, mem: &GuestMemoryMmap) -> Option<OutHeader> {
        let mut header = OutHeader::default();
        self.read(mem, header.as_mut_slice()).then_some(header)
    }
}
