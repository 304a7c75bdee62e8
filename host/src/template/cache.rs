//! The template cache on disk: where it is ([`cache_dir`]), one directory per [`Key`] holding
//! the snapshot and [`INFO_FILE`], listing, pruning to [`KEEP`] and removal, and
//! the private files it is made of. `build` fills it; `mod.rs` opens templates from it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{TemplateError, io};
use super::key::Key;
use super::shape::TemplateShape;
use crate::vmm::persist::Snapshot;

/// Templates the cache keeps: making one more removes the oldest (see [`Cache::prune`]). A
/// template takes the disk space of what its guest touched (about 27 MiB for 256 MiB here).
pub const KEEP: usize = 8;

/// The environment variable that names the template directory.
pub const DIR_ENV: &str = "HUSK_TEMPLATE_DIR";

/// The template's description, beside its snapshot.
pub const INFO_FILE: &str = "info.json";

/// Where templates live: `$HUSK_TEMPLATE_DIR`, else `$HUSK_CACHE_DIR/templates`, else
/// `/var/cache/husk/templates`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(DIR_ENV) {
        return dir.into();
    }
    let cache = std::env::var_os("HUSK_CACHE_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/husk"), PathBuf::from);
    cache.join("templates")
}

/// The template cache in a directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

/// What `husk template list` shows of a template.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    /// Its shape.
    pub shape: TemplateShape,
    /// The kernel it booted.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// When it was made (RFC 3339).
    pub created: String,
    /// How long the cold boot to husk-init's greeting took, in milliseconds.
    pub boot_ms: u64,
}

/// One template in the cache.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its key (the directory name).
    pub key: String,
    /// What it is, if its `info.json` could be read.
    pub info: Option<Info>,
    /// Disk space of its files, in bytes.
    pub disk_bytes: u64,
}

impl Cache {
    /// The cache in `dir`, made (0700) if missing. Refuses a directory that others can write
    /// or that another user owns: what is in it is restored into VMs as root.
    pub fn open(dir: &Path) -> Result<Cache, TemplateError> {
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("creating", dir))?;
        }
        let meta = fs::metadata(dir).map_err(io("reading", dir))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me || meta.mode() & 0o022 != 0 {
            return Err(TemplateError::NotPrivate(dir.to_owned()));
        }
        Ok(Cache {
            dir: dir.to_owned(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.dir.join(key.as_str())
    }

    /// Opens the template `key`: `Ok(None)` if there is none; a template that is there but
    /// cannot be used is removed (and the error returned, for the caller's one log line).
    pub fn open_template(&self, key: &Key) -> Result<Option<Snapshot>, TemplateError> {
        let path = self.path(key);
        if !path.exists() {
            return Ok(None);
        }
        match Snapshot::open(&path) {
            Ok(snapshot) => Ok(Some(snapshot)),
            Err(e) => {
                let _ = self.remove(key.as_str());
                Err(e.into())
            }
        }
    }

    /// Every template in the cache.
    pub fn list(&self) -> Result<Vec<Entry>, TemplateError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io("listing", &self.dir))? {
            let entry = entry.map_err(io("listing", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !Key::is_key(&name) || !entry.path().is_dir() {
                continue;
            }
            let info = fs::read(entry.path().join(INFO_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let disk_bytes = fs::read_dir(entry.path())
                .map(|files| {
                    files
                        .flatten()
                        .filter_map(|f| f.metadata().ok())
                        .map(|m| m.blocks() * 512)
                        .sum()
                })
                .unwrap_or(0);
            out.push(Entry {
                key: name,
                info,
                disk_bytes,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Removes the oldest templates beyond the `keep` most recently made, but never `spare`
    /// (the one just made). Templates of a `husk` binary or guest image that were replaced
    /// stay in the cache until then: their keys are never asked for again.
    pub fn prune(&self, keep: usize, spare: &Key) -> Result<Vec<String>, TemplateError> {
        let mut entries: Vec<(std::time::SystemTime, String)> = self
            .list()?
            .into_iter()
            .filter(|e| e.key != spare.as_str())
            .map(|e| {
                let made = fs::metadata(self.dir.join(&e.key))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (made, e.key)
            })
            .collect();
        entries.sort();
        let excess = (entries.len() + 1).saturating_sub(keep);
        let mut removed = Vec::new();
        for (_, key) in entries.into_iter().take(excess) {
            removed.push(self.remove(&key)?);
        }
        Ok(removed)
    }

    /// Removes the template `key` (a key or any unique prefix of one). Returns the key removed.
    pub fn remove(&self, key: &str) -> Result<String, TemplateError> {
        let matches: Vec<Entry> = self
            .list()?
            .into_iter()
            .filter(|e| e.key.starts_with(key))
            .collect();
        let [entry] = matches.as_slice() else {
            return Err(TemplateError::Io {
                what: "finding the template",
                path: self.dir.join(key),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} templates match {key:?}", matches.len()),
                ),
            });
        };
        let path = self.dir.join(&entry.key);
        // Renamed away first, so that nobody opens a half-removed template.
        let doomed = self
            .dir
            .join(format!(".removing-{}-{}", entry.key, std::process::id()));
        fs::rename(&path, &doomed).map_err(io("removing", &path))?;
        fs::remove_dir_all(&doomed).map_err(io("removing", &doomed))?;
        let _ = fs::remove_file(self.dir.join(format!("{}.lock", entry.key)));
        Ok(entry.key.clone())
    }
}

/// Writes `bytes` to a new file at `path`, readable by its owner only.
pub(super) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TemplateError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("creating", path))?;
    file.write_all(bytes).map_err(io("writing", path))?;
    file.sync_all().map_err(io("syncing", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_private_and_keeps_the_newest_templates() {
        let tmp = husk_e2e::TempDir::new("template-cache");
        let dir = tmp.path().join("templates");
        let cache = Cache::open(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().mode() & 0o777,
            0o700,
            "made private"
        );
        let key = |n: u8| Key(format!("{n:x}{}", "0".repeat(31)));
        for n in 0..5u8 {
            let t = dir.join(key(n).as_str());
            fs::create_dir(&t).unwrap();
            fs::write(t.join("state"), [n]).unwrap();
            let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(n) * 100);
            fs::File::open(&t).unwrap().set_modified(when).unwrap();
        }
        fs::create_dir(dir.join(".build-not-a-key")).unwrap();
        assert_eq!(cache.list().unwrap().len(), 5);
        // Keep 3, counting the one just made (the oldest here): 0 stays, 1 and 2 go.
        let removed = cache.prune(3, &key(0)).unwrap();
        assert_eq!(removed, vec![key(1).0, key(2).0]);
        let left: Vec<String> = cache.list().unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(left, vec![key(0).0, key(3).0, key(4).0]);
        // A prefix removes one; an ambiguous or unknown one nothing.
        cache.remove("").unwrap_err();
        assert_eq!(cache.remove(&key(4).0[..31]).unwrap(), key(4).0);
        assert!(cache.remove("ffff").is_err());

        // Others may not write the directory.
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        assert!(matches!(
            Cache::open(&dir),
            Err(TemplateError::NotPrivate(_))
        ));
    }
}
