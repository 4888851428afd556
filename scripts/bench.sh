#!/usr/bin/env bash
# Benchmarks snapctl serve against nbdkit's file plugin (the transport baseline) and qemu-nbd over
# a qcow2 with 64 KiB clusters and an internal snapshot (the peer), all measured in this run and
# through the same client: fio --ioengine=nbd.
#
# Workloads: first random 4 KiB writes after a snapshot (copy-on-write), random 4 KiB overwrites,
# random 4 KiB reads (queue depth 32), 1 MiB sequential writes after a snapshot; then the same
# after 1,000 snapshots; and `create` latency with none and with 1,000.
#
# nbdkit's file plugin has no O_DIRECT mode, so the baseline ratios compare like with like:
# every server uses the page cache (snapctl with SNAPCTL_NO_DIRECT=1). snapctl's default,
# O_DIRECT, is measured too and shown as its own row.
#
#   scripts/bench.sh                 # 1 GiB volume, 256 MiB per workload
#   BENCH_SIZE_MB=256 scripts/bench.sh   # smaller and quicker
#   BENCH_SNAPSHOTS=1000             # snapshots for the second round
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build --release --locked --quiet
SNAPCTL="$PWD/target/release/snapctl"
SIZE_MB=${BENCH_SIZE_MB:-1024}
N_SNAP=${BENCH_SNAPSHOTS:-1000}
REGION_MB=$((SIZE_MB / 4))
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

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

# fio WORKLOAD URI -> prints "iops mbps"
run_fio() {
  local wl=$1 uri=$2 args
  case $wl in
    first|overwrite) args="--rw=randwrite --bs=4k --iodepth=32 --offset=0 --size=${REGION_MB}M" ;;
    randread)        args="--rw=randread --bs=4k --iodepth=32 --offset=0 --size=${REGION_MB}M" ;;
    seqwrite)        args="--rw=write --bs=1M --iodepth=8 --offset=$((SIZE_MB / 2))M --size=${REGION_MB}M" ;;
  esac
  # shellcheck disable=SC2086
  fio --name=b --ioengine=nbd --uri="$uri" $args --randrepeat=1 --output-format=json \
    --output="$work/fio.json" >/dev/null 2>&1
  python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] else j["read"]
print("%.0f %.1f" % (side["iops"], side["bw_bytes"] / 1048576))' "$work/fio.json"
}

record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$results"; }

log "bench: preparing a ${SIZE_MB} MiB volume with random data"
head -c "$((SIZE_MB))M" /dev/urandom > "$work/base.img"

# ---- nbdkit file (transport baseline)
cp "$work/base.img" "$work/nbdkit.img"
nbdkit --foreground --unix "$work/nbdkit.sock" file "$work/nbdkit.img" & pids+=($!)
wait_sock "$work/nbdkit.sock"
for wl in first overwrite randread seqwrite; do
  read -r iops mbps < <(run_fio "$wl" "nbd+unix:///?socket=$work/nbdkit.sock")
  record nbdkit 1 "$wl" "$iops" "$mbps"; log "nbdkit          $wl: $iops IOPS, $mbps MiB/s"
done
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
rm -f "$work/nbdkit.img"

# ---- qemu-nbd over qcow2 with an internal snapshot (the peer)
qemu-img convert -O qcow2 -o cluster_size=64k "$work/base.img" "$work/vol.qcow2"
qcow_round() {
  local round=$1
  qemu-img snapshot -c "snap-$round" "$work/vol.qcow2"
  qemu-nbd --persistent --socket="$work/qemu.sock" -f qcow2 "$work/vol.qcow2" & pids+=($!)
  wait_sock "$work/qemu.sock"
  for wl in first overwrite randread seqwrite; do
    read -r iops mbps < <(run_fio "$wl" "nbd+unix:///?socket=$work/qemu.sock")
    record qcow2 "$round" "$wl" "$iops" "$mbps"; log "qcow2 (round $round)  $wl: $iops IOPS, $mbps MiB/s"
  done
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
  rm -f "$work/qemu.sock"
}
qcow_round 1
log "bench: taking $N_SNAP qcow2 internal snapshots"
for i in $(seq 2 "$N_SNAP"); do qemu-img snapshot -c "s$i" "$work/vol.qcow2"; done
qcow_round "$N_SNAP"
rm -f "$work/vol.qcow2"

