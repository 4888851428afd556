#!/usr/bin/env bash
# The table of issue 10 ("Copy-on-write at the device's speed"): snapctl and its baselines,
# measured side by side in this one run on this machine; every ratio divides two figures of
# this run. Each row prints snapctl's figure, the baseline, the ratio, the target and ok/MISSED;
# the raw figures of every baseline follow.
#
# Data path: fio, 4 KiB random at queue depth 32 unless said. snapctl through `snapctl serve`
# (its default engine, io_uring with O_DIRECT) and fio --ioengine=nbd, like qemu-nbd; the raw
# file through fio's io_uring engine with --direct=1. Regions of a volume of V = BENCH_SIZE_MB
# random bytes, R = BENCH_REGION_MB: A = [0, R) for random I/O, C = [V/2, V/2 + R) sequential.
#
#   row                           snapctl                          baseline
#   first write after a snapshot  randwrite over A once, right     qemu-nbd on a qcow2 with 64 KiB
#                                 after `snapctl create`           clusters and an internal snapshot
#                                                                  (`qemu-img snapshot -c`), and
#                                                                  qemu-nbd on the raw file; both
#                                                                  --cache=none --aio=io_uring
#                                                                  (native where io_uring fails)
#   the same, 64 KiB chunks       the same on a second store,      the same (no target: the row
#                                 `init --chunk-size 64K`          compares equal granularity)
#   the same, against the device  the first write above            the raw file, randrw 50/50 at
#                                                                  queue depth 256: the write
#                                                                  side's IOPS, one read and one
#                                                                  write per 4 KiB chunk's first
#                                                                  write at best (no target)
#   overwrite, random read        randwrite, randread over A       fio io_uring --direct=1 on a
#                                 again                            file of the volume's size; and
#                                                                  (no target) qemu-nbd raw, the
#                                                                  same NBD path with no snapshots
#   1 MiB seq write, iodepth 8    over C before any snapshot,      qemu-nbd raw, cache=none, over C
#                                 and once after the snapshot
#   4 connections                 fio numjobs=4, each job its      the same with one connection
#                                 own connection and quarter of    over all of A; and (no target)
#                                 A (--offset_increment)           the raw file with 4 jobs, to
#                                                                  show what the device allows
#   create, 256 GiB origin        `snapctl create`, no server,     the same on a 256 MiB origin
#                                 process start included; both origins sparse, same store size
#   first write at BENCH_MANY     a store holding BENCH_MANY       a store holding 1 snapshot
#   snapshots                     snapshots (a loop of `snapctl create`), both served at once
#   list, create, delete at       no server, process start         (list: absolute, 1 s) create
#   BENCH_LIST snapshots          included                         and delete at 0 snapshots
#   server RSS                    VmHWM of `snapctl serve` holding BENCH_EXCEPTIONS saved 4 KiB
#                                 chunks (`head -c | snapctl write` after a create), after a
#                                 random read pass over all of them (the snapshot's export)
#                                 against its bound: VmHWM at start + serve --cache + 16 MiB;
#                                 and the data path's server after all its runs (1 MiB writes
#                                 included), against the same plus 64 MiB of writeback queue
#                                 and staged writes
#
# During the first-write passes the device's own counters (/sys/class/block/DEV/stat of the
# device holding the work directory) are read before and after each part: reads, writes, bytes
# and flushes per client write, for every target, printed below the table.
#
# This machine is shared and its disk drifts by 2x from one minute to the next, so the two sides
# of every ratio are measured interleaved: all servers run at once and the runs alternate (order
# reversed or rotated each round); first writes go by quarters of A, alternating; creates,
# deletes and lists go in alternating batches of 5 (4 batches a side). A rate measured in parts
# is the total work over the total time; a time per command is the median of its batches'
# averages (one fsync stall of this disk would otherwise decide it). Repeatable runs (overwrite,
# read, 4 connections, sequential writes before the snapshot) are timed: BENCH_ROUNDS rounds of
# BENCH_RUNTIME seconds each. First writes, including the sequential pass over C after the
# snapshot, cover their region once (a second pass would not be a first write). Every server
# (snapctl serve, qemu-nbd) is killed on exit. Every fio job ends with a flush (--end_fsync=1)
# that its time includes: a server that answers writes before they are on disk (snapctl's
# staged and queued writes, qemu's writeback cache) is timed to the point where they are. A missing fio, qemu-img or qemu-nbd is reported
# and its rows show "-".
#
#   BENCH_QUICK=1 scripts/bench.sh   # 256 MiB volume, 64 MiB regions, 3 rounds of 2 s,
#                                    # BENCH_MANY=200, BENCH_LIST=2000, BENCH_EXCEPTIONS=100000:
#                                    # about 1 min 45 s on this machine (2 cores), plus the build
#   scripts/bench.sh                 # the issue's counts: 1 GiB volume, 256 MiB regions, 4 rounds
#                                    # of 5 s, BENCH_MANY=10000, BENCH_LIST=100000,
#                                    # BENCH_EXCEPTIONS=1000000 (4 GiB origin + 4.6 GiB store):
#                                    # about 15-20 min here, estimated from quick runs' rates
#   BENCH_LIST=20000 scripts/bench.sh    # shorter, should creates be slower on your machine
#
# Snapshots are created one `snapctl create` process each, through the control socket of the
# server holding the store, and the time per create is logged every fifth of the way. Quick
# runs here measured 3.5-7 ms per create (varying from run to run with the disk), with no growth
# from 0 to 2,000 snapshots within a run: 10,000 take about 1 min and 100,000 7-12 min if it
# stays flat, the larger part of the full run. Without a server every command loads the whole
# catalog, so create, delete and list cost more there, growing with the count.
# Other knobs: BENCH_SIZE_MB, BENCH_REGION_MB (4 MiB to a quarter of the volume), BENCH_ROUNDS,
# BENCH_RUNTIME, BENCH_BIN (measure this snapctl binary instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '%s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
scripts/setup.sh >/dev/null || log "bench: scripts/setup.sh failed: rows needing a missing tool show -"
if [ -n "${BENCH_BIN:-}" ]; then
  SNAPCTL=$BENCH_BIN
