//! The tap device behind a virtio-net device: a `/dev/net/tun` queue opened as
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking, with a 12-byte virtio-net header
//! (`struct virtio_net_hdr_v1`) in front of every frame in both directions.
//!
//! `TUNSETIFF` and `TUNSETVNETHDRSZ` happen in [`Tap::open`], before the VMM threads install
//! their seccomp filters. `TUNSETOFFLOAD` happens again whenever a driver has negotiated its
//! features (on the VMM thread, whose filter allows exactly that ioctl); otherwise the device
//! only reads and writes the fd.
//!
//! The tap is created in the network namespace of the *calling thread*: the monitor opens it
//! from a thread that has joined the container's network namespace. It is not persistent, so
//! closing the fd (the VM's teardown, or the monitor's death) removes the interface and every
//! qdisc and filter attached to it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Bytes of `struct virtio_net_hdr_v1` (virtio 1.x: the header always has `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Longest interface name the kernel takes (`IFNAMSIZ` minus the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// the tap name {0:?} is empty, longer than 15 bytes or contains a NUL or '/'
    #[error("the tap name {0:?} is empty, longer than 15 bytes or contains a NUL or '/'")]
    Name(String),
    /// cannot open /dev/net/tun
    #[error("cannot open /dev/net/tun")]
    Open(#[source] io::Error),
    /// cannot create the tap {name} (TUNSETIFF)
    #[error("cannot create the tap {name} (TUNSETIFF)")]
    Create {
        /// The tap's name.
        name: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// cannot configure the tap {name} ({what})
    #[error("cannot configure the tap {name} ({what})")]
    Configure {
        /// The tap's name.
        name: String,
        /// Which ioctl.
        what: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// An open tap queue. Reads return one frame each, writes send one frame each, both with the
/// virtio-net header in front.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the tap `name` in the calling thread's network namespace (it must not exist).
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.bytes().any(|b| b == 0 || b == b'/')
        {
            return Err(TapError::Name(name.to_owned()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src.cast_signed();
        }
        // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR all fit in the 16-bit flags field.
        req.ifr_ifru.ifru_flags =
            i16::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR).unwrap_or(i16::MAX);
        // TUNSETIFF: IFF_EXCL is not a tun flag; a tap of that name that already exists would be
        // attached to, so the caller checks first (the monitor owns the names it uses).
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is, alive for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(TapError::Create {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        let check = |rc: libc::c_int, what: &'static str| {
            if rc < 0 {
                Err(TapError::Configure {
                    name: name.to_owned(),
                    what,
                    source: io::Error::last_os_error(),
                })
            } else {
                Ok(())
            }
        };
        let hdr_len = libc::c_int::try_from(VNET_HDR_LEN).unwrap_or(libc::c_int::MAX);
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at
        // `hdr_len`, alive for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        check(rc, "TUNSETVNETHDRSZ")?;
        let tap = Self {
            file,
            name: name.to_owned(),
        };
        // No offloads until a driver negotiates some: the kernel checksums and segments
        // everything before it reaches us.
        tap.set_offload(0).map_err(|source| TapError::Configure {
            name: name.to_owned(),
            what: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(tap)
    }

    /// Sets what the tap may leave undone in the frames it gives us (`TUN_F_*`): a checksum
    /// (`TUN_F_CSUM`), TCP segmentation (`TUN_F_TSO4`, `TUN_F_TSO6`, which need `TUN_F_CSUM`).
    /// Frames we write may always carry such requests in their header.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A tap over an fd that already behaves like one (one frame per read and write, header
    /// included, non-blocking): a datagram socket in the tests and the fuzz target.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn from_file(file: File, name: &str) -> Self {
        Self {
            file,
            name: name.to_owned(),
        }
    }

    /// Another handle on the same tap (a duplicated fd).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header first) into `buf`; `WouldBlock` when none waits.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &self.file, buf)
    }

    /// Writes one frame (header first); `WouldBlock` when the tap cannot take it now.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut &self.file, frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
