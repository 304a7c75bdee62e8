//! `<state dir>/cgroups`: the cgroup directories of a container and what its VM costs,
//! written before the directories are made so that `husk delete` removes whatever was made,
//! and read by `delete` and `update` (see the module docs of `cgroup`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::CgroupError;
use super::limits::VmCost;

/// The file in the state directory that records the cgroup directories ([`Record`]).
pub const RECORD_FILE: &str = "cgroups";

/// What `<state dir>/cgroups` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The cgroup directories, one per hierarchy.
    pub dirs: Vec<PathBuf>,
    /// What the VM costs beyond the container, where the spec's limits are applied (a
    /// monitor's `cgroupsPath`); `None` where husk keeps no limits.
    pub cost: Option<VmCost>,
}

impl Record {
    /// The record in `state_dir` (an empty or missing one: no cgroups).
    pub fn load(state_dir: &Path) -> Result<Record, CgroupError> {
        let path = state_dir.join(RECORD_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Record::default()),
            Err(source) => return Err(CgroupError::Read { path, source }),
        };
        if text.trim().is_empty() {
            return Ok(Record::default());
        }
        serde_json::from_str(&text).map_err(|source| CgroupError::Record { path, source })
    }

    pub(super) fn save(&self, state_dir: &Path) -> Result<(), CgroupError> {
        let path = state_dir.join(RECORD_FILE);
        let json = serde_json::to_vec(self).map_err(|source| CgroupError::Record {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, json).map_err(|source| CgroupError::Write { path, source })
    }
}