else
  cargo build --release --locked --quiet
  SNAPCTL="$PWD/target/release/snapctl"
fi
have python3 || { log "bench: python3 is needed to read fio's output"; exit 1; }

if [ "${BENCH_QUICK:-0}" = 1 ]; then
  d_size=256 d_many=200 d_list=2000 d_exc=100000 d_runtime=2 d_rounds=3
else
  d_size=1024 d_many=10000 d_list=100000 d_exc=1000000 d_runtime=5 d_rounds=4
fi
SIZE_MB=${BENCH_SIZE_MB:-$d_size}
REGION_MB=${BENCH_REGION_MB:-$((SIZE_MB / 4))}
MANY=${BENCH_MANY:-$d_many}
LIST=${BENCH_LIST:-$d_list}
EXC=${BENCH_EXCEPTIONS:-$d_exc}
RUNTIME=${BENCH_RUNTIME:-$d_runtime}
ROUNDS=${BENCH_ROUNDS:-$d_rounds}
if [ $((REGION_MB * 4)) -gt "$SIZE_MB" ] || [ "$REGION_MB" -lt 4 ]; then
  log "bench: BENCH_REGION_MB must be 4 MiB or more and at most a quarter of BENCH_SIZE_MB"; exit 2
fi
[ "$MANY" -ge 2 ] || { log "bench: BENCH_MANY must be 2 or more"; exit 2; }
[ "$LIST" -ge "$MANY" ] || LIST=$MANY
R_K=$((REGION_MB * 1024))          # region size, KiB
A_K=0 C_K=$((SIZE_MB * 512))   # region offsets, KiB: A random, C sequential

