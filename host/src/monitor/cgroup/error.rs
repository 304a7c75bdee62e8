//! What fails in making, joining, limiting or removing a container's host cgroups: one type
//! for all of them, apart so that `limits` and `record` can name it without the rest.

use std::path::PathBuf;

/// Why the cgroups could not be made, joined, limited or removed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A file of `/proc` or of a cgroup, or the record, could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The record, or a cpuset's CPUs or memory nodes, could not be written.
    #[error("writing {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The record is not what husk writes.
    #[error("{path}: not a cgroup record")]
    Record {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A value of `linux.resources` cannot be applied as given.
    #[error("linux.resources.{field}: {why}")]
    Invalid {
        /// The field, below `linux.resources`.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A limit's file is in none of the host cgroup's hierarchies.
    #[error(
        "linux.resources.{field}: the host cgroup has no {file} (its controller is not mounted, or not enabled there)"
    )]
    NoController {
        /// The file.
        file: &'static str,
        /// The field, below `linux.resources`.
        field: &'static str,
    },
    /// The kernel refused a limit.
    #[error("linux.resources.{field}: setting {path} to {value}{context}")]
    Limit {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// The field, below `linux.resources`.
        field: &'static str,
        /// What explains it, if anything (` (...)`).
        context: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A cgroup directory could not be made (a read-only hierarchy, say).
    #[error("creating the cgroup {dir}")]
    Create {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be moved into its cgroup.
    #[error("moving the process into {dir}")]
    Join {
        /// The cgroup.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Some recorded cgroups could not be removed (each with why, in the message).
    #[error("removing the cgroups {0}")]
    Remove(String),
}
