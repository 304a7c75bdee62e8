//! Why the template cache could not be used ([`TemplateError`]): a leaf that the cache, the
//! key and the build all fail with.

use std::path::{Path, PathBuf};

use crate::vmm::persist::SnapshotError;

/// Why the template cache could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file or directory of the cache could not be made or read.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The cache directory is not private to root (or its owner).
    #[error(
        "the template directory {0} is writable by others or not owned by this user: \
         templates are restored as root and must not be"
    )]
    NotPrivate(PathBuf),
    /// Building a template failed.
    #[error("building the template: {0}")]
    Build(String),
    /// The snapshot could not be read.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// A failed file operation `what` on `path`, as a [`TemplateError`].
pub(super) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError {
    let path = path.to_owned();
    move |source| TemplateError::Io { what, path, source }
}