work=$(mktemp -d /tmp/snapctl-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
export SNAPCTL_RUN_DIR="$work/run"
unset SNAPCTL_NO_DIRECT SNAPCTL_IO_ENGINE   # the default engine: io_uring with O_DIRECT
results="$work/results.tsv"
: > "$results"
record() { printf '%s\t%s\n' "$1" "$2" >> "$results"; }
t_start=$(date +%s)

for t in fio qemu-img qemu-nbd; do
  have "$t" || log "bench: $t is not installed: the rows that need it show -"
done

# ---- helpers

# wait_sock SOCKET PID: until the socket exists; fails when PID exits first or after 10 s
wait_sock() {
  for _ in $(seq 200); do
    [ -S "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}
# stop PID: ends a server this script started (SIGTERM: snapctl serve commits and exits)
stop() {
  local p keep=()
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  pids=("${keep[@]}")
}

# fio_run KEY FIO-ARGS...: one fio job (group-reported); records KEY_iops and KEY_mbps
fio_run() {
  local key=$1 iops mbps; shift
  if ! have fio; then log "  $key: - (no fio)"; return 0; fi
  if ! fio --name=b --randrepeat=1 --group_reporting --end_fsync=1 --output-format=json \
      --output="$work/fio.json" "$@" >"$work/fio.err" 2>&1; then
    log "  $key: fio failed: $(tail -n 3 "$work/fio.err" | tr '\n' ' ')"
    return 0
  fi
  read -r iops mbps < <(python3 -c '
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] else j["read"]
print("%.0f %.1f" % (side["iops"], side["bw_bytes"] / 1048576))' "$work/fio.json")
  record "${key}_iops" "$iops"
  record "${key}_mbps" "$mbps"
  log "  $key: $iops IOPS, $mbps MiB/s"
}
RAND=(--bs=4k --iodepth=32)
SEQ=(--rw=write --bs=1M --iodepth=8)
TIMED=(--time_based --runtime="$RUNTIME")
region() { echo "--offset=${1}k" "--size=${R_K}k"; }   # region OFFSET_K -> fio args

# start_snapctl STORE SOCKET: serves STORE (log in SOCKET.log), sets srv; returns once both its
# NBD and control sockets listen (it says "serving" after binding both)
start_snapctl() {
  export SNAPCTL_STORE=$1
  rm -f "$2"
  "$SNAPCTL" serve --socket "$2" 2>"$2.log" & srv=$!
  pids+=("$srv")
  for _ in $(seq 400); do
    grep -q '^snapctl serve: serving' "$2.log" && return 0
    kill -0 "$srv" 2>/dev/null || break
    sleep 0.05
  done
  log "bench: snapctl serve did not start:"; tail -n 5 "$2.log" >&2; exit 1
}
# dev_io: "reads read-KiB writes written-KiB flushes" completed so far by the device holding
# the work directory (/sys/class/block/DEV/stat), or nothing when that is not a block device
io_dev=$(findmnt -no SOURCE -T "$work" 2>/dev/null | sed 's|^/dev/||; s|\[.*||' || true)
dev_io() {
  [ -n "$io_dev" ] && [ -r "/sys/class/block/$io_dev/stat" ] || return 0
  awk '{ print $1, $3 / 2, $5, $7 / 2, $16 }' "/sys/class/block/$io_dev/stat"
}
# io_per_write KEY BEFORE AFTER WRITES: the device I/O between two dev_io samples, per client write
io_per_write() {
  [ -n "$2" ] && [ -n "$3" ] || return 0
  local b a
  read -ra b <<< "$2"; read -ra a <<< "$3"
  record "$1_rd_per_w" "$(awk -v x="${a[0]}" -v y="${b[0]}" -v n="$4" 'BEGIN { printf "%.3f", (x - y) / n }')"
  record "$1_rkib_per_w" "$(awk -v x="${a[1]}" -v y="${b[1]}" -v n="$4" 'BEGIN { printf "%.2f", (x - y) / n }')"
  record "$1_wr_per_w" "$(awk -v x="${a[2]}" -v y="${b[2]}" -v n="$4" 'BEGIN { printf "%.3f", (x - y) / n }')"
  record "$1_wkib_per_w" "$(awk -v x="${a[3]}" -v y="${b[3]}" -v n="$4" 'BEGIN { printf "%.2f", (x - y) / n }')"
  record "$1_fl_per_w" "$(awk -v x="${a[4]}" -v y="${b[4]}" -v n="$4" 'BEGIN { printf "%.4f", (x - y) / n }')"
}
hwm_mib() { awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

# start_qemu FORMAT FILE CACHE SOCKET: qemu-nbd on FILE, sets srv and, with cache=none,
# qemu_aio (io_uring, else native); fails when it cannot start
qemu_aio=-
start_qemu() {
  local fmt=$1 file=$2 cache=$3 sock=$4 aio
  local modes=(io_uring native)
  [ "$cache" = none ] || modes=(threads)
  for aio in "${modes[@]}"; do
    rm -f "$sock"
    qemu-nbd --persistent --socket="$sock" -f "$fmt" --cache="$cache" --aio="$aio" \
      "$file" 2>>"$work/qemu.log" & srv=$!
    pids+=("$srv")
    if wait_sock "$sock" "$srv"; then
      sleep 0.2   # the socket exists once bound, perhaps before it listens
      if [ "$cache" = none ]; then qemu_aio=$aio; fi
      return 0
    fi
    stop "$srv"
  done
  log "bench: qemu-nbd did not start: $(tail -n 2 "$work/qemu.log" | tr '\n' ' ')"
  return 1
}

# ms_per CMD...: wall time of CMD in ms, divided by $per (process start included)
per=20
# A command that fails is not timed: its figure is "-" (and its row shows -), and it is logged.
ms_per() {
  local t0 t1
  t0=$(date +%s%N)
  if ! "$@"; then
    log "bench: '$*' failed: its figure shows -"
    printf -
    return 0
  fi
  t1=$(date +%s%N)
  awk -v a="$t0" -v b="$t1" -v n="$per" 'BEGIN { printf "%.2f", (b - a) / n / 1e6 }'
}
creates() { local i; for i in $(seq "$per"); do "$SNAPCTL" -q create "$1-$i" || return 1; done; }
deletes() { local i; for i in $(seq "$per"); do "$SNAPCTL" -q delete "$1-$i" || return 1; done; }
lists() { local i; for i in $(seq "$per"); do "$SNAPCTL" list >/dev/null || return 1; done; }

# fill FROM TO PREFIX: one `snapctl create` each until the store holds TO; records the rate
# overall and logs it for each fifth of the way (the cost of a create may grow with the count)
fill() {
  local from=$1 to=$2 step t0 t1 ts i
  [ "$to" -gt "$from" ] || return 0
  step=$(( (to - from + 4) / 5 ))
  t0=$(date +%s%N); ts=$t0
  for ((i = from; i < to; i++)); do
    "$SNAPCTL" -q create "$3-$i"
    if [ $(( (i + 1 - from) % step )) = 0 ] || [ $((i + 1)) = "$to" ]; then
      t1=$(date +%s%N)
      log "  $((i + 1)) snapshots: $(awk -v a="$ts" -v b="$t1" -v n="$(( (i - from) % step + 1 ))" 'BEGIN { printf "%.1f", (b - a) / n / 1e6 }') ms per create"
      ts=$t1
    fi
  done
  record "$3.fill_per_s" "$(awk -v a="$t0" -v b="$t1" -v n="$((to - from))" 'BEGIN { printf "%.1f", n / ((b - a) / 1e9) }')"
}
# got KEY: the last figure recorded under KEY
got() { awk -F '\t' -v k="$1" '$1 == k { x = $2 } END { print x }' "$results"; }
snap_count() { "$SNAPCTL" --json info | python3 -c 'import json,sys; print(json.load(sys.stdin)["store"]["snapshot_count"])'; }

log "bench: ${SIZE_MB} MiB volume, ${REGION_MB} MiB regions, ${RUNTIME} s timed runs, $MANY snapshots, $LIST listed, $EXC saved chunks"
head -c "${SIZE_MB}M" /dev/urandom > "$work/base.img"

# ---- 1. the data path: snapctl serve, qemu-nbd on the qcow2 (cache=none, and writeback as a
#         raw figure), qemu-nbd on the raw file and the raw file itself, all at once. Runs
#         alternate between them (the order reversed or rotated each round), so drift on a shared
#         machine falls on both sides of every ratio; a figure measured in parts is combined as
#         total work over total time.
log "bench: data path: snapctl serve, qemu-nbd (qcow2, raw), raw file; $ROUNDS rounds of ${RUNTIME} s timed runs"
declare -A ENG=()   # target -> its fio engine arguments (none: the target is missing)
cp "$work/base.img" "$work/origin.img"
truncate -s "$((SIZE_MB * 2))M" "$work/store.img"
"$SNAPCTL" -q init "$work/store.img" --origin "$work/origin.img" --force
start_snapctl "$work/store.img" "$work/snapctl.sock"
srv_snap=$srv
# its bound once the data path has run: memory at start, the metadata cache, the writeback
# queue with the stage in front of it (16 MiB, a settle's 8 MiB and the batch that crossed
# it, at most 32 MiB; src/store/writeback.rs) and 16 MiB of buffers
record snap.bound_mib "$(awk -v a="$(hwm_mib "$srv_snap")" -v c="$(sed -n 's/.*metadata cache \([0-9.]*\) MiB.*/\1/p' "$work/snapctl.sock.log")" 'BEGIN { printf "%.1f", a + c + 64 + 16 }')"
sock="$work/snapctl.sock"
ENG[snap]="--ioengine=nbd --uri=nbd+unix:///origin?socket=$sock"
record snap.engine "$(sed -n 's/.*I\/O engine \([^;]*\).*/\1/p' "$sock.log")"
# the same with 64 KiB chunks, qcow2's cluster size: for first writes only
cp "$work/base.img" "$work/origin64.img"
truncate -s "$((SIZE_MB * 2))M" "$work/store64.img"
"$SNAPCTL" -q init "$work/store64.img" --origin "$work/origin64.img" --force --chunk-size 64K
start_snapctl "$work/store64.img" "$work/snap64.sock"
srv_snap64=$srv
ENG[snap64]="--ioengine=nbd --uri=nbd+unix:///origin?socket=$work/snap64.sock"
export SNAPCTL_STORE="$work/store.img"
if have qemu-img && have qemu-nbd; then
  for t in qcow:none qcow_wb:writeback; do
    qemu-img convert -O qcow2 -o cluster_size=64k "$work/base.img" "$work/${t%%:*}.qcow2"
    qemu-img snapshot -c bench "$work/${t%%:*}.qcow2"
    if start_qemu qcow2 "$work/${t%%:*}.qcow2" "${t#*:}" "$work/${t%%:*}.sock"; then
      ENG[${t%%:*}]="--ioengine=nbd --uri=nbd+unix:///?socket=$work/${t%%:*}.sock"
    fi
  done
  cp "$work/base.img" "$work/qraw.img"
  if start_qemu raw "$work/qraw.img" none "$work/qraw.sock"; then
    ENG[qraw]="--ioengine=nbd --uri=nbd+unix:///?socket=$work/qraw.sock"
  fi
fi
cp "$work/base.img" "$work/raw.img"
ENG[raw]="--ioengine=io_uring --direct=1 --filename=$work/raw.img"
record qemu.aio "$qemu_aio"
# The copies just made are dirty in the page cache (several GiB): written back under the first
# runs, they would slow whichever target ran then (an O_DIRECT read of a dirty range waits for it).
sync

# on TARGET KEY FIO-ARGS...: a run against TARGET recorded as TARGET.KEY; nothing if it is missing
on() {
  local t=$1 key=$2; shift 2
  local -a eng
  if [ -z "${ENG[$t]:-}" ]; then return 0; fi
  read -ra eng <<< "${ENG[$t]}"
  fio_run "$t.$key" "${eng[@]}" "$@"
}
# in_order ROUND ITEMS...: the items, reversed in even rounds
in_order() {
  local r=$1; shift
  if [ $((r % 2)) = 1 ]; then printf '%s\n' "$@"; else printf '%s\n' "$@" | tac; fi
}

# 1 MiB sequential writes before any snapshot: snapctl against qemu-nbd raw
for r in $(seq "$ROUNDS"); do
  for t in $(in_order "$r" snap qraw); do
    key=seq_nosnap; [ "$t" = snap ] || key=seq
    # shellcheck disable=SC2046
    on "$t" "$key" "${SEQ[@]}" $(region "$C_K") "${TIMED[@]}"
  done
done
# the snapshot, then first writes over A by quarters, the order rotated quarter by quarter;
# each part's device I/O counted (dev_io), and the page cache written back after each part (the
# writeback target's dirty pages would otherwise land in the next part's time and counts)
"$SNAPCTL" -q create bench
SNAPCTL_STORE="$work/store64.img" "$SNAPCTL" -q create bench
targets=(snap snap64 qcow qraw qcow_wb)
q_k=$((R_K / 4))
sync
for i in 0 1 2 3; do
  for j in 0 1 2 3 4; do
    t=${targets[$(((i + j) % 5))]}
    [ -n "${ENG[$t]:-}" ] || continue
    before=$(dev_io)
    on "$t" first --rw=randwrite "${RAND[@]}" --offset="$((A_K + i * q_k))k" --size="${q_k}k"
    io_per_write "$t.first" "$before" "$(dev_io)" "$((q_k / 4))"
    sync
  done
done
stop "$srv_snap64"
rm -f "$work/origin64.img" "$work/store64.img"
# overwrites and reads of A: snapctl against the raw file, and 4 connections against one
for r in $(seq "$ROUNDS"); do
  for run in $(in_order "$r" snap:overwrite raw:overwrite qraw:overwrite snap:randread raw:randread qraw:randread snap:read4 snap:overwrite4 raw:overwrite4 raw:mixed); do
    case ${run#*:} in
      overwrite) args=(--rw=randwrite) ;;
      # a first write's two origin I/Os (read the old bytes, write the new) as the device
      # does them at best, at a queue as deep as snapctl's settles make it (after RAND's):
      # the write side's IOPS of a 50/50 mix is pairs per second
      mixed) args=(--rw=randrw --rwmixread=50) ;;
      randread) args=(--rw=randread) ;;
      read4) args=(--rw=randread --numjobs=4) ;;
      overwrite4) args=(--rw=randwrite --numjobs=4) ;;
    esac
    # each of 4 jobs its own connection and its own quarter of A
    case ${run#*:} in
      *4) args+=(--offset="${A_K}k" --size="${q_k}k" --offset_increment="${q_k}k") ;;
      *) args+=(--offset="${A_K}k" --size="${R_K}k") ;;
    esac
    deep=(); [ "${run#*:}" = mixed ] && deep=(--iodepth=256)
    on "${run%%:*}" "${run#*:}" "${args[@]}" "${RAND[@]}" "${TIMED[@]}" "${deep[@]}"
  done
