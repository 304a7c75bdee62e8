//! `/proc/self/mountinfo`, read into lines (proc(5)): what the cgroup setup looks for its
//! hierarchies in, and what `--monitor-uid` reads an overlay's layers from.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One mount.
#[derive(Debug)]
pub struct MountLine {
    /// The directory of its filesystem mounted there.
    pub root: PathBuf,
    /// Where it is mounted.
    pub at: PathBuf,
    /// The per-mount options (`rw,nosuid,...`).
    pub mount_options: String,
    /// The filesystem type.
    pub kind: String,
    /// The filesystem's own options (for an overlay: `rw,lowerdir=...`), still escaped.
    pub super_options: String,
}

/// Where this process's mount table is.
pub const PATH: &str = "/proc/self/mountinfo";

/// Reads this process's mount table ([`PATH`]).
pub fn read() -> std::io::Result<Vec<MountLine>> {
    std::fs::read_to_string(PATH).map(|info| parse(&info))
}

/// The mounts at and below `dir` in this mount namespace, in mount order.
pub fn under(dir: &Path) -> std::io::Result<Vec<MountLine>> {
    Ok(read()?
        .into_iter()
        .filter(|m| m.at.starts_with(dir))
        .collect())
}

/// Parses mountinfo text; lines without the fields are skipped.
pub fn parse(info: &str) -> Vec<MountLine> {
    let path = |field: &str| PathBuf::from(OsStr::from_bytes(&unescape(field)));
    info.lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options [optional...] - fstype source
            // super-options
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            Some(MountLine {
                root: path(left.get(3)?),
                at: path(left.get(4)?),
                mount_options: (*left.get(5)?).to_owned(),
                kind: right.next()?.to_owned(),
                super_options: right.nth(1)?.to_owned(),
            })
        })
        .collect()
}

/// Undoes the kernel's `\ooo` escapes (of space, tab, newline, `\`, `,`, `=` and `#`).
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(Ok(v)) = s.get(i + 1..i + 4).map(|o| u8::from_str_radix(o, 8))
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_mount_points_are_unescaped() {
        assert_eq!(unescape("/a\\040b"), b"/a b");
        assert_eq!(unescape("/plain"), b"/plain");
        let m = parse("1 2 8:1 /r\\040x /m\\040n rw,nodev - ext4 /dev/sda1 rw,errors=remount-ro\n");
        assert_eq!(
            (m[0].root.as_path(), m[0].at.as_path()),
            (Path::new("/r x"), Path::new("/m n"))
        );
        assert_eq!(
            (m[0].mount_options.as_str(), m[0].kind.as_str()),
            ("rw,nodev", "ext4")
        );
        assert_eq!(m[0].super_options, "rw,errors=remount-ro");
        assert!(parse("too short\n").is_empty());
    }
}
