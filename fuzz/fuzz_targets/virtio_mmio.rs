//! A guest programming the virtio-mmio transport register by register (queue setup with
//! arbitrary sizes and addresses), in front of a real device.
//! The input format and the invariants are in `husk::fuzzing`. Run: `cargo +nightly fuzz run virtio_mmio`
//! in `fuzz/`, or `cargo xtask fuzz --target virtio_mmio`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk::fuzzing::virtio_mmio(data));
