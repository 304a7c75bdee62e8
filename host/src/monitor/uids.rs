//! Which host uids a container's monitor runs as.
//!
//! By default each monitor gets a range of 65536 host uids and gids of its own (see
//! [`super::userns`] for what it does with them), as Firecracker's jailer wants a uid per
//! microVM: monitors then cannot signal, ptrace or read one another, nor anything of the host's
//! users. `husk create` allocates the range from a pool (`--monitor-uid-pool FIRST:COUNT`,
//! default [`DEFAULT_POOL`]: the 4094 ranges from 0x70000000, above what systemd gives
//! containers and below 2^31), records it in a host-wide registry and in the container's
//! state directory, and `husk delete` releases it:
//!
//! ```text
//! /run/husk-monitor-uids/lock          flock(2)ed while a range is taken or given back
//! /run/husk-monitor-uids/<first uid>   one file per range in use: the state directory it is for
//! <state dir>/monitor-uid              the range's first uid (pinned read-only in the monitor)
//! ```
//!
//! The registry is host-wide because engines use different state roots (containerd one per
//! namespace, Docker and podman their own). A range is in use while the state directory its
//! registry file names holds a record of it: a range whose container's directory is gone (a
//! state root wiped, a reboot that kept `/run/husk-monitor-uids`) is taken back at the next
//! allocation. When every range is in use, `create` fails saying so.
//!
//! `--monitor-uid UID` gives every monitor the same range (monitors may then signal one
//! another, and a range the pool also holds would be shared: keep them apart), and
//! `--monitor-uid root` runs the monitor as root (confined by its jail and filters only: as root
//! it may still write what root owns wherever its jail reaches). Both are weaker than the
//! default, for hosts whose filesystems cannot be idmapped (see [`super::userns`]).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::userns::{IdMap, IdMapError, RANGE};

/// The registry of the ranges in use (see the module docs).
pub const REGISTRY: &str = "/run/husk-monitor-uids";

/// The record of a container's range in its state directory.
pub const RECORD_FILE: &str = "monitor-uid";

/// The pool ranges are allocated from by default: 4094 ranges from 0x70000000 (1879048192),
/// above systemd's range for containers (524288-1879048191) and below 2^31, which some tools
/// take for a negative id.
pub const DEFAULT_POOL: &str = "1879048192:268304384";

/// The environment variables the flags fall back to.
pub const POOL_ENV: &str = "HUSK_MONITOR_UID_POOL";

/// Who a container's monitor runs as (`--monitor-uid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MonitorUser {
    /// A range of its own from the pool (`auto`, the default).
    #[default]
    Auto,
    /// Root (`root`): the jail and the filters only.
    Root,
    /// The same range for every monitor (a uid).
    Fixed(IdMap),
}

impl std::str::FromStr for MonitorUser {
    type Err = IdMapError;

    fn from_str(s: &str) -> Result<MonitorUser, IdMapError> {
        match s {
            "auto" => Ok(MonitorUser::Auto),
            "root" => Ok(MonitorUser::Root),
            _ => s.parse().map(MonitorUser::Fixed),
        }
    }
}

/// The pool of ranges (`--monitor-uid-pool FIRST:COUNT`): COUNT ids from FIRST, a whole
/// number of ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    first: u32,
    ranges: u32,
}

/// Why a pool is not one.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Not `FIRST:COUNT`.
    #[error("{0:?}: a pool is FIRST:COUNT (uids), e.g. {DEFAULT_POOL}")]
    Syntax(String),
    /// FIRST is root's, or the pool passes 2^32.
    #[error("{0:?}: the pool must start above 0 and end below 2^32")]
    Bounds(String),
    /// COUNT is not a whole number of ranges.
    #[error("{0:?}: COUNT must be a multiple of {RANGE} (one range per container), at least one")]
    Count(String),
}

impl std::str::FromStr for Pool {
    type Err = PoolError;

    fn from_str(s: &str) -> Result<Pool, PoolError> {
        let (first, count) = s
            .split_once(':')
            .and_then(|(f, c)| Some((f.parse::<u32>().ok()?, c.parse::<u64>().ok()?)))
            .ok_or_else(|| PoolError::Syntax(s.to_owned()))?;
        if first == 0 || u64::from(first) + count > 1 << 32 {
            return Err(PoolError::Bounds(s.to_owned()));
        }
        if count == 0 || !count.is_multiple_of(u64::from(RANGE)) {
            return Err(PoolError::Count(s.to_owned()));
        }
        let ranges =
            u32::try_from(count / u64::from(RANGE)).map_err(|_| PoolError::Bounds(s.to_owned()))?;
        Ok(Pool { first, ranges })
    }
}

