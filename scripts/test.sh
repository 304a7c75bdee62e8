#!/bin/sh
# The test command (what .ci/run runs): installs missing packages, builds the guest image
# (cached under $HUSK_CACHE_DIR, default /var/cache/husk), checks formatting and lints, then
# runs every test. HUSK_E2E_REQUIRED=1 turns "skipped: no KVM/QEMU/image" into failures: CI
# machines have all of it.
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh --deps
cargo xtask build-image
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
HUSK_E2E_REQUIRED=1 cargo test --workspace -- --nocapture