done
# 1 MiB sequential writes over C after the snapshot: one pass (each write a first write)
# shellcheck disable=SC2046
before=$(dev_io)
on snap seq_snap "${SEQ[@]}" $(region "$C_K")
io_per_write snap.seq_snap "$before" "$(dev_io)" "$R_K"   # per KiB the client wrote
record snap.hwm_mib "$(hwm_mib "$srv_snap")"
for p in "${pids[@]}"; do stop "$p"; done
"$SNAPCTL" -q check || log "bench: snapctl check failed on the benchmarked store (exit $?)"
rm -f "$work"/origin.img "$work"/store.img "$work"/*.qcow2 "$work"/qraw.img "$work"/raw.img

# ---- 2. create latency: 256 GiB sparse origin against 256 MiB (same store size), no server;
#         4 batches of 5 creates, alternating, so drift falls on both alike
log "bench: create on a 256 GiB and a 256 MiB origin"
declare -A ORIGIN_SIZE=([small]=256M [big]=256G)
for name in small big; do
  truncate -s "${ORIGIN_SIZE[$name]}" "$work/$name.img"
  truncate -s 1G "$work/$name.store"
  export SNAPCTL_STORE="$work/$name.store"
  "$SNAPCTL" -q init --origin "$work/$name.img" --force
  "$SNAPCTL" -q create warm-up
done
for b in 1 2 3 4; do
  order="small big"; [ $((b % 2)) = 1 ] || order="big small"
  for name in $order; do
    export SNAPCTL_STORE="$work/$name.store"
    record "create.${name}_ms" "$(per=5 ms_per creates "c$b")"
  done
done
log "  per create: $(got create.small_ms) ms (256 MiB), $(got create.big_ms) ms (256 GiB), last batch"
rm -f "$work"/small.* "$work"/big.*

# ---- 3. first write at 1 and at MANY snapshots: two stores served at once, A written by
#         quarters alternately in each. Then list, create and delete with no server on that
#         store at LIST snapshots, in batches alternating with a store of 0 snapshots.
log "bench: first write at 1 and $MANY snapshots; list, create, delete at 0 and $LIST snapshots"
for s in one many; do
  cp "$work/base.img" "$work/origin-$s.img"
  truncate -s "$((SIZE_MB * 2))M" "$work/store-$s.img"
  "$SNAPCTL" -q init "$work/store-$s.img" --origin "$work/origin-$s.img" --force
done
start_snapctl "$work/store-many.img" "$work/many.sock"
srv_many=$srv
fill 0 "$MANY" many
have_n=$(snap_count)
[ "$have_n" = "$MANY" ] || log "bench: the store holds $have_n snapshots, not $MANY"
export SNAPCTL_STORE="$work/store-one.img"
"$SNAPCTL" -q create one
start_snapctl "$work/store-one.img" "$work/one.sock"
srv_one=$srv
for i in 0 1 2 3; do
  for s in $(in_order $((i + 1)) one many); do
    key=many.first1; [ "$s" = one ] || key=many.firstn
    fio_run "$key" --ioengine=nbd --uri="nbd+unix:///origin?socket=$work/$s.sock" --rw=randwrite \
      "${RAND[@]}" --offset="$((A_K + i * q_k))k" --size="${q_k}k"
  done
done
stop "$srv_one"
rm -f "$work/origin-one.img" "$work/store-one.img"
export SNAPCTL_STORE="$work/store-many.img"
fill "$MANY" "$LIST" list
record list.listn_served_s "$(per=3 ms_per lists | awk '$1 == "-" { print "-"; next } { printf "%.4f", $1 / 1000 }')"
stop "$srv_many"
record list.count "$(snap_count)"
# the store of 0 snapshots: the same sizes, a sparse origin
truncate -s "${SIZE_MB}M" "$work/origin-zero.img"
truncate -s "$((SIZE_MB * 2))M" "$work/store-zero.img"
"$SNAPCTL" -q init "$work/store-zero.img" --origin "$work/origin-zero.img" --force
declare -A LSTORE=([0]="$work/store-zero.img" [n]="$work/store-many.img")
for b in 1 2 3 4; do
  for t in $(in_order "$b" 0 n); do
    export SNAPCTL_STORE=${LSTORE[$t]}
    record "list.list${t}_s" "$(per=1 ms_per lists | awk '$1 == "-" { print "-"; next } { printf "%.4f", $1 / 1000 }')"
    record "list.create${t}_ms" "$(per=5 ms_per creates "b$b")"
  done
  for t in $(in_order "$b" n 0); do
    export SNAPCTL_STORE=${LSTORE[$t]}
    record "list.delete${t}_ms" "$(per=5 ms_per deletes "b$b")"
  done
done
log "  no server: at 0 snapshots create $(got list.create0_ms) ms, delete $(got list.delete0_ms) ms; at $LIST list $(got list.listn_s) s, create $(got list.createn_ms) ms, delete $(got list.deleten_ms) ms (last batch)"
rm -f "$work"/origin-many.img "$work"/store-many.img "$work"/origin-zero.img "$work"/store-zero.img

# ---- 4. server memory with EXC saved chunks, after a random read pass over them
log "bench: server memory with $EXC saved 4 KiB chunks"
bytes=$((EXC * 4096))
truncate -s "$bytes" "$work/origin.img"
truncate -s "$((bytes + bytes / 8 + (64 << 20)))" "$work/store.img"
export SNAPCTL_STORE="$work/store.img"
"$SNAPCTL" -q init --origin "$work/origin.img" --force --chunk-size 4K
"$SNAPCTL" -q create saved
t0=$(date +%s%N)
head -c "$bytes" /dev/zero | "$SNAPCTL" -q write
t1=$(date +%s%N)
record rss.write_s "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')"
record rss.saved_chunks "$("$SNAPCTL" --json info | python3 -c 'import json,sys; s = json.load(sys.stdin)["store"]; print(s["used_bytes"] // s["chunk_size"])')"
start_snapctl "$work/store.img" "$work/snapctl.sock"
record rss.idle_mib "$(hwm_mib "$srv")"
# the bound: its memory at start, its metadata cache (serve --cache, as its first line says),
# and 16 MiB for a connection's buffers and a batch in flight
cache_mib=$(sed -n 's/.*metadata cache \([0-9.]*\) MiB.*/\1/p' "$work/snapctl.sock.log")
record rss.cache_mib "${cache_mib:-0}"
record rss.bound_mib "$(awk -v a="$(hwm_mib "$srv")" -v c="${cache_mib:-0}" 'BEGIN { printf "%.1f", a + c + 16 }')"
fio_run rss.read --ioengine=nbd --uri="nbd+unix:///saved?socket=$sock" --rw=randread "${RAND[@]}" --offset=0 --size="$((bytes / 1024))k"
record rss.hwm_mib "$(hwm_mib "$srv")"
record rss.rss_mib "$(rss_mib "$srv")"
stop "$srv"
rm -f "$work/origin.img" "$work/store.img"

