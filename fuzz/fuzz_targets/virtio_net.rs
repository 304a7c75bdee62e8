//! A guest driving the virtio-net device (receive and transmit descriptor chains, virtio-net
//! headers and offloads, a broken device and its reset) over guest memory the input fills,
//! with the host's side of the tap played through a datagram socket. The input format and the
//! invariants are in `husk::fuzzing`. Run: `cargo +nightly fuzz run virtio_net` in `fuzz/`, or
//! `cargo xtask fuzz --target virtio_net`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk::fuzzing::virtio_net(data));
