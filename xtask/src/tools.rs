//! Checks for the host tools a task needs, with the command that installs each.

use std::path::Path;

use anyhow::{Result, bail};

/// A host program or file a task needs, and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Requirement {
    /// What is looked for: a program name (on `$PATH`) or an absolute file path.
    pub what: &'static str,
    /// The Debian package providing it.
    pub package: &'static str,
}

/// Fails with one message naming every missing requirement and the apt command that installs
/// all of them.
pub fn require(reqs: &[Requirement]) -> Result<()> {
    let missing: Vec<&Requirement> = reqs.iter().filter(|r| !present(r.what)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing
        .iter()
        .map(|r| format!("{} (package {})", r.what, r.package))
        .collect();
    let mut packages: Vec<&str> = missing.iter().map(|r| r.package).collect();
    packages.dedup();
    bail!(
        "missing: {}\n  install with: apt-get install -y {}\n  (or run ./scripts/setup.sh, which installs everything husk needs)",
        names.join(", "),
        packages.join(" ")
    )
}

fn present(what: &str) -> bool {
    if what.starts_with('/') {
        return Path::new(what).exists();
    }
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| dir.join(what).is_file())
}
