#!/usr/bin/env bash
# Regenerates man/ and completions/ from the clap definitions (tests/docs.rs checks them).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -- generate-docs --out-dir .
echo "man/ and completions/ regenerated"
