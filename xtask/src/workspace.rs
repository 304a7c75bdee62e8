//! Where the workspace is: the tasks find the guest image, the fuzz targets and the `husk`
//! binary from it. A leaf, so that the tasks need nothing from `main.rs`, which dispatches to
//! them.

use std::path::PathBuf;

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}
