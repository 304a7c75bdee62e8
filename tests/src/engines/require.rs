//! What an engine test needs of the machine (root, KVM, the guest image, the engine's
//! programs), or a skip that says what is missing.

use std::path::PathBuf;

use crate::skip;

/// What every engine test needs: root (for `needs`: KVM, namespaces and the engine's own
/// `needs`), a usable /dev/kvm and the guest image; or a skip that says which is missing.
pub fn prerequisites(needs: &str) -> Option<()> {
    if !crate::is_root() {
        return crate::skip(&format!("needs root (KVM, namespaces, {needs})"));
    }
    if !crate::kvm_available() {
        return crate::skip("no usable /dev/kvm");
    }
    crate::guest_image()?;
    Some(())
}

/// The programs an engine test needs on `PATH`, or a skip naming the missing ones.
pub fn require_programs(programs: &[&str]) -> Option<()> {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| which(p).is_none())
        .collect();
    if missing.is_empty() {
        Some(())
    } else {
        skip(&format!(
            "{} not installed (./scripts/setup.sh --deps installs the engines)",
            missing.join(", ")
        ))
    }
}

/// `program` on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}