impl Default for Pool {
    fn default() -> Pool {
        DEFAULT_POOL.parse().expect("the default pool is one")
    }
}

impl Pool {
    /// The `i`th range's first uid.
    fn base(self, i: u32) -> u32 {
        self.first + i * RANGE
    }
}

/// Why a range could not be allocated or released.
#[derive(Debug, thiserror::Error)]
pub enum UidsError {
    /// Every range of the pool is in use.
    #[error(
        "no uid range left for the container's monitor: the {ranges} ranges of {RANGE} ids \
         from {first} (--monitor-uid-pool) are all in use by containers not deleted yet; delete \
         stopped containers, widen the pool, or give --monitor-uid"
    )]
    Exhausted {
        /// The pool's first uid.
        first: u32,
        /// Its ranges.
        ranges: u32,
    },
    /// The registry could not be read or written.
    #[error("the registry of monitor uid ranges: {what} {path}")]
    Registry {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> UidsError + use<> {
    let path = path.to_owned();
    move |source| UidsError::Registry { what, path, source }
}

/// The range the monitor of the container in `dir` runs as (`None`: root): for
/// [`MonitorUser::Auto`], one allocated from `pool` in `registry` and recorded in `dir`.
pub fn for_container(
    user: MonitorUser,
    pool: Pool,
    registry: &Path,
    dir: &Path,
) -> Result<Option<IdMap>, UidsError> {
    match user {
        MonitorUser::Root => Ok(None),
        MonitorUser::Fixed(map) => Ok(Some(map)),
        MonitorUser::Auto => allocate(pool, registry, dir).map(Some),
    }
}

/// The registry, locked while the value lives.
struct Locked {
    dir: PathBuf,
    _lock: std::fs::File,
}

fn lock(registry: &Path) -> Result<Locked, UidsError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(registry) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating", registry)(e)),
    }
    let path = registry.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("opening", &path))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io("locking", &path)(std::io::Error::last_os_error()));
    }
    Ok(Locked {
        dir: registry.to_owned(),
        _lock: file,
    })
}

/// The first uid recorded in `dir` (its [`RECORD_FILE`]), if any.
fn recorded(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join(RECORD_FILE)).ok()?;
    text.trim().parse().ok()
}

impl Locked {
    /// The ranges in use (their first uids); entries whose container is gone are removed.
    fn in_use(&self) -> Result<Vec<u32>, UidsError> {
        let mut used = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(io("listing", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io("listing", &self.dir))?;
            let Some(base) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let owner = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if recorded(Path::new(owner.trim())) == Some(base) {
                used.push(base);
            } else {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(used)
    }
}

fn allocate(pool: Pool, registry: &Path, dir: &Path) -> Result<IdMap, UidsError> {
    let dir = std::path::absolute(dir).map_err(io("resolving", dir))?;
    let locked = lock(registry)?;
    let used = locked.in_use()?;
    let overlaps = |base: u32| {
        used.iter().any(|u| {
            u64::from(*u) < u64::from(base) + u64::from(RANGE)
                && u64::from(base) < u64::from(*u) + u64::from(RANGE)
        })
    };
    let base = (0..pool.ranges)
        .map(|i| pool.base(i))
        .find(|b| !overlaps(*b))
        .ok_or(UidsError::Exhausted {
            first: pool.first,
            ranges: pool.ranges,
        })?;
    let map = IdMap::new(base)
        .map_err(|e| io("allocating from", registry)(std::io::Error::other(e.to_string())))?;
    // The container's record first: an entry without it would be taken back at once.
    let record = dir.join(RECORD_FILE);
    write_new(&record, &format!("{base}\n"))?;
    let entry = locked.dir.join(base.to_string());
    if let Err(e) = write_new(&entry, &format!("{}\n", dir.display())) {
        let _ = std::fs::remove_file(&record);
        return Err(e);
    }
    Ok(map)
}

fn write_new(path: &Path, text: &str) -> Result<(), UidsError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("creating", path))?;
    f.write_all(text.as_bytes()).map_err(io("writing", path))
}

