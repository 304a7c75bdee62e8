//! A guest driving the virtio-vsock device (descriptor chains, packet headers, connection
//! state) over guest memory the input fills, with host clients on the device's Unix sockets.
//! The input format and the invariants are in `husk::fuzzing`. Run: `cargo +nightly fuzz run virtio_vsock`
//! in `fuzz/`, or `cargo xtask fuzz --target virtio_vsock`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk::fuzzing::virtio_vsock(data));
