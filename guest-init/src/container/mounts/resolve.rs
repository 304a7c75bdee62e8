//! Paths of the container resolved inside its rootfs: `openat2(RESOLVE_IN_ROOT)` follows
//! the image's symlinks as if the rootfs were `/`, so a hostile link can never point a mount,
//! a device node or the working directory outside of it. Mounts are then made on the
//! descriptor's `/proc/self/fd/N` path ([`proc_fd_path`]), not on a path that could change
//! in between.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};

/// The path that names the open file `fd` for calls that take a path (mount(2)): the
/// resolved file itself, whatever its path inside the root becomes.
pub fn proc_fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// What to create when a path does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Nothing: a missing path is an error.
    Nothing,
    /// Directories all the way.
    Dir,
    /// Directories, then an empty file as the last component.
    File,
}

fn open_in_root(root: &OwnedFd, rel: &Path) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    nix::fcntl::openat2(root.as_fd(), rel, how)
}

/// Resolves `path` (absolute or relative, taken as relative to the root) inside `root`,
/// following symlinks as if `root` were `/`, creating what is missing as `create` says.
/// Returns an `O_PATH` descriptor of the result.
pub fn resolve_in_root(root: &OwnedFd, path: &Path, create: Create) -> nix::Result<OwnedFd> {
    let comps: Vec<&OsStr> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            Component::ParentDir => Some(OsStr::new("..")),
            _ => None,
        })
        .collect();
    let full: PathBuf = comps.iter().collect();
    match open_in_root(root, &full) {
        Err(Errno::ENOENT) if create != Create::Nothing => {}
        other => return other,
    }
    let mut prefix = PathBuf::new();
    for (i, comp) in comps.iter().enumerate() {
        let next = prefix.join(comp);
        match open_in_root(root, &next) {
            Ok(_) => {}
            Err(Errno::ENOENT) => {
                let parent = open_in_root(root, &prefix)?;
                let last = i + 1 == comps.len();
                let made = if last && create == Create::File {
                    nix::sys::stat::mknodat(
                        parent.as_fd(),
                        *comp,
                        SFlag::S_IFREG,
                        Mode::from_bits_truncate(0o644),
                        0,
                    )
                } else {
                    nix::sys::stat::mkdirat(parent.as_fd(), *comp, Mode::from_bits_truncate(0o755))
                };
                match made {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
        prefix = next;
    }
    open_in_root(root, &full)
}

/// Whether a path is relative and free of `..` (for paths inside a share).
pub fn is_clean_relative(p: &str) -> bool {
    let path = Path::new(p);
    !path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && !p.as_bytes().contains(&0)
}
