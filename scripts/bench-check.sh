#!/usr/bin/env bash
# `check`, `list`, `info` and opening after an unclean shutdown, on a store holding many
# snapshots and exceptions (the issue's figures: 100,000 snapshots, 10,000,000 exceptions).
#
# The store is built by examples/populate.rs: an ordinary store on a sparse file, its metadata
# written through the real copy-on-write path (one `create`, then one batch of K first writes
# to random chunks of a 1,000,000-chunk sparse origin, per snapshot), only the data bytes never
# written (every byte is zero, so every saved chunk's hash still matches what the sparse file
# reads back). Populating takes minutes, so the store is kept under BENCH_DIR and reused by any
# later run with the same parameters. Every figure below is measured with the snapctl binary.
#
#   row                          what is timed
#   check                        `snapctl -s STORE check` (metadata only), wall time and peak
#                                RSS; killed after BENCH_CHECK_TIMEOUT seconds (shown as ">T")
#   list --json                  `snapctl -s STORE list --json | wc -c`, median of 3
#   info (clean open)            `snapctl -s STORE info` on the closed store, median of 5
#   info after unclean shutdown  on a copy of the store (cp --sparse=always), the populator adds
#                                one more snapshot and its K exceptions, then exits without
#                                closing the database; the first `snapctl info` on it then runs
#                                redb's repair and settle_pending_copies. 3 copies, median; the
#                                ratio divides it by the clean open above. The second `info` on
#                                each copy (clean again) is shown as a control.
# Every store file is fsync'ed before it is timed: snapctl reads with O_DIRECT, which would
# otherwise first write back the pages cp or the populator left dirty.
#
#   scripts/bench-check.sh --quick   # 10,000 snapshots x 100 exceptions (1,000,000): populating
#                                    # took 1.2-5 min here (2 shared cores); check 2-16 s,
#                                    # unclean open 1.02x a clean one (2026-12-02)
#   scripts/bench-check.sh           # 100,000 x 100 (10,000,000): populating should take 30+ min
#   BENCH_SNAPSHOTS=50000 BENCH_PER_SNAPSHOT=200 BENCH_CHECK_TIMEOUT=600 scripts/bench-check.sh
#                                    # 10M with fewer snapshots: populating took 28 min here;
#                                    # check 22 s with the metadata in the page cache, 98 s cold
#
# Knobs: BENCH_SNAPSHOTS, BENCH_PER_SNAPSHOT, BENCH_ORIGIN_CHUNKS (1000000), BENCH_CHUNK_SIZE
# (4096), BENCH_DIR (/var/tmp/snapctl-bench-check: the populated stores, sparse; delete it when
# done), BENCH_CHECK_TIMEOUT (quick 600 s, full 1800 s), BENCH_QUICK=1 (same as --quick),
# BENCH_BIN (measure this snapctl binary; the populator is still built here).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '%s\n' "$*" >&2; }
QUICK=${BENCH_QUICK:-0}
for a in "$@"; do
  case $a in
    --quick) QUICK=1 ;;
    *) log "usage: scripts/bench-check.sh [--quick]"; exit 2 ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  d_n=10000 d_k=100 d_timeout=600
else
  d_n=100000 d_k=100 d_timeout=1800
fi
N=${BENCH_SNAPSHOTS:-$d_n}
K=${BENCH_PER_SNAPSHOT:-$d_k}
OC=${BENCH_ORIGIN_CHUNKS:-1000000}
CS=${BENCH_CHUNK_SIZE:-4096}
TIMEOUT=${BENCH_CHECK_TIMEOUT:-$d_timeout}
DIR=${BENCH_DIR:-/var/tmp/snapctl-bench-check}

cargo build --release --locked --quiet --example populate
POPULATE="$PWD/target/release/examples/populate"
if [ -n "${BENCH_BIN:-}" ]; then
  SNAPCTL=$BENCH_BIN
else
  cargo build --release --locked --quiet --bin snapctl
  SNAPCTL="$PWD/target/release/snapctl"
fi
unset SNAPCTL_STORE SNAPCTL_NO_DIRECT SNAPCTL_IO_ENGINE   # the default engine: io_uring, O_DIRECT

