#!/usr/bin/env bash
# What checksums cost: the same program built twice, once as shipped and once with chunk hashes
# and row checks switched off (`--features bench-unhashed`), measured side by side in this run.
#
#   1. Through `snapctl serve` (O_DIRECT, its default) and fio --ioengine=nbd, 4 KiB at queue
#      depth 32, both builds serving at once: the first random writes after a snapshot, region
#      by region (every one copies a chunk and hashes it), then 5-second passes of random reads
#      of the snapshot (every one reads a saved chunk from the store and verifies it). The
#      builds alternate run by run; medians are compared.
#   2. Open time: `list` and `create` on a fresh store and on one holding BENCH_EXCEPTIONS saved
#      chunks (default 1,000,000: 4 GiB of store), for both builds.
#
#   scripts/bench-checksums.sh
#   BENCH_SIZE_MB=256 BENCH_ROUNDS=4 BENCH_EXCEPTIONS=100000 scripts/bench-checksums.sh  # quicker
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
SIZE_MB=${BENCH_SIZE_MB:-1024}
ROUNDS=${BENCH_ROUNDS:-8}
EXC=${BENCH_EXCEPTIONS:-1000000}
cargo build --release --locked --quiet
cargo build --release --locked --quiet --features bench-unhashed --target-dir target/unhashed
declare -A BIN=([hashed]="$PWD/target/release/snapctl" [unhashed]="$PWD/target/unhashed/release/snapctl")
work=$(mktemp -d /tmp/snapctl-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
results="$work/results.tsv"
: > "$results"
log() { printf '%s\n' "$*" >&2; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-0}" >> "$results"; }
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

# fio RW URI OFFSET_MB SIZE_MB [SECONDS] -> IOPS (time-based when SECONDS is given)
run_fio() {
  local timing=()
  if [ -n "${5:-}" ]; then timing=(--time_based "--runtime=$5"); fi
  fio --name=b --ioengine=nbd --uri="$2" --rw="$1" --bs=4k --iodepth=32 --offset="$3M" \
    --size="$4M" --randrepeat=1 "${timing[@]}" --output-format=json --output="$work/fio.json" >/dev/null 2>&1
  python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] else j["read"]
print("%.0f" % side["iops"])' "$work/fio.json"
}

# Both builds serve at once, each its own copy of the volume with one snapshot; the workloads
# alternate between them in short runs, so drift on a shared machine falls on both alike.
log "bench: ${SIZE_MB} MiB volume, $ROUNDS regions of $((SIZE_MB / ROUNDS)) MiB, builds alternating"
head -c "${SIZE_MB}M" /dev/urandom > "$work/base.img"
for b in hashed unhashed; do
  cp "$work/base.img" "$work/$b-origin.img"
  truncate -s "$((SIZE_MB * 2))M" "$work/$b-store.img"
  SNAPCTL_RUN_DIR="$work/run-$b" "${BIN[$b]}" -q init "$work/$b-store.img" --origin "$work/$b-origin.img" --force
  SNAPCTL_STORE="$work/$b-store.img" SNAPCTL_RUN_DIR="$work/run-$b" "${BIN[$b]}" -q create snap
  SNAPCTL_STORE="$work/$b-store.img" SNAPCTL_RUN_DIR="$work/run-$b" \
    "${BIN[$b]}" serve --socket "$work/$b.sock" 2>"$work/$b-serve.log" & pids+=($!)
  wait_sock "$work/$b.sock"
done
region=$((SIZE_MB / ROUNDS))
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then order="hashed unhashed"; else order="unhashed hashed"; fi
  for b in $order; do
    iops=$(run_fio randwrite "nbd+unix:///origin?socket=$work/$b.sock" $(((r - 1) * region)) "$region")
    record "$b" first "$iops" "$r"
    log "  region $r $b: first writes $iops IOPS"
  done
done
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then order="hashed unhashed"; else order="unhashed hashed"; fi
  for b in $order; do
    iops=$(run_fio randread "nbd+unix:///snap?socket=$work/$b.sock" 0 "$SIZE_MB" 5)
    record "$b" saved-read "$iops" "$r"
    log "  pass $r $b: reads of saved chunks $iops IOPS"
  done
done
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
pids=()
for b in hashed unhashed; do
  SNAPCTL_STORE="$work/$b-store.img" "${BIN[$b]}" -q check
  rm -f "$work/$b-origin.img" "$work/$b-store.img"
