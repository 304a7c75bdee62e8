//! A bundle's config.json through husk's bundle loading and validation (VM sizing included).
//! The input format and the invariants are in `husk::fuzzing`. Run: `cargo +nightly fuzz run bundle_config`
//! in `fuzz/`, or `cargo xtask fuzz --target bundle_config`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| husk::fuzzing::bundle_config(data));