# ---- snapctl serve, buffered (like nbdkit) and O_DIRECT (its default)
create_ms() { # average create latency over 20 creates, in ms
  local t0 t1 i
  t0=$(date +%s%N)
  for i in $(seq 20); do "$SNAPCTL" create "lat-$1-$i" -q; done
  t1=$(date +%s%N)
  echo $(( (t1 - t0) / 20000000 ))
}
snapctl_mode() {
  local mode=$1
  cp "$work/base.img" "$work/origin.img"
  truncate -s "$((SIZE_MB * 3))M" "$work/store.img"
  export SNAPCTL_STORE="$work/store.img" SNAPCTL_RUN_DIR="$work/run"
  if [ "$mode" = buffered ]; then export SNAPCTL_NO_DIRECT=1; else unset SNAPCTL_NO_DIRECT; fi
  "$SNAPCTL" init "$work/store.img" --origin "$work/origin.img" -q --force
  "$SNAPCTL" serve --socket "$work/snapctl.sock" 2>"$work/serve.log" & pids+=($!)
  wait_sock "$work/snapctl.sock"
  local lat0; lat0=$(create_ms "$mode-0")
  record "snapctl-$mode" 0 create_ms "$lat0" 0
  for round in 1 "$N_SNAP"; do
    if [ "$round" != 1 ]; then
      log "bench: taking $N_SNAP snapctl snapshots"
      local have; have=$("$SNAPCTL" --json info | python3 -c 'import json,sys; print(json.load(sys.stdin)["store"]["snapshot_count"])')
      for i in $(seq "$have" "$((N_SNAP - 1))"); do "$SNAPCTL" create "bulk-$mode-$i" -q; done
      local lat1; lat1=$(create_ms "$mode-$N_SNAP")
      record "snapctl-$mode" "$N_SNAP" create_ms "$lat1" 0
    fi
    "$SNAPCTL" create "round-$mode-$round" -q
    for wl in first overwrite randread seqwrite; do
      read -r iops mbps < <(run_fio "$wl" "nbd+unix:///origin?socket=$work/snapctl.sock")
      record "snapctl-$mode" "$round" "$wl" "$iops" "$mbps"; log "snapctl $mode (round $round)  $wl: $iops IOPS, $mbps MiB/s"
    done
  done
  "$SNAPCTL" -q check
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
  rm -f "$work/origin.img" "$work/store.img"
}
snapctl_mode buffered
snapctl_mode direct

python3 - "$results" "$N_SNAP" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
n = sys.argv[2]
v = {(t, r, w): float(i) for t, r, w, i, m in rows}
mb = {(t, r, w): float(m) for t, r, w, i, m in rows}
print(f"\n{'target':<18}{'snaps':>6}  {'first-write':>12}{'overwrite':>11}{'randread':>10}{'seq-write':>12}{'create':>9}")
for t, r in [("nbdkit", "1"), ("qcow2", "1"), ("qcow2", n), ("snapctl-buffered", "1"), ("snapctl-buffered", n),
             ("snapctl-direct", "1"), ("snapctl-direct", n)]:
    def g(w):
        x = v.get((t, r, w))
        return f"{x:.0f}" if x is not None else "-"
    seq = mb.get((t, r, "seqwrite"))
    c = v.get((t, "0" if r == "1" else r, "create_ms"))
    print(f"{t:<18}{r:>6}  {g('first'):>12}{g('overwrite'):>11}{g('randread'):>10}"
          f"{(f'{seq:.0f} MiB/s' if seq else '-'):>12}{(f'{c:.0f} ms' if c is not None else '-'):>9}")
print("(IOPS for 4 KiB random I/O at queue depth 32; create latency averaged over 20, process start included)\n")
def ratio(name, a, b, target, higher=True):
    if a in v and b in v and v[b] > 0:
        x = v[a] / v[b]
        ok = x >= target if higher else x <= target
        print(f"{name:<58}{x:6.2f}x  target {'>=' if higher else '<='} {target}  {'ok' if ok else 'MISSED'}")
for mode in ["buffered", "direct"]:
    s = f"snapctl-{mode}"
    print(f"-- snapctl {mode}")
    ratio("random read vs nbdkit", (s, "1", "randread"), ("nbdkit", "1", "randread"), 0.9)
    ratio("random overwrite vs nbdkit", (s, "1", "overwrite"), ("nbdkit", "1", "overwrite"), 0.9)
    ratio("first writes after a snapshot vs qcow2", (s, "1", "first"), ("qcow2", "1", "first"), 1.0)
    ratio(f"first writes after a snapshot vs qcow2, {n} snapshots", (s, n, "first"), ("qcow2", n, "first"), 1.0)
    ratio(f"first-write IOPS with {n} snapshots vs one", (s, n, "first"), (s, "1", "first"), 0.95)
    ratio(f"create latency with {n} snapshots vs none", (s, n, "create_ms"), (s, "0", "create_ms"), 1.5, higher=False)
EOF