/// Gives back the range recorded in the container's state directory `dir`, if any (the
/// directory itself, and the record with it, are removed by the caller).
pub fn release(registry: &Path, dir: &Path) -> Result<(), UidsError> {
    let Some(base) = recorded(dir) else {
        return Ok(());
    };
    let dir = std::path::absolute(dir).map_err(io("resolving", dir))?;
    let locked = lock(registry)?;
    let entry = locked.dir.join(base.to_string());
    let owner = std::fs::read_to_string(&entry).unwrap_or_default();
    if Path::new(owner.trim()) == dir {
        std::fs::remove_file(&entry).map_err(io("removing", &entry))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("husk-uids-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn container(scratch: &Path, id: &str) -> PathBuf {
        let dir = scratch.join("state").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn every_container_gets_a_range_of_its_own_until_it_is_deleted() {
        let s = scratch("own");
        let registry = s.join("registry");
        let pool: Pool = "1000000:196608".parse().unwrap();
        let (a, b, c, d) = (
            container(&s, "a"),
            container(&s, "b"),
            container(&s, "c"),
            container(&s, "d"),
        );
        let take = |dir: &Path| for_container(MonitorUser::Auto, pool, &registry, dir);
        let base = |m: Option<IdMap>| m.unwrap().base();
        assert_eq!(base(take(&a).unwrap()), 1_000_000);
        assert_eq!(base(take(&b).unwrap()), 1_065_536);
        assert_eq!(base(take(&c).unwrap()), 1_131_072);
        assert_eq!(recorded(&b), Some(1_065_536));
        // The pool is used up: the error says so, names the way out, and records nothing.
        let err = take(&d).unwrap_err().to_string();
        assert!(
            err.contains("no uid range left") && err.contains("3 ranges"),
            "{err}"
        );
        assert!(!d.join(RECORD_FILE).exists());
        // Deleting b gives its range back, to d.
        release(&registry, &b).unwrap();
        std::fs::remove_dir_all(&b).unwrap();
        assert_eq!(base(take(&d).unwrap()), 1_065_536);
        // A container whose directory is gone without a delete: its range is taken back.
        std::fs::remove_dir_all(&a).unwrap();
        let e = container(&s, "e");
        assert_eq!(base(take(&e).unwrap()), 1_000_000);
        // Root and a fixed uid take nothing.
        let f = container(&s, "f");
        assert_eq!(
            for_container(MonitorUser::Root, pool, &registry, &f).unwrap(),
            None
        );
        let fixed = MonitorUser::Fixed(IdMap::new(300_000).unwrap());
        assert_eq!(
            base(for_container(fixed, pool, &registry, &f).unwrap()),
            300_000
        );
        assert!(!f.join(RECORD_FILE).exists());
        // Releasing what holds no range, or a range another directory holds, does nothing.
        release(&registry, &f).unwrap();
        std::fs::write(f.join(RECORD_FILE), "1000000\n").unwrap();
        release(&registry, &f).unwrap();
        assert!(registry.join("1000000").exists());
        std::fs::remove_dir_all(&s).unwrap();
    }

    #[test]
    fn allocations_at_once_never_share_a_range() {
        let s = scratch("race");
        let registry = s.join("registry");
        let pool: Pool = "2000000:1310720".parse().unwrap();
        let dirs: Vec<PathBuf> = (0..20).map(|i| container(&s, &format!("c{i}"))).collect();
        let bases: Vec<u32> = std::thread::scope(|sc| {
            let handles: Vec<_> = dirs
                .iter()
                .map(|d| {
                    let registry = &registry;
                    sc.spawn(move || {
                        for_container(MonitorUser::Auto, pool, registry, d)
                            .unwrap()
                            .unwrap()
                            .base()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut sorted = bases.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 20, "{bases:?}");
        std::fs::remove_dir_all(&s).unwrap();
    }

    #[test]
    fn a_pool_and_a_monitor_user_are_checked_when_given() {
        assert_eq!(Pool::default().ranges, 4094);
        assert_eq!(Pool::default().first, 0x7000_0000);
        for (bad, says) in [
            ("100000", "FIRST:COUNT"),
            ("0:65536", "above 0"),
            ("4294901760:131072", "below 2^32"),
            ("100000:1000", "multiple of 65536"),
            ("100000:0", "multiple of 65536"),
        ] {
            let err = bad.parse::<Pool>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert_eq!("auto".parse::<MonitorUser>().unwrap(), MonitorUser::Auto);
        assert_eq!("root".parse::<MonitorUser>().unwrap(), MonitorUser::Root);
        assert_eq!(
            "300000".parse::<MonitorUser>().unwrap(),
            MonitorUser::Fixed(IdMap::new(300_000).unwrap())
        );
        assert!("0".parse::<MonitorUser>().is_err());
        assert!("nobody".parse::<MonitorUser>().is_err());
    }
}
