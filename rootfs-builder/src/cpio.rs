//! A writer for the "newc" (SVR4, no CRC) cpio format the Linux kernel unpacks as initramfs.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Directory,
    /// A regular file with these contents.
    File(Vec<u8>),
    /// A symbolic link to this target.
    Symlink(String),
    /// A character device node.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
}

impl EntryKind {
    /// The `S_IFMT` bits of the mode.
    fn type_bits(&self) -> u32 {
        match self {
            EntryKind::Directory => 0o040000,
            EntryKind::File(_) => 0o100000,
            EntryKind::Symlink(_) => 0o120000,
            EntryKind::CharDevice { .. } => 0o020000,
        }
    }

    fn data(&self) -> &[u8] {
        match self {
            EntryKind::File(data) => data,
            EntryKind::Symlink(target) => target.as_bytes(),
            EntryKind::Directory | EntryKind::CharDevice { .. } => &[],
        }
    }
}

/// One file, directory, link or device node of an archive. Owners are always root and
/// timestamps always 0: the archive is reproducible and its contents belong to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    path: String,
    mode: u32,
    kind: EntryKind,
}

impl Entry {
    /// A directory with permission bits `mode`.
    pub fn dir(path: &str, mode: u32) -> Entry {
        Entry::new(path, mode, EntryKind::Directory)
    }

    /// A regular file.
    pub fn file(path: &str, mode: u32, data: Vec<u8>) -> Entry {
        Entry::new(path, mode, EntryKind::File(data))
    }

    /// A symbolic link (its permission bits are always 0777).
    pub fn symlink(path: &str, target: &str) -> Entry {
        Entry::new(path, 0o777, EntryKind::Symlink(target.to_owned()))
    }

    /// A character device node.
    pub fn char_device(path: &str, mode: u32, major: u32, minor: u32) -> Entry {
        Entry::new(path, mode, EntryKind::CharDevice { major, minor })
    }

    fn new(path: &str, mode: u32, kind: EntryKind) -> Entry {
        Entry {
            path: path.trim_start_matches('/').to_owned(),
            mode,
            kind,
        }
    }

    /// The path inside the archive (relative, without a leading `/`).
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// Why an entry cannot be added, or the archive cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The path is empty, has `.`/`..`/empty components or a NUL byte.
    #[error("invalid path {0:?} in initramfs: must be relative, without '.', '..', '//' or NUL")]
    InvalidPath(String),
    /// The same path was added twice.
    #[error("{0:?} is already in the initramfs")]
    Duplicate(String),
    /// The parent directory of an entry was not added first.
    #[error("{path:?} needs its parent directory {parent:?} in the initramfs")]
    MissingParent {
        /// The entry.
        path: String,
        /// Its missing parent.
        parent: String,
    },
    /// Permission bits outside 0o7777.
    #[error("mode {mode:#o} of {path:?} has bits outside 0o7777")]
    InvalidMode {
        /// The entry.
        path: String,
        /// The mode given.
        mode: u32,
    },
    /// A field does not fit the format's 32-bit header fields.
    #[error("{0:?} is larger than the 4 GiB a newc cpio entry can hold")]
    TooLarge(String),
    /// Writing failed.
    #[error("writing the initramfs")]
    Io(#[from] io::Error),
}

/// A cpio archive being assembled. Entries are kept sorted by path, so the output does not
/// depend on the order they were added in.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

const MAGIC: &[u8] = b"070701";
const TRAILER: &str = "TRAILER!!!";

impl Archive {
    /// An empty archive.
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Adds an entry; its parent directory must already be in the archive.
    pub fn add(&mut self, entry: Entry) -> Result<(), ArchiveError> {
        let path = &entry.path;
        let valid = !path.is_empty()
            && !path.contains('\0')
            && path
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if !valid {
            return Err(ArchiveError::InvalidPath(path.clone()));
        }
        if entry.mode & !0o7777 != 0 {
            return Err(ArchiveError::InvalidMode {
                path: path.clone(),
                mode: entry.mode,
            });
        }
        if u32::try_from(entry.kind.data().len()).is_err() {
            return Err(ArchiveError::TooLarge(path.clone()));
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            match self.entries.get(parent) {
                Some(Entry {
                    kind: EntryKind::Directory,
                    ..
                }) => {}
                _ => {
                    return Err(ArchiveError::MissingParent {
                        path: path.clone(),
                        parent: parent.to_owned(),
                    });
                }
            }
        }
        if self.entries.contains_key(path) {
            return Err(ArchiveError::Duplicate(path.clone()));
        }
        self.entries.insert(path.clone(), entry);
        Ok(())
    }

