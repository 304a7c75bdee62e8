//! `husk-rootfs-builder --init PATH --out PATH`: writes the guest initramfs holding the given
//! static `husk-init` binary as `/init`. `cargo xtask build-image` uses the library directly;
//! this binary is for building an initramfs by hand.

use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("husk-rootfs-builder: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut init = None;
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--init" => init = args.next(),
            "--out" => out = args.next(),
            "-h" | "--help" => {
                println!("usage: husk-rootfs-builder --init PATH --out PATH");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    let init = init.ok_or("--init PATH is required")?;
    let out = out.ok_or("--out PATH is required")?;
    let data = std::fs::read(&init).map_err(|e| format!("reading {init}: {e}"))?;
    let archive = husk_rootfs::guest_initramfs(data).map_err(|e| e.to_string())?;
    let bytes = archive.to_bytes().map_err(|e| e.to_string())?;
    let tmp = format!("{out}.tmp");
    std::fs::write(&tmp, &bytes).map_err(|e| format!("writing {tmp}: {e}"))?;
    std::fs::rename(&tmp, &out).map_err(|e| format!("renaming {tmp} to {out}: {e}"))?;
    println!("{out}: {} bytes", bytes.len());
    Ok(())
}
