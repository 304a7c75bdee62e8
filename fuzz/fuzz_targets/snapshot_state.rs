//! A VM template's state file through husk's decoder, and its saved virtio transports through
//! their restore onto real devices. The input format and the invariants are in
//! `husk::fuzzing`. Run: `cargo +nightly fuzz run snapshot_state` in `fuzz/`, or
//! `cargo xtask fuzz --target snapshot_state`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk::fuzzing::snapshot_state(data));
