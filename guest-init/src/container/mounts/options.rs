//! The OCI mount options of a spec's mount (`nosuid`, `rbind`, `rslave`, `mode=755`, ...)
//! read as runc reads them: the flags mount(2) takes, the propagation changes made after the
//! mount, and the rest as the filesystem's data. Pure parsing, apart so that `spec` can check
//! options without anything that touches a mount.

use nix::mount::MsFlags;

/// Parsed OCI mount options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Flags to set.
    pub flags: MsFlags,
    /// Propagation changes, applied after the mount in order.
    pub propagation: Vec<MsFlags>,
    /// Filesystem-specific options (`mode=755`, `size=64k`, ...), comma-joined for mount(2).
    pub data: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            flags: MsFlags::empty(),
            propagation: Vec::new(),
            data: String::new(),
        }
    }
}

impl MountOptions {
    /// Whether these options make a bind mount.
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }
}

/// Parses OCI mount options (runc's table). Unknown words are filesystem data.
pub fn parse_options(options: &[String]) -> MountOptions {
    let mut out = MountOptions::default();
    let mut data = Vec::new();
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" | "rro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" | "rrw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" | "rnosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" | "rsuid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" | "rnodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" | "rdev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" | "rnoexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" | "rexec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" | "ratime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" | "rnoatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" | "rdiratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" | "rnodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" | "rrelatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" | "rnorelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" | "rstrictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" | "rnostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                out.propagation
                    .push(propagation_flags(opt).unwrap_or(MsFlags::MS_PRIVATE));
                continue;
            }
            // Handled by engines or meaningless in a VM: SELinux relabel requests, copy-up of
            // the image's content into a tmpfs (podman), and the cross-VM id-mapping requests.
            "z" | "Z" | "tmpcopyup" | "notmpcopyup" | "copy" | "nocopy" | "U" => continue,
            other => {
                data.push(other);
                continue;
            }
        };
        out.flags.insert(set);
        out.flags.remove(clear);
    }
    out.data = data.join(",");
    out
}

/// The mount(2) flags of a propagation word (`rslave`, `private`, ...).
pub fn propagation_flags(word: &str) -> Option<MsFlags> {
    let (rec, base) = match word.strip_prefix('r') {
        Some(b) if b != "o" && b != "w" => (MsFlags::MS_REC, b),
        _ => (MsFlags::empty(), word),
    };
    let flag = match base {
        "private" => MsFlags::MS_PRIVATE,
        "shared" => MsFlags::MS_SHARED,
        "slave" => MsFlags::MS_SLAVE,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        _ => return None,
    };
    Some(flag | rec)
}
