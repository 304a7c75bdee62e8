//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`, off by default).
//!
//! Each function takes the fuzzer's bytes and drives the real code with them: the virtio
//! devices through their real MMIO transport, over guest memory and split queues the input
//! fills, and the bundle loader with a `config.json` the input is. Nothing here stands in for
//! the code under test; the harness only plays the parts a guest driver, a host client or a
//! container engine would play. Every function must return for every input: a panic, an abort
//! or a sanitizer report is a bug in the module under test (or in this harness).
//!
//! The device inputs are a small program of operations (see the `ops` module), so that a
//! fuzzer can both write arbitrary bytes anywhere in guest memory and, cheaply, build
//! well-formed descriptor chains and notify queues. [`seeds`] encodes hand-written scenarios
//! in the same format for the checked-in corpora.
//!
//! Adding a device is a harness and an entry point: a struct holding the
//! device (`Arc<Mutex<Net>>`) and its host side (whatever the device's backend is, opened for
//! real by the harness), `impl driver::Device` (`process` calls the device's event handler,
//! `host_op` plays the host side), and a `run` that passes the input, the harness's
//! constructor and how to get its device to `driver::run` (see `vsock.rs`); then a seeds
//! function, a line in [`seeds`] and in the tests below, and a target file plus `[[bin]]` in
//! `fuzz/`.
//!
//! The files: `ops` (the input format: reading and writing programs), `driver` (the guest
//! driver that runs them against a device's MMIO transport), `scratch` (a directory per input
//! for the harnesses' files), one harness per target (`vsock`, `fs`, `net`, `mmio`,
//! `snapshot`, and `bundle`, which needs no driver).

mod bundle;
mod driver;
mod fs;
mod mmio;
mod net;
mod ops;
mod scratch;
mod snapshot;
mod vsock;

/// `config.json` bytes through bundle loading and validation (VM sizing included).
pub fn bundle_config(data: &[u8]) {
    bundle::run(data);
}

/// A virtio-vsock device behind its MMIO transport: TX/RX/event queues filled by the input,
/// several notifications per input, and host-side Unix socket clients the input also drives.
pub fn virtio_vsock(data: &[u8]) {
    vsock::run(data);
}

/// A virtio-fs device behind its MMIO transport, serving a fresh temporary directory: FUSE
/// requests from queues the input fills.
pub fn virtio_fs(data: &[u8]) {
    fs::run(data);
}

/// A virtio-net device behind its MMIO transport, over a datagram socket pair in place of the
/// tap: RX and TX chains the input lays out, frames the input sends from the host side.
pub fn virtio_net(data: &[u8]) {
    net::run(data);
}

/// Register reads and writes of any width and offset on the virtio-mmio transport of a real
/// device (vsock or fs, chosen by the input), including queue setup with arbitrary sizes and
/// addresses against guest memory with a hole, and notifications once the device runs.
pub fn virtio_mmio(data: &[u8]) {
    mmio::run(data);
}

/// A VM template's state file (see `crate::vmm::persist`): decoded, encoded back, and each
/// saved virtio transport restored onto a real device over guest memory.
pub fn snapshot_state(data: &[u8]) {
    snapshot::run(data);
}

/// The seed corpus of `target` (one of the functions above), as (name, input) pairs.
pub fn seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    match target {
        "bundle_config" => bundle::seeds(),
        "virtio_vsock" => vsock::seeds(),
        "virtio_fs" => fs::seeds(),
        "virtio_mmio" => mmio::seeds(),
        "virtio_net" => net::seeds(),
        "snapshot_state" => snapshot::seeds(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    //! The seeds are the checked-in corpora: `fuzz/corpus/<target>/seed_<name>`. These tests
    //! run every seed through its target (a seed that crashes would make the fuzzer stop at
    //! once) and check that the files match the scenarios above. To rewrite the files after
    //! changing a scenario: `HUSK_FUZZ_WRITE_SEEDS=1 cargo test -p husk --features fuzzing
    //! fuzzing::`.

    use std::path::PathBuf;

    use super::*;

    /// A target's name and entry point.
    type Target = (&'static str, fn(&[u8]));

    const TARGETS: [Target; 6] = [
        ("bundle_config", bundle_config),
        ("snapshot_state", snapshot_state),
        ("virtio_vsock", virtio_vsock),
        ("virtio_fs", virtio_fs),
        ("virtio_mmio", virtio_mmio),
        ("virtio_net", virtio_net),
    ];

    fn corpus(target: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target)
    }

    #[test]
    fn every_seed_runs_and_matches_the_corpus() {
        let write = std::env::var_os("HUSK_FUZZ_WRITE_SEEDS").is_some();
        for (target, run) in TARGETS {
            let seeds = seeds(target);
            assert!(seeds.len() >= 3, "{target}: {} seeds", seeds.len());
            for (name, bytes) in &seeds {
                run(bytes);
                let path = corpus(target).join(format!("seed_{name}"));
                if write {
                    std::fs::create_dir_all(corpus(target)).unwrap();
                    std::fs::write(&path, bytes).unwrap();
                } else {
                    let on_disk = std::fs::read(&path).unwrap_or_default();
                    assert!(
                        on_disk == *bytes,
                        "{} is not the seed the scenario writes: rerun with HUSK_FUZZ_WRITE_SEEDS=1",
                        path.display()
                    );
                }
            }
        }
    }

    #[test]
    fn short_and_empty_inputs_are_valid_programs() {
        for (_, run) in TARGETS {
            for input in [&[][..], &[0], &[0xff; 3], &[6, 6, 6, 6, 6, 6, 6]] {
                run(input);
            }
        }
    }
}