done

# median wall time of `snapctl ARGS...` over N runs, in microseconds
time_us() {
  local n=$1 t0 t1 i; shift
  for i in $(seq "$n"); do
    t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N)
    echo $(( (t1 - t0) / 1000 ))
  done | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
# median wall time of 11 creates, in microseconds
create_us() {
  local s=$1 prefix=$2 t0 t1 i
  for i in $(seq 11); do
    t0=$(date +%s%N); "$s" -q create "$prefix-$i"; t1=$(date +%s%N)
    echo $(( (t1 - t0) / 1000 ))
  done | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
open_round() {
  local build=$1 s=${BIN[$1]} bytes=$((EXC * 4096))
  truncate -s "$bytes" "$work/origin.img"
  truncate -s "$((bytes + bytes / 8 + (64 << 20)))" "$work/store.img"
  export SNAPCTL_STORE="$work/store.img" SNAPCTL_RUN_DIR="$work/run"
  "$s" -q init "$work/store.img" --origin "$work/origin.img" --force --chunk-size 4K
  "$s" -q create first
  record "$build" list-0 "$(time_us 31 "$s" list)"
  record "$build" create-0 "$(create_us "$s" c0)"
  log "  $build: saving $EXC chunks"
  head -c "$bytes" /dev/zero | "$s" -q write
  local saved
  saved=$("$s" --json check | python3 -c 'import json,sys; print(json.load(sys.stdin)["check"]["used_chunks"])')
  record "$build" saved "$saved"
  record "$build" list-n "$(time_us 31 "$s" list)"
  record "$build" create-n "$(create_us "$s" cn)"
  log "  $build: $saved chunks saved"
  rm -f "$work/origin.img" "$work/store.img"
}
log "open time with $EXC saved chunks"
open_round hashed
open_round unhashed

python3 - "$results" "$EXC" <<'EOF'
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
v = {}
by_round = {}
for b, k, x, r in rows:
    v.setdefault((b, k), []).append(float(x))
    by_round.setdefault((k, r), {})[b] = float(x)
med = {k: statistics.median(x) for k, x in v.items()}
# The builds ran back to back on the same region (or pass): the ratio of each such pair cancels
# the drift of a shared machine, and their median is the figure compared with the target.
pair = {}
for (k, r), d in by_round.items():
    if "hashed" in d and "unhashed" in d and d["unhashed"] > 0:
        pair.setdefault(k, []).append(d["hashed"] / d["unhashed"])
print(f"\n{'':<34}{'hashed':>12}{'unhashed':>12}")
for k, label, unit in [("first", "first write after a snapshot", "IOPS"), ("saved-read", "random read of saved chunks", "IOPS")]:
    print(f"{label:<34}{med[('hashed', k)]:>12.0f}{med[('unhashed', k)]:>12.0f}  {unit}, median of {len(v[('hashed', k)])}"
          f"; pair ratios {' '.join(f'{x:.2f}' for x in pair[k])}")
n = int(med[("hashed", "saved")])
for k, label in [("list-0", "list, fresh store"), ("create-0", "create, fresh store"),
                 ("list-n", f"list, {n:,} saved chunks"), ("create-n", f"create, {n:,} saved chunks")]:
    print(f"{label:<34}{med[('hashed', k)] / 1000:>10.1f}ms{med[('unhashed', k)] / 1000:>10.1f}ms")
print("(process start included in list and create)\n")
def ratio(name, x, target, higher=True):
    ok = x >= target if higher else x <= target
    print(f"{name:<58}{x:6.2f}x  target {'>=' if higher else '<='} {target}  {'ok' if ok else 'MISSED'}")
ratio("first write after a snapshot, hashed vs unhashed (median pair)", statistics.median(pair["first"]), 0.95)
ratio("random read of saved chunks, hashed vs unhashed (median pair)", statistics.median(pair["saved-read"]), 0.95)
ratio(f"list with {n:,} saved chunks vs fresh store", med[("hashed", "list-n")] / med[("hashed", "list-0")], 1.2, higher=False)
ratio(f"create with {n:,} saved chunks vs fresh store", med[("hashed", "create-n")] / med[("hashed", "create-0")], 1.2, higher=False)
ratio(f"list with {n:,} saved chunks, hashed vs unhashed", med[("hashed", "list-n")] / med[("unhashed", "list-n")], 1.2, higher=False)
EOF
