//! husk-init, built static, packed into the initramfs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::progress::Progress;

/// The target husk-init is built for. There is no musl target on these machines; glibc's
/// static libraries (libc6-dev) give a static binary with `+crt-static`.
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds static, stripped husk-init and writes `initramfs.cpio` into `out`; returns its path.
pub fn build(root: &Path, out: &Path, progress: &Progress) -> Result<PathBuf> {
    progress.say("husk-init: cargo build --release (static)");
    // A target dir of its own: these RUSTFLAGS would otherwise invalidate the normal build.
    let target_dir = root.join("target/guest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "--package",
            "husk-init",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        // Static, not static-PIE (no relocation table to ship and apply), stripped.
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C relocation-model=static -C strip=symbols",
        )
        .status()
        .context("running cargo to build husk-init")?;
    ensure!(status.success(), "building husk-init failed ({status})");
    let binary = target_dir.join(TARGET).join("release/husk-init");
    let data = std::fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    if has_interpreter(&data)? {
        bail!(
            "{} is dynamically linked: the static glibc libraries are missing (apt-get install -y libc6-dev)",
            binary.display()
        );
    }
    let init_size = data.len();
    let archive = husk_rootfs::guest_initramfs(data).context("assembling the initramfs")?;
    let bytes = archive.to_bytes().context("writing the initramfs")?;
    let path = out.join("initramfs.cpio");
    let tmp = out.join("initramfs.cpio.tmp");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    progress.say(format!(
        "initramfs: husk-init {init_size} bytes, archive {} bytes",
        bytes.len()
    ));
    Ok(path)
}

/// Whether an x86-64 ELF file has a PT_INTERP program header (i.e. is dynamically linked).
fn has_interpreter(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    ensure!(
        elf.len() >= 64 && &elf[..4] == b"\x7fELF" && elf[4] == 2 && elf[5] == 1,
        "husk-init is not a 64-bit little-endian ELF file"
    );
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
    let mut phoff_bytes = [0u8; 8];
    phoff_bytes.copy_from_slice(&elf[0x20..0x28]);
    let phoff = usize::try_from(u64::from_le_bytes(phoff_bytes)).context("bad e_phoff")?;
    let (phentsize, phnum) = (usize::from(u16_at(0x36)), usize::from(u16_at(0x38)));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let ty = elf
            .get(at..at + 4)
            .context("program header table past the end of husk-init")?;
        if u32::from_le_bytes([ty[0], ty[1], ty[2], ty[3]]) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::has_interpreter;

    #[test]
    fn tells_static_from_dynamic() {
        // The running test binary is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&me).unwrap());
        assert!(has_interpreter(b"not an elf").is_err());
    }
}