# ---- 5. where a first write's time goes: a server of its own with SNAPCTL_PROFILE=1 (phase
# timers, src/profile.rs), one first-write pass over A after a snapshot, and the table it prints
# when it stops (per call and per request: the connection's gather, stage and reply; the
# preserver's settles with preserve's phases inside; then the writeback worker's rounds, which
# flush the store and write the queued origin data behind them)
log "bench: profile of a first-write pass"
cp "$work/base.img" "$work/origin.img"
truncate -s "$((SIZE_MB * 2))M" "$work/store.img"
"$SNAPCTL" -q init "$work/store.img" --origin "$work/origin.img" --force
"$SNAPCTL" -q create profiled
sync # the origin's copy, written back under the profiled pass, would slow its reads
SNAPCTL_PROFILE=1 start_snapctl "$work/store.img" "$work/profile.sock"
fio_run profile.first --ioengine=nbd --uri="nbd+unix:///origin?socket=$work/profile.sock" --rw=randwrite "${RAND[@]}" --offset="${A_K}k" --size="${R_K}k"
stop "$srv"
sed -n '/^profile:/,$p' "$work/profile.sock.log" | grep -v '^snapctl serve:' > "$work/profile.txt"
rm -f "$work/origin.img" "$work/store.img"
record total_s "$(($(date +%s) - t_start))"

