//! A fresh directory for one input's files ([`ScratchDir`]), which the harnesses that need
//! host files (`bundle`, `fs`, `vsock`, `snapshot`) share. A leaf, so that the harnesses need
//! nothing from `mod.rs`, which calls them.

/// A fresh, empty directory for one input's files, removed on drop.
pub(super) struct ScratchDir(pub(super) std::path::PathBuf);

impl ScratchDir {
    /// A scratch directory under the system's temporary directory.
    pub(super) fn new(label: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), label)
    }

    /// A scratch directory under `parent`.
    pub(super) fn new_in(parent: &std::path::Path, label: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!("husk-fuzz-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Self(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