work=$(mktemp -d "${TMPDIR:-/var/tmp}/snapctl-bench-check.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
results="$work/results.tsv"
: > "$results"
record() { printf '%s\t%s\n' "$1" "$2" >> "$results"; }

# secs CMD...: wall time of CMD in seconds (its output discarded)
secs() {
  local t0 t1
  t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", (b - a) / 1e9 }'
}
median() { sort -g | awk '{ x[NR] = $1 } END { print (NR % 2) ? x[(NR + 1) / 2] : (x[NR / 2] + x[NR / 2 + 1]) / 2 }'; }
list_bytes() { "$SNAPCTL" -s "$1" list --json | wc -c; }

# ---- the store: populated once per parameter set, reused while its `done` marker is there
cache="$DIR/store-n$N-k$K-c$CS-o$OC"
store="$cache/store.img"
if [ -f "$cache/done" ] && [ -f "$store" ]; then
  log "bench-check: reusing $cache ($(cat "$cache/done"))"
else
  rm -rf "$cache"
  mkdir -p "$cache"
  log "bench-check: populating $cache: $N snapshots x $K exceptions (log: $cache/populate.log)"
  "$POPULATE" --store "$store" --origin "$cache/origin.img" --snapshots "$N" \
    --exceptions-per-snapshot "$K" --chunk-size "$CS" --origin-chunks "$OC" \
    > "$cache/populate.out" 2> "$cache/populate.log" \
    || { tail -n 5 "$cache/populate.log" >&2; exit 1; }
  tail -n 1 "$cache/populate.log" >&2
  sync "$store"
  cp "$cache/populate.out" "$cache/done"
fi
# populate_s=... per_snapshot_ms=... (see examples/populate.rs)
for kv in $(cat "$cache/done"); do record "populate.${kv%%=*}" "${kv#*=}"; done
record store.used_mib "$(du -m "$store" | cut -f1)"

# ---- clean open, list, check
log "bench-check: info (clean open) x5, list --json x3"
for _ in 1 2 3 4 5; do record info.clean_s "$(secs "$SNAPCTL" -s "$store" info)"; done
for _ in 1 2 3; do record list.json_s "$(secs list_bytes "$store")"; done
record list.json_bytes "$(list_bytes "$store")"
record store.snapshots "$("$SNAPCTL" -s "$store" --json info | python3 -c 'import json,sys; print(json.load(sys.stdin)["store"]["snapshot_count"])')"

log "bench-check: check (metadata), at most $TIMEOUT s"
t0=$(date +%s%N)
rc=0
/usr/bin/time -v -o "$work/check.time" timeout "$TIMEOUT" "$SNAPCTL" -s "$store" check \
  > "$work/check.out" 2>&1 || rc=$?
t1=$(date +%s%N)
record check.s "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')"
record check.rss_mib "$(awk -F': ' '/Maximum resident set size/ { printf "%.1f", $2 / 1024 }' "$work/check.time")"
if [ "$rc" = 124 ]; then
  record check.result "timed out"
elif [ "$rc" = 0 ]; then
  record check.result "$(tail -n 1 "$work/check.out")"
else
  record check.result "exit $rc: $(tail -n 1 "$work/check.out")"
fi
log "  $(tail -n 2 "$work/check.out" | tr '\n' ' ')"

# ---- open after an unclean shutdown, on copies
log "bench-check: open after an unclean shutdown x3 (each on a fresh copy)"
for i in 1 2 3; do
  copy="$work/unclean.img"
  cp --sparse=always --reflink=auto "$store" "$copy"
  "$POPULATE" --store "$copy" --snapshots 1 --exceptions-per-snapshot "$K" --seed "$((i + 7))" \
    --unclean > "$work/unclean.out" 2> "$work/unclean.log" \
    || { tail -n 5 "$work/unclean.log" >&2; exit 1; }
  sync "$copy"
  record recovery.open_s "$(secs "$SNAPCTL" -s "$copy" info)"
  sync "$copy"
  record recovery.reopen_s "$(secs "$SNAPCTL" -s "$copy" info)"
  rm -f "$copy"
done

# ---- the table
python3 - "$results" "$N" "$K" "$TIMEOUT" <<'EOF'
import statistics, sys
n, k, timeout = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
seen = {}
for line in open(sys.argv[1]):
    key, x = line.rstrip("\n").split("\t", 1)
    seen.setdefault(key, []).append(x)

def num(key):
    try:
        xs = [float(x) for x in seen.get(key, [])]
    except ValueError:
        return None
    return statistics.median(xs) if xs else None

def text(key):
    return seen.get(key, ["-"])[-1]

check = num("check.s")
timed_out = text("check.result") == "timed out"
clean, rec, reopen = num("info.clean_s"), num("recovery.open_s"), num("recovery.reopen_s")
ratio = rec / clean if rec is not None and clean else None
snaps = int(num("store.snapshots") or 0)
rows = [
    (f"check, {snaps:,} snapshots / {n * k:,} exceptions",
     f">{timeout} s (killed)" if timed_out else f"{check:.2f} s",
     "< 60 s", (not timed_out) and check < 60),
    ("check, peak RSS", f"{num('check.rss_mib'):.0f} MiB", "-", None),
    ("list --json | wc -c", f"{num('list.json_s'):.3f} s", "<= 1 s", num("list.json_s") <= 1.0),
    ("info (clean open), median of 5", f"{clean:.3f} s", "-", None),
    ("info after unclean shutdown, median of 3", f"{rec:.3f} s", "-", None),
    ("  ratio: unclean open / clean open", f"{ratio:.2f}x", "<= 2x", ratio <= 2.0),
    ("  control: the same copy opened again", f"{reopen:.3f} s", "-", None),
]
w = (52, 20, 10)
print()
print(f"{'metric':<{w[0]}}{'value':<{w[1]}}{'target':<{w[2]}}verdict")
for label, value, target, ok in rows:
    verdict = "-" if ok is None else ("ok" if ok else "MISSED")
    print(f"{label:<{w[0]}}{value:<{w[1]}}{target:<{w[2]}}{verdict}")
print(f"(check said: {text('check.result')})")
print(f"store: {snaps:,} snapshots, {n * k:,} exceptions of 4 KiB chunks at random over the origin;"
      f" {num('store.used_mib'):.0f} MiB really used (sparse); list --json {int(num('list.json_bytes') or 0):,} bytes")
print(f"populated at {n / num('populate.populate_s'):.0f} snapshots/s: per snapshot"
      f" {num('populate.create_ms'):.2f} ms create + {num('populate.write_ms'):.2f} ms write of {k} chunks"
      f" ({num('populate.populate_s'):.0f} s in all; the populator skips flushes)")
print("raw: " + "; ".join(f"{key} " + ", ".join(xs) for key, xs in seen.items()
                          if key.startswith(("info.", "list.json_s", "recovery.", "check.s"))))
EOF