    /// The entries, in the order they are written.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Writes the archive. Sorted order puts every directory before its contents, which the
    /// kernel needs (it does not create parents).
    pub fn write_to(&self, out: &mut impl Write) -> Result<(), ArchiveError> {
        let mut offset = 0usize;
        for (ino, entry) in (1u32..).zip(self.entries.values()) {
            let (rmajor, rminor) = match entry.kind {
                EntryKind::CharDevice { major, minor } => (major, minor),
                _ => (0, 0),
            };
            let nlink = if entry.kind == EntryKind::Directory {
                2
            } else {
                1
            };
            let header = Header {
                ino,
                mode: entry.kind.type_bits() | entry.mode,
                nlink,
                filesize: entry.kind.data().len(),
                rmajor,
                rminor,
                name: &entry.path,
            };
            offset += header.write(out, offset)?;
            offset += write_padded(out, entry.kind.data(), offset)?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            filesize: 0,
            rmajor: 0,
            rminor: 0,
            name: TRAILER,
        };
        offset += trailer.write(out, offset)?;
        // The kernel reads the archive in 512-byte blocks' worth of slack; pad like cpio(1).
        let pad = offset.next_multiple_of(512) - offset;
        out.write_all(&vec![0; pad])?;
        Ok(())
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ArchiveError> {
        let mut out = Vec::new();
        self.write_to(&mut out)?;
        Ok(out)
    }
}

struct Header<'a> {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: usize,
    rmajor: u32,
    rminor: u32,
    name: &'a str,
}

impl Header<'_> {
    /// Writes the header and the padded name; returns the bytes written.
    fn write(&self, out: &mut impl Write, offset: usize) -> Result<usize, ArchiveError> {
        let filesize =
            u32::try_from(self.filesize).map_err(|_| ArchiveError::TooLarge(self.name.into()))?;
        let namesize = u32::try_from(self.name.len() + 1)
            .map_err(|_| ArchiveError::TooLarge(self.name.into()))?;
        let fields = [
            self.ino,
            self.mode,
            0, // uid
            0, // gid
            self.nlink,
            0, // mtime
            filesize,
            0, // devmajor
            0, // devminor
            self.rmajor,
            self.rminor,
            namesize,
            0, // check (unused by newc)
        ];
        let mut header = Vec::with_capacity(110 + self.name.len() + 4);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        header.extend_from_slice(self.name.as_bytes());
        header.push(0);
        write_padded(out, &header, offset)
    }
}

