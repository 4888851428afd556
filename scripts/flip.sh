#!/usr/bin/env bash
# The flip harness at a larger scale than CI's: FLIPS single-byte flips over the used metadata
# pages and inside saved chunks (default 3000), every view read through the CLI and NBD after
# each, counts printed. Usage: scripts/flip.sh [FLIPS]
set -euo pipefail
cd "$(dirname "$0")/.."
export SNAPCTL_FLIPS="${1:-3000}"
cargo test --release --locked flip:: -- --nocapture --test-threads 1 2>&1 | grep -E "flips|test result|panicked|WRONG"
