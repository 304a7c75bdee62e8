//! A guest sending FUSE requests through the virtio-fs device, served from a scratch directory.
//! The input format and the invariants are in `husk::fuzzing`. Run: `cargo +nightly fuzz run virtio_fs`
//! in `fuzz/`, or `cargo xtask fuzz --target virtio_fs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk::fuzzing::virtio_fs(data));