# ---- the table
python3 - "$results" "$MANY" "$LIST" "$EXC" "$SIZE_MB" "$REGION_MB" "$RUNTIME" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t", 1) for l in open(sys.argv[1]) if "\t" in l]
many, nlist, exc, size, region, runtime = sys.argv[2:8]
seen = {}
for k, x in rows:
    try:
        seen.setdefault(k, []).append(float(x))
    except ValueError:
        seen[k] = x
# A figure measured in parts: rates over equal work are combined as the total work over the
# total time (the harmonic mean); times per command (batches of 5) as the median batch, since
# one fsync stall of this shared disk would otherwise decide the figure.
v = {}
for k, xs in seen.items():
    if isinstance(xs, str) or len(xs) == 1:
        v[k] = xs if isinstance(xs, str) else xs[0]
    elif k.endswith("_per_w"):
        v[k] = statistics.mean(xs)
    elif k.endswith("_iops") or k.endswith("_mbps"):
        v[k] = len(xs) / sum(1 / x for x in xs) if all(x > 0 for x in xs) else 0.0
    else:
        v[k] = statistics.median(xs)

def fmt(k):
    x = v.get(k)
    if not isinstance(x, float):
        return "-"
    for suffix, f in [("_iops", "{:.0f} IOPS"), ("_mbps", "{:.0f} MiB/s"), ("_ms", "{:.1f} ms"),
                      ("_per_s", "{:.0f}/s"), ("_s", "{:.3f} s"), ("_mib", "{:.1f} MiB")]:
        if k.endswith(suffix):
            return f.format(x)
    return f"{x:.0f}"