/// Writes `data` followed by NULs up to the next multiple of 4 of the archive offset.
fn write_padded(out: &mut impl Write, data: &[u8], offset: usize) -> Result<usize, ArchiveError> {
    out.write_all(data)?;
    let end = offset + data.len();
    let pad = end.next_multiple_of(4) - end;
    out.write_all(&[0u8; 3][..pad])?;
    Ok(data.len() + pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a newc archive back into (name, mode, filesize, rmajor, rminor, data): an
    /// independent reader that follows the format description, not the writer's code.
    fn parse(bytes: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            assert_eq!(&bytes[pos..pos + 6], MAGIC, "magic at {pos}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[pos + 6 + 8 * i..pos + 14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, filesize, rmajor, rminor, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name_start = pos + 110;
            let name = std::str::from_utf8(&bytes[name_start..name_start + namesize as usize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(bytes[name_start + namesize as usize - 1], 0);
            let data_start = (name_start + namesize as usize).next_multiple_of(4);
            let data = bytes[data_start..data_start + filesize as usize].to_vec();
            pos = (data_start + filesize as usize).next_multiple_of(4);
            if name == TRAILER {
                assert_eq!(bytes.len() % 512, 0);
                assert!(bytes[pos..].iter().all(|&b| b == 0));
                return out;
            }
            out.push((name, mode, rmajor, rminor, data));
        }
    }

    #[test]
    fn round_trips_every_kind_in_path_order() {
        let mut a = Archive::new();
        a.add(Entry::dir("dev", 0o755)).unwrap();
        a.add(Entry::file("/init", 0o755, b"hello".to_vec()))
            .unwrap();
        a.add(Entry::char_device("dev/console", 0o600, 5, 1))
            .unwrap();
        a.add(Entry::symlink("sbin", "/")).unwrap();
        let entries = parse(&a.to_bytes().unwrap());
        assert_eq!(
            entries,
            vec![
                ("dev".into(), 0o040755, 0, 0, vec![]),
                ("dev/console".into(), 0o020600, 5, 1, vec![]),
                ("init".into(), 0o100755, 0, 0, b"hello".to_vec()),
                ("sbin".into(), 0o120777, 0, 0, b"/".to_vec()),
            ]
        );
    }

    #[test]
    fn output_does_not_depend_on_insertion_order() {
        let mut a = Archive::new();
        a.add(Entry::dir("a", 0o755)).unwrap();
        a.add(Entry::file("b", 0o644, vec![1, 2, 3])).unwrap();
        a.add(Entry::file("a/x", 0o644, vec![9])).unwrap();
        let mut b = Archive::new();
        b.add(Entry::file("b", 0o644, vec![1, 2, 3])).unwrap();
        b.add(Entry::dir("a", 0o755)).unwrap();
        b.add(Entry::file("a/x", 0o644, vec![9])).unwrap();
        assert_eq!(a.to_bytes().unwrap(), b.to_bytes().unwrap());
    }

    #[test]
    fn rejects_bad_paths_modes_duplicates_and_orphans() {
        let mut a = Archive::new();
        for bad in ["", "a/../b", "./x", "a//b", "x\0y"] {
            assert!(matches!(
                a.add(Entry::file(bad, 0o644, vec![])),
                Err(ArchiveError::InvalidPath(_))
            ));
        }
        assert!(matches!(
            a.add(Entry::file("f", 0o100644, vec![])),
            Err(ArchiveError::InvalidMode { .. })
        ));
        assert!(matches!(
            a.add(Entry::file("no/parent", 0o644, vec![])),
            Err(ArchiveError::MissingParent { .. })
        ));
        a.add(Entry::file("f", 0o644, vec![])).unwrap();
        assert!(matches!(
            a.add(Entry::file("f", 0o644, vec![])),
            Err(ArchiveError::Duplicate(_))
        ));
        assert!(matches!(
            a.add(Entry::file("f/x", 0o644, vec![])),
            Err(ArchiveError::MissingParent { .. })
        ));
    }

    #[test]
    fn readable_by_cpio_tool_when_present() {
        // GNU cpio is an independent reader; skip (with a note) where it is not installed.
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipping: cpio(1) not installed");
            return;
        }
        let mut a = Archive::new();
        a.add(Entry::dir("d", 0o750)).unwrap();
        a.add(Entry::file("d/f", 0o640, b"data!".to_vec())).unwrap();
        let dir = std::env::temp_dir().join(format!("husk-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&a.to_bytes().unwrap())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 2, "{listing}");
        assert!(lines[0].starts_with("drwxr-x---") && lines[0].ends_with(" d"));
        assert!(lines[1].starts_with("-rw-r-----") && lines[1].ends_with(" d/f"));
        assert!(lines[1].contains(" 5 "), "{listing}");
    }
}
