#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/, cargo-fuzz and libFuzzer on a nightly toolchain) one at a time,
# FUZZ_SECONDS each (default 600), and prints for each the runs executed, the corpus size and the
# crashes (0 expected: zero panics is the rule). Each corpus starts from the target's seeds
# (`snapctl::fuzzing::seeds`) and its fixtures under tests/fixtures/fuzz/<target>/, and is kept
# in fuzz/corpus/<target>/ (not committed) for the next run.
#
# A crash, timeout or out-of-memory input is copied into tests/fixtures/fuzz/<target>/, where
# `cargo test` replays it (tests/fuzz_replay.rs), and the script exits non-zero after the last
# target. Name the new file in tests/fixtures/fuzz/README.md once the bug is fixed.
#
#   scripts/fuzz.sh                   every target
#   scripts/fuzz.sh nbd control       only those
#   FUZZ_SECONDS=60 scripts/fuzz.sh   a short run
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${FUZZ_SECONDS:-600}"
# Slow inputs: libFuzzer's default (20 minutes) would hide a hang for too long.
timeout_secs="${FUZZ_TIMEOUT:-60}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
# Leaks are still detected; fuzz/lsan.supp names the one false report (threads still exiting).
export LSAN_OPTIONS="suppressions=$PWD/fuzz/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: needs a nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! command -v c++ >/dev/null 2>&1; then
  echo "fuzz: needs a C++ compiler for libFuzzer (apt-get install g++)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(superblock open_store nbd control config)
fi

cargo +nightly fuzz build
seeds="fuzz/target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release/seeds"

failed=0
summary=()
for t in "${targets[@]}"; do
  corpus="fuzz/corpus/$t"
  artifacts="fuzz/artifacts/$t"
  fixtures="tests/fixtures/fuzz/$t"
  mkdir -p "$corpus" "$artifacts"
  "$seeds" "$t" "$corpus"
  if [ -d "$fixtures" ]; then
    cp "$fixtures"/* "$corpus"/ 2>/dev/null || true
  fi
  before=$(find "$artifacts" -type f | sort)
  log="fuzz/$t.log"
  echo "fuzz: $t for ${secs}s (log: $log)"
  start=$SECONDS
  set +e
  cargo +nightly fuzz run "$t" "$corpus" -- \
    -max_total_time="$secs" -timeout="$timeout_secs" -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  took=$(( SECONDS - start ))
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  size=$(find "$corpus" -type f | wc -l)
  # What this run left in the artifacts directory: crash-, timeout-, oom-, leak- files.
  found=$(comm -13 <(echo "$before") <(find "$artifacts" -type f | sort) | sed '/^$/d')
  crashes=$(printf '%s' "$found" | grep -c . || true)
  if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
    crashes=1 # libFuzzer failed without leaving an input (a setup problem?): see the log
  fi
  if [ "$crashes" -gt 0 ]; then
    failed=1
    mkdir -p "$fixtures"
    for f in $found; do
      cp "$f" "$fixtures/"
      echo "fuzz: $t: $(basename "$f") copied to $fixtures/ (see $log)"
    done
  fi
  line=$(printf '%-11s runs %-9s (%s/s)  time %ss  corpus %-5s crashes %s' \
    "$t" "${runs:-?}" "${rate:-?}" "$took" "$size" "$crashes")
  echo "fuzz: $line"
  summary+=("$line")
done

echo
printf '%s\n' "${summary[@]}"
exit "$failed"
