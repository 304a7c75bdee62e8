//! How husk-init reaches the host: vsock in the VM, Unix sockets in host tests.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;

use husk_proto::{HOST_CID, VsockPort};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, VsockAddr};

/// Where the host listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// AF_VSOCK, host CID 2.
    Vsock,
    /// Unix stream sockets named `PREFIX_<port>` (as Firecracker names the host end of
    /// guest-initiated vsock connections).
    Unix {
        /// The socket path prefix.
        prefix: PathBuf,
    },
}

impl FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "vsock" {
            Ok(Transport::Vsock)
        } else if let Some(p) = s.strip_prefix("unix:") {
            Ok(Transport::Unix { prefix: p.into() })
        } else {
            Err(format!(
                "unknown transport {s:?}: expected \"vsock\" or \"unix:PREFIX\""
            ))
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Vsock => write!(f, "vsock cid {HOST_CID}"),
            Transport::Unix { prefix } => write!(f, "unix:{}", prefix.display()),
        }
    }
}

impl Transport {
    /// Connects to the host's `port`. The stream is blocking and close-on-exec.
    pub fn connect(&self, port: VsockPort) -> io::Result<File> {
        let fd: OwnedFd = match self {
            Transport::Vsock => {
                let fd = socket::socket(
                    AddressFamily::Vsock,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                socket::connect(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    &VsockAddr::new(HOST_CID, port.0),
                )?;
                fd
            }
            Transport::Unix { prefix } => {
                let mut path = prefix.clone().into_os_string();
                path.push(format!("_{port}"));
                // std sets SOCK_CLOEXEC.
                UnixStream::connect(path)?.into()
            }
        };
        Ok(File::from(fd))
    }
}