aio = v.get("qemu.aio", "-")
table = [
    ("first write after a snapshot", "snap.first_iops", "qcow.first_iops", "qcow2 64K", ">=", 2.0),
    ("first write after a snapshot", "snap.first_iops", "qraw.first_iops", "qemu-nbd raw", ">=", 0.8),
    ("  the same, against the device", "snap.first_iops", "raw.mixed_iops", "read+write pairs", None, None),
    ("  the same, 64 KiB chunks", "snap64.first_iops", "qcow.first_iops", "qcow2 64K", None, None),
    ("  the same, 64 KiB chunks", "snap64.first_iops", "qraw.first_iops", "qemu-nbd raw", None, None),
    ("overwrite", "snap.overwrite_iops", "raw.overwrite_iops", "raw file", ">=", 0.6),
    ("  the same, against qemu-nbd", "snap.overwrite_iops", "qraw.overwrite_iops", "qemu-nbd raw", None, None),
    ("random read", "snap.randread_iops", "raw.randread_iops", "raw file", ">=", 0.6),
    ("  the same, against qemu-nbd", "snap.randread_iops", "qraw.randread_iops", "qemu-nbd raw", None, None),
    ("1 MiB seq write after a snapshot", "snap.seq_snap_mbps", "qraw.seq_mbps", "qemu-nbd raw", ">=", 1.0),
    ("1 MiB seq write, no snapshot", "snap.seq_nosnap_mbps", "qraw.seq_mbps", "qemu-nbd raw", ">=", 1.0),
    ("random read, 4 connections", "snap.read4_iops", "snap.randread_iops", "1 conn", ">=", 1.3),
    ("overwrite, 4 connections", "snap.overwrite4_iops", "snap.overwrite_iops", "1 conn", ">=", 1.3),
    ("  the raw file itself, 4 jobs", "raw.overwrite4_iops", "raw.overwrite_iops", "raw 1 job", None, None),
    ("  the same, against the raw file", "snap.overwrite4_iops", "raw.overwrite4_iops", "raw 4 jobs", None, None),
    ("create, 256 GiB origin", "create.big_ms", "create.small_ms", "256 MiB", "<=", 1.2),
    (f"first write at {many} snapshots", "many.firstn_iops", "many.first1_iops", "1 snapshot", ">=", 0.95),
    (f"list, {nlist} snapshots", "list.listn_s", None, None, "<=", "1 s"),
    (f"create at {nlist} snapshots", "list.createn_ms", "list.create0_ms", "0 snapshots", "<=", 2.0),
    (f"delete at {nlist} snapshots", "list.deleten_ms", "list.delete0_ms", "0 snapshots", "<=", 2.0),
    ("server RSS after the data path", "snap.hwm_mib", "snap.bound_mib", "start+cache+80M", "<=", 1.0),
    (f"server RSS, {int(v.get('rss.saved_chunks', 0)):,} saved chunks", "rss.hwm_mib", "rss.bound_mib", "start+cache+16M", "<=", 1.0),
]
w = (38, 13, 30, 8, 9)
print()
print(f"{'workload':<{w[0]}}{'snapctl':<{w[1]}}{'baseline (what)':<{w[2]}}{'ratio':<{w[3]}}{'target':<{w[4]}}")
for label, a, b, what, op, target in table:
    ratio, verdict = "-", "-"
    base = f"{fmt(b)} ({what})" if b else "-"
    x = v.get(a)
    if isinstance(x, float):
        if target == "1 s":
            verdict = "ok" if x <= 1.0 else "MISSED"
        elif b and isinstance(v.get(b), float) and v[b] > 0:
            r = x / v[b]
            ratio = f"{r:.2f}x"
            if op:
                verdict = "ok" if (r >= target if op == ">=" else r <= target) else "MISSED"
    tgt = f"{op} {target}" if op else "-"
    print(f"{label:<{w[0]}}{fmt(a):<{w[1]}}{base:<{w[2]}}{ratio:<{w[3]}}{tgt:<{w[4]}} {verdict if op else ''}".rstrip())
print(f"(4 KiB random at queue depth 32; {size} MiB volume, {region} MiB regions; timed runs {runtime} s;"
      f" qemu-nbd --cache=none --aio={aio}; snapctl serve I/O engine {v.get('snap.engine', '?')};"
      " create/delete/list: per command, median of 4 batches of 5, no server, process start included)")

