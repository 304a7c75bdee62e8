#!/bin/sh
# The test command (what .ci/run runs): installs missing packages, builds the guest image
# (cached under $HUSK_CACHE_DIR, default /var/cache/husk), checks formatting and lints, then
# runs every test. HUSK_E2E_REQUIRED=1 turns "skipped: no KVM/QEMU/image" into failures: CI
# machines have all of it. Last, a fuzz smoke run: every target in fuzz/ for
# $HUSK_FUZZ_SECONDS (default 20) seconds.
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh --deps
# The fuzz targets need a nightly toolchain and cargo-fuzz; both are cached once installed.
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
cargo xtask build-image
cargo fmt --all --check
(cd fuzz && cargo fmt --check)
cargo clippy --workspace --all-targets -- -D warnings
# husk's fuzzing entry points are behind a feature no workspace build enables.
cargo clippy -p husk --features fuzzing --all-targets -- -D warnings
HUSK_E2E_REQUIRED=1 cargo test --workspace -- --nocapture
cargo test -p husk --features fuzzing --lib fuzzing::
cargo xtask fuzz --seconds "${HUSK_FUZZ_SECONDS:-20}"
