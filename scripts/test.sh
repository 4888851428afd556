#!/usr/bin/env bash
# The test command: installs what the tests need, checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --release --locked --all-targets -- -D warnings
# The fuzz targets (fuzz/, scripts/fuzz.sh) type-check on stable, without compiling libFuzzer.
cargo check --release --locked --manifest-path fuzz/Cargo.toml --target-dir target --no-default-features --bins
rm -f target/flip-counts.txt target/crash-states.txt
cargo test --release --locked
# The flip harness's counts (tests/flip.rs): detected / harmless / wrong.
cat target/flip-counts.txt 2>/dev/null || true
# The crash-state explorer's count (tests/explore.rs): distinct states checked, failures.
cat target/crash-states.txt 2>/dev/null || true
# A bounded slice of the SIGKILL soak (scripts/soak.sh runs 20 kills by default).
SOAK_BIN="$PWD/target/release/snapctl" scripts/soak.sh --kills 3 --seconds-per-round 2 --size 64