raw = [
    ("snapctl serve", [
        ("snap.seq_nosnap_mbps", "1 MiB seq write, region C, no snapshot"),
        ("snap.first_iops", "first write after a snapshot, region A"),
        ("snap64.first_iops", "the same on a store of 64 KiB chunks"),
        ("snap.overwrite_iops", "overwrite, region A"),
        ("snap.randread_iops", "random read, region A"),
        ("snap.read4_iops", "random read, region A, 4 connections"),
        ("snap.overwrite4_iops", "overwrite, region A, 4 connections"),
        ("snap.seq_snap_mbps", "1 MiB seq write, region C, after the snapshot"),
        ("snap.hwm_mib", "server VmHWM after these runs"),
    ]),
    ("qemu-nbd", [
        ("qcow.first_iops", "qcow2 64K, internal snapshot, cache=none: first write, region A"),
        ("qcow_wb.first_iops", "qcow2 64K, internal snapshot, cache=writeback: first write, region A"),
        ("qraw.first_iops", "raw, cache=none: random write, region A"),
        ("qraw.seq_mbps", "raw, cache=none: 1 MiB seq write, region C"),
        ("qraw.overwrite_iops", "raw, cache=none: random write, region A again"),
        ("qraw.randread_iops", "raw, cache=none: random read, region A"),
    ]),
    ("raw file, fio io_uring --direct=1", [
        ("raw.overwrite_iops", "random write, region A"),
        ("raw.randread_iops", "random read, region A"),
        ("raw.overwrite4_iops", "random write, region A, 4 jobs"),
        ("raw.mixed_iops", "random read and write 50/50, region A: pairs per second"),
    ]),
    ("create latency (no server; the median of 4 alternating batches of 5)", [
        ("create.small_ms", "256 MiB sparse origin"),
        ("create.big_ms", "256 GiB sparse origin"),
    ]),
    ("snapshot counts (one store)", [
        ("many.first1_iops", "first write, region A by quarters, 1 snapshot"),
        ("many.firstn_iops", f"first write, region A by quarters, {many} snapshots"),
        ("many.fill_per_s", f"creates through the server, 0 -> {many}"),
        ("list.fill_per_s", f"creates through the server, {many} -> {nlist}"),
        ("list.list0_s", "list, 0 snapshots"),
        ("list.listn_s", f"list, {int(v.get('list.count', 0))} snapshots"),
        ("list.listn_served_s", f"list through the server, {nlist} snapshots"),
        ("list.create0_ms", "create, 0 snapshots"),
        ("list.createn_ms", f"create, {nlist} snapshots"),
        ("list.delete0_ms", "delete, 0 snapshots"),
        ("list.deleten_ms", f"delete, {nlist} snapshots"),
    ]),
    ("server memory", [
        ("rss.saved_chunks", "saved 4 KiB chunks"),
        ("rss.write_s", "time to save them (head -c | snapctl write)"),
        ("rss.idle_mib", "VmHWM at start"),
        ("rss.cache_mib", "serve --cache (the default)"),
        ("rss.read_iops", "random read pass over the saved chunks (snapshot export)"),
        ("rss.hwm_mib", "VmHWM after the read pass"),
        ("rss.rss_mib", "VmRSS after the read pass"),
    ]),
]
# What the device did per client write in the first-write passes: the cost a chunk size and a
# format impose, whatever the disk's speed at the moment.
io_rows = [("snap", "snapctl, 4 KiB chunks"), ("snap64", "snapctl, 64 KiB chunks"),
           ("qcow", "qcow2 64K, cache=none"), ("qcow_wb", "qcow2 64K, cache=writeback"),
           ("qraw", "qemu-nbd raw, cache=none")]
if any(isinstance(v.get(f"{t}.first_rd_per_w"), float) for t, _ in io_rows):
    print("\ndevice I/O per 4 KiB client write in the first-write passes (the disk's own counters)")
    print(f"  {'':<30}{'reads':>8}{'KiB read':>10}{'writes':>8}{'KiB written':>13}{'flushes':>9}")
    for t, label in io_rows:
        ks = [f"{t}.first_{x}_per_w" for x in ("rd", "rkib", "wr", "wkib", "fl")]
        if not all(isinstance(v.get(k), float) for k in ks):
            continue
        rd, rkib, wr, wkib, fl = (v[k] for k in ks)
        print(f"  {label:<30}{rd:>8.2f}{rkib:>10.1f}{wr:>8.2f}{wkib:>13.1f}{fl:>9.3f}")
    ks = ("snap.seq_snap_rkib_per_w", "snap.seq_snap_wkib_per_w")
    if all(isinstance(v.get(k), float) for k in ks):
        print(f"  1 MiB sequential writes after the snapshot: per KiB the client wrote, the device read"
              f" {v[ks[0]]:.2f} KiB and wrote {v[ks[1]]:.2f} KiB (qemu-nbd raw: 0 and 1)")

print("\nraw figures (in brackets: each part, in the order measured)")
for group, items in raw:
    print(f"  {group}")
    for k, label in items:
        parts = seen.get(k)
        each = ""
        if isinstance(parts, list) and len(parts) > 1:
            each = "  (" + ", ".join(f"{x:.0f}" if x >= 100 else f"{x:.3g}" for x in parts) + ")"
        print(f"    {label:<70}{fmt(k):>14}{each}")
if isinstance(v.get("total_s"), float):
    print(f"  whole run: {int(v['total_s']) // 60} min {int(v['total_s']) % 60} s")
EOF
if [ -s "$work/profile.txt" ]; then
  printf '\nwhere a first write goes (SNAPCTL_PROFILE=1, one first-write pass over A: %s IOPS)\n' \
    "$(awk -F'\t' '$1 == "profile.first_iops" { print $2 }' "$results")"
  sed 's/^/  /' "$work/profile.txt"
fi
