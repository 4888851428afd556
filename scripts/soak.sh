#!/usr/bin/env bash
# Soak test: SIGKILLs `snapctl serve` again and again in the middle of fio writes and snapshot
# churn, and proves after every kill that no acknowledged data was lost and that no snapshot
# changed. The multi-round version of tests/nbd.rs's
# after_kill_9_flushed_writes_and_every_snapshot_survive.
#
#   scripts/soak.sh                                              # 20 kills, 5 s rounds, 256 MiB
#   scripts/soak.sh --kills 3 --seconds-per-round 2 --size 64    # a quick slice (10 s + build)
#
# Setup: a sparse origin file of --size MiB, a store file formatted for it (--chunk-size,
# default 16K so that 4 KiB writes copy part of a chunk; on-full fail-writes, so that a full
# store is an error, not a silently dropped snapshot) and one `snapctl serve` on a unix socket.
# Each round, concurrently:
#   - a writer runs fio (--ioengine=nbd) again and again, each run one *generation*: every block
#     of a random range [offset, offset + length) written once, in random order, with a random
#     block size (512 B to 1 MiB), a flush every few dozen writes and one at the end
#     (--end_fsync), and a pattern naming the generation and the write's offset
#     (--verify_pattern='"SK000042"%o'), which fio also reads back as it goes (--verify_backlog)
#     and at the end. A run that exits 0 had every write acknowledged and then flushed: durable;
#     the run under way at the kill is in doubt: each of its sectors may hold the old or the new
#     bytes.
#   - churn through the CLI (carried to the server over its control socket): create snapshots
#     (some --from another snapshot), delete some, and now and then restore one (the writer
#     pauses between two runs for that: restore refuses while the origin is open). Right after a
#     create, the snapshot is read over NBD (nbdcopy), hashed, and decoded sector by sector:
#     every sector must hold what the origin held when the create began, or a generation that
#     was running during the create (a --from snapshot: exactly its source).
#   - after a random 40-100 % of --seconds-per-round, `kill -9` of the server.
# Every other round the first command after the kill is a `snapctl delete` of an older snapshot
# with no server (its open replays the copy journal with the catalog read on demand).
# Then `snapctl check` (no server: it opens the crashed store itself) must exit 0 (clean) or 9
# (leaks only), the server is started again, and everything is verified through it:
#   - the origin (nbdcopy): each sector holds exactly the generation the model says was durable,
#     or, for the generation in doubt, the old or the new one; garbage is never allowed. What it
#     holds then becomes the model for the next round.
#   - every snapshot whose create was acknowledged (and whose delete was not) exists, and reads
#     back (`snapctl export`) with the SHA-256 recorded when it was created; one whose create or
#     delete was cut by the kill may exist or not, and if it does it is checked like a new one.
#     Any other snapshot is a failure.
# A kill -9 is a process crash: the kernel keeps what the server wrote, so in practice even
# unflushed acknowledged writes survive; only flushed ones are required to (power loss is what
# tests/explore.rs models). A journal of every step (journal-ROUND.log) is what the model is replayed from; the decoder
# and model are the Python program below. After the last round the server stops with SIGTERM
# and `snapctl check --data` must exit 0 or 9. Prints one line per round and at the end:
#   soak: 20 kills survived, 5.1 GiB verified, 0 mismatches, 37 snapshots checked, 412 s
# ("verified": every byte compared with the model: views read after kills and at creation;
# "snapshots checked": distinct snapshots whose contents were verified). Exits 1 on the first
# failure, with its round, view, offset, expected and actual generation; the work directory is
# then kept for inspection (always with --keep). SOAK_BIN=PATH uses that snapctl, no build.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: scripts/soak.sh [--kills N] [--seconds-per-round S] [--size MiB] [--chunk-size K] [--keep]" >&2
  exit 2
}
kills=20 secs=5 size_mb=256 chunk=16K keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --kills) kills=${2:-}; shift 2 || usage ;;
    --seconds-per-round) secs=${2:-}; shift 2 || usage ;;
    --size) size_mb=${2:-}; shift 2 || usage ;;
    --chunk-size) chunk=${2:-}; shift 2 || usage ;;
    --keep) keep=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) usage ;;
  esac
done
[[ $kills =~ ^[1-9][0-9]*$ && $secs =~ ^[1-9][0-9]*$ && $size_mb =~ ^[1-9][0-9]*$ ]] || usage
[ "$size_mb" -ge 16 ] || { echo "soak: --size must be at least 16 (MiB)" >&2; exit 2; }
for t in fio nbdcopy python3; do
  command -v "$t" >/dev/null || { echo "soak: $t is needed (scripts/setup.sh installs it)" >&2; exit 1; }
done
if [ -n "${SOAK_BIN:-}" ]; then
  SNAPCTL=$SOAK_BIN
else
  cargo build --release --locked --quiet
  SNAPCTL="$PWD/target/release/snapctl"
fi

t_start=$(date +%s)
work=$(mktemp -d /tmp/snapctl-soak.XXXXXX)
srv= round=0
cleanup() {
  local rc=$?
  # the writer and the churn stop between two steps; fio and nbdcopy fail once the server is
  # gone, which is no failure (killed)
  touch "$work/killed" "$work/stop"
  if [ -n "$srv" ]; then kill -9 "$srv" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  if [ "$keep" = 1 ] || [ -e "$work/failure" ]; then
    echo "soak: work directory kept: $work" >&2
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

size=$((size_mb << 20))
max_live=4                  # snapshots kept at once (restore backups included)
sock="$work/nbd.sock"
uri="nbd+unix:///origin?socket=$sock"
export SNAPCTL SNAPCTL_STORE="$work/store.img" SNAPCTL_RUN_DIR="$work/run"
export SOAK_WORK=$work SOAK_SIZE=$size SOAK_SOCK=$sock
unset SNAPCTL_IO_ENGINE   # the default engine: io_uring with O_DIRECT where the kernel allows

log() { printf '%s\n' "$*" >&2; }
# fail MESSAGE: records the first failure (the main loop reports it) and stops the round
fail() {
  [ -e "$work/failure" ] || printf 'round %s: %s\n' "$round" "$*" > "$work/failure"
  touch "$work/stop"
}
# jot WORDS...: one journal line, after the time (O_APPEND, one write: lines never interleave)
jot() { printf '%s %s\n' "$EPOCHREALTIME" "$*" >> "$work/journal.log"; }
rnd() { echo $(((RANDOM << 15 | RANDOM) % $1)); }     # 0 <= n < $1, up to 2^30
stat_add() { printf '%s\n' "$*" >> "$work/stats"; }

# start_server: serves the store (log in serve.log); returns once it listens (it says
# "serving" after binding both its NBD and its control socket)
start_server() {
  local lines
  lines=$(wc -l < "$work/serve.log")
  "$SNAPCTL" serve --socket "$sock" 2>>"$work/serve.log" & srv=$!
  for _ in $(seq 400); do
    tail -n "+$((lines + 1))" "$work/serve.log" | grep -q '^snapctl serve: serving' && return 0
    kill -0 "$srv" 2>/dev/null || break
    sleep 0.05
  done
  log "soak: snapctl serve did not start:"; tail -n 5 "$work/serve.log" >&2
  fail "snapctl serve did not start"; exit 1
}

# writer: fio runs, one generation each, until told to stop; between runs it honours a pause
# (pause -> it answers with paused, and starts nothing until pause is gone)
writer() {
  local g o r bs n rc
  g=$(cat "$work/gen")
  while [ ! -e "$work/stop" ]; do
    if [ -e "$work/pause" ]; then touch "$work/paused"; sleep 0.02; continue; fi
    g=$((g + 1)); echo "$g" > "$work/gen"
    case $((RANDOM % 10)) in
      0) bs=512 ;; 1 | 2 | 3 | 4) bs=4096 ;; 5 | 6) bs=16384 ;; 7 | 8) bs=65536 ;; *) bs=1048576 ;;
    esac
    # short runs, so that most writes are in a run that completes before the kill: up to 2 MiB
    # (256 KiB of 512-byte writes, 4 MiB of 1 MiB writes), at most an eighth of the origin
    case $bs in 512) n=512 ;; 1048576) n=4 ;; *) n=$(( (2 << 20) / bs )) ;; esac
    [ $((n * bs)) -le $((size / 8)) ] || n=$((size / 8 / bs))
    r=$(( (1 + $(rnd "$n")) * bs ))
    o=$(( $(rnd $(( (size - r) / bs + 1 )) ) * bs ))
    printf '%s %s %s %s\n' "$g" "$o" "$r" "$bs" >> "$work/gens.tsv"
    jot "start $g"
    rc=0
    fio --name="g$g" --ioengine=nbd --uri="$uri" --rw=randwrite --bs="$bs" --offset="$o" \
      --size="$r" --iodepth=16 --fsync=$((8 + RANDOM % 120)) --end_fsync=1 \
      --verify=pattern --verify_pattern="\"$(printf 'SK%06d' "$g")\"%o" --verify_backlog=64 \
      --verify_fatal=1 --output="$work/fio.out" >/dev/null 2>"$work/fio.err" || rc=$?
    if [ "$rc" = 0 ]; then jot "done $g"; continue; fi
    jot "fail $g $rc"
    cat "$work/fio.err" "$work/fio.out" > "$work/fio-$g.log"
    # fio read back other bytes than it wrote (its verify error is EILSEQ, 84): a mismatch,
    # whether or not the kill came
    if grep -qE 'got pattern|bad pattern|verify failed|err=84' "$work/fio-$g.log"; then
      stat_add mismatch 1
      fail "fio (generation $g over $o..$((o + r)), bs $bs) read back bytes it did not write: $(grep -E -m 3 'got pattern|bad pattern|verify failed' "$work/fio-$g.log" | tr '\n' ' ')"
    elif [ ! -e "$work/killed" ]; then
      fail "fio (generation $g over $o..$((o + r)), bs $bs) failed before the kill (exit $rc): $(grep -m 3 -E 'error|fio:' "$work/fio-$g.log" | tr '\n' ' ')"
    else
      rm -f "$work/fio-$g.log"
    fi
    return 0
  done
}

# ctl ARGS...: a snapctl command of the churn; retried while it says busy (exit 5: an NBD client,
# such as fio between two runs, still has the origin or snapshot open); prints its stdout. A
# failure after the kill stops the churn (returns 1), before it is a soak failure.
ctl() {
  local rc out
  for _ in $(seq 50); do
    rc=0; out=$("$SNAPCTL" "$@" 2>"$work/ctl.err") || rc=$?
    if [ "$rc" = 0 ]; then printf '%s\n' "$out"; return 0; fi
    [ "$rc" = 5 ] && [ ! -e "$work/killed" ] || break
    sleep 0.1
  done
  [ -e "$work/killed" ] || fail "snapctl $* failed before the kill (exit $rc): $(cat "$work/ctl.err")"
  return 1
}

# summed NAME: the at-creation check of snapshot NAME (soak.py snap), journalled with its hash
summed() {
  local sha rc=0
  sha=$(python3 "$work/soak.py" snap "$1" "$round") || rc=$?
  case $rc in
    0) jot "summed $1 $sha"; live+=("$1") ;;
    3) [ -e "$work/killed" ] || fail "reading snapshot '$1' over NBD failed before the kill: $(cat "$work/snap.err" 2>/dev/null)" ;;
    *) touch "$work/stop" ;;   # soak.py recorded the failure
  esac
}

# churn: creates, deletes and restores through the CLI until told to stop; `live` holds
# the snapshots with a recorded hash, oldest first
churn() {
  local i=0 roll name src victim out backup now
  local -a live=()
  mapfile -t live < <(cut -d ' ' -f 1 "$work/snaps.tsv")
  while [ ! -e "$work/stop" ]; do
    sleep "0.$((1 + RANDOM % 4))"
    [ ! -e "$work/stop" ] || break
    roll=$((RANDOM % 10)) i=$((i + 1))
    if [ ${#live[@]} -ge $max_live ] || { [ $roll -ge 7 ] && [ ${#live[@]} -ge 2 ]; }; then
      # delete: the oldest when full, else any
      victim=0; [ ${#live[@]} -ge $max_live ] || victim=$(rnd ${#live[@]})
      name=${live[$victim]}
      jot "delete-begin $name"
      ctl -q delete "$name" >/dev/null || break
      jot "deleted $name"
      live=("${live[@]:0:victim}" "${live[@]:victim+1}")
    elif [ $roll -ge 5 ] && [ ${#live[@]} -ge 1 ] && [ ${#live[@]} -lt $max_live ] &&
        now=$(date +%s) && [ "$now" -gt "$(cat "$work/last-restore")" ]; then
      # restore (its backup's name has a one-second resolution: one restore per second at most)
      echo $((now + 1)) > "$work/last-restore"
      name=${live[$(rnd ${#live[@]})]}
      rm -f "$work/paused"; touch "$work/pause"
      until [ -e "$work/paused" ] || [ -e "$work/stop" ]; do sleep 0.02; done
      if [ -e "$work/stop" ]; then rm -f "$work/pause"; break; fi
      jot "restore-begin $name"
      if [ $((RANDOM % 2)) = 0 ]; then
        out=$(ctl --json restore "$name") || break
      else
        out=$(ctl --json restore --no-backup "$name") || break
      fi
      backup=$(printf '%s' "$out" | python3 -c 'import json, sys; print(json.load(sys.stdin)["backup"] or "")')
      jot "restored $name ${backup:--}"
      rm -f "$work/pause"
      if [ -n "$backup" ]; then summed "$backup"; fi
    else
      # create, one in four from another snapshot (it must then read exactly like it)
      name="s$round-$i" src=
      if [ $((RANDOM % 4)) = 0 ] && [ ${#live[@]} -ge 1 ]; then src=${live[$(rnd ${#live[@]})]}; fi
      jot "create-begin $name $src"
      ctl -q create "$name" ${src:+--from "$src"} >/dev/null || break
      jot "created $name"
      summed "$name"
    fi
  done
}

# ---- the model and verifier (decodes views into generations, replays the journal)
cat > "$work/soak.py" <<'EOF'
"""The model and verifier of scripts/soak.sh.

A view (the origin or a snapshot, SOAK_SIZE bytes) is decoded into one generation per 512-byte
sector: 0 for zeros (never written: the origin starts sparse), g for the bytes fio generation g
wrote there (its pattern: "SK%06d" % g and the little-endian offset of the write, repeated), or
BAD for anything else. The journal of the round (journal.log) is replayed over the model of the
origin at the round's start (model.bin) to know what each view may hold.

  soak.py init             a zero model, no snapshots
  soak.py snap NAME ROUND  right after NAME was created: read it over NBD, check it against the
                           origin as it was when the create began (or its --from source), print
                           its SHA-256, keep its decoded map (maps/NAME)
  soak.py settle ROUND     after a kill and restart: verify the origin and every snapshot, make
                           what the origin holds the model of the next round
Exit 1 on a mismatch (the first is written to SOAK_WORK/failure), 3 when a view could not be
read (the server is gone).
"""
import array, hashlib, json, os, struct, subprocess, sys

W = os.environ["SOAK_WORK"]
SIZE = int(os.environ["SOAK_SIZE"])
SNAPCTL = os.environ["SNAPCTL"]
SOCK = os.environ["SOAK_SOCK"]
SECTOR, BLOCK = 512, 4096
NS = SIZE // SECTOR
BAD = 0xFFFFFFFF
ZB, ZS = bytes(BLOCK), bytes(SECTOR)


def path(*p):
    return os.path.join(W, *p)


GENS = {}  # generation -> (offset, length, block size) of its fio run
if os.path.exists(path("gens.tsv")):
    for line in open(path("gens.tsv")):
        g, o, r, bs = map(int, line.split())
        GENS[g] = (o, r, bs)


def tag(g):
    return b"SK%06d" % g


def gen_of(b8):
    return int(b8[2:]) if b8[:2] == b"SK" and b8[2:].isdigit() else None


def covers(g, x, n=SECTOR):
    o, r, _ = GENS[g]
    return o <= x and x + n <= o + r


def expected(g, x, n):
    """The n bytes generation g wrote at byte x (inside one of its writes)."""
    o, _, bs = GENS[g]
    return (tag(g) + struct.pack("<Q", o + (x - o) // bs * bs)) * (n // 16)


def decode(img):
    m = array.array("I", bytes(4 * NS))
    for x in range(0, SIZE, BLOCK):
        blk = img[x:x + BLOCK]
        if blk == ZB:
            continue
        g, s0 = gen_of(blk[:8]), x // SECTOR
        if g in GENS and GENS[g][2] >= BLOCK and covers(g, x, BLOCK) and blk == expected(g, x, BLOCK):
            m[s0:s0 + 8] = array.array("I", [g]) * 8
            continue
        for i in range(8):  # sectors of several generations (a cut write, 512-byte writes)
            sx, sec = x + i * SECTOR, blk[i * SECTOR:(i + 1) * SECTOR]
            if sec == ZS:
                continue
            g = gen_of(sec[:8])
            ok = g in GENS and covers(g, sx) and sec == expected(g, sx, SECTOR)
            m[s0 + i] = g if ok else BAD
    return m


def describe(g):
    if g == 0:
        return "zeros (generation 0)"
    if g == BAD:
        return "bytes no generation wrote"
    o, r, bs = GENS[g]
    return f"generation {g} (fio run over {o}..{o + r}, bs {bs})"


def load_map(name):
    m = array.array("I")
    with open(path(name), "rb") as f:
        m.fromfile(f, NS)
    return m


def save_map(m, name):
    with open(path(name + ".tmp"), "wb") as f:
        m.tofile(f)
    os.replace(path(name + ".tmp"), path(name))


def stat(*words):
    with open(path("stats"), "a") as f:
        f.write(" ".join(map(str, words)) + "\n")


def record_failure(msg):
    stat("mismatch", 1)
    if not os.path.exists(path("failure")):
        with open(path("failure"), "w") as f:
            f.write(msg + "\n")
    print("soak: MISMATCH: " + msg, file=sys.stderr)


def read_view(cmd):
    """A whole view from cmd's stdout; None when it failed or came short (the server died)."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0 or len(p.stdout) != SIZE:
        with open(path("snap.err"), "w") as f:
            f.write(f"{' '.join(cmd)}: exit {p.returncode}, {len(p.stdout)} bytes: "
                    + p.stderr.decode(errors="replace").strip()[-400:] + "\n")
        return None
    stat("bytes", SIZE)
    return p.stdout


def nbd(name):
    return read_view(["nbdcopy", f"nbd+unix:///{name}?socket={SOCK}", "-"])


def first_bad(dec, base, gens):
    """The first sector holding neither base's generation nor one of gens that wrote there."""
    if dec == base:
        return None
    for s in range(NS):
        d = dec[s]
        if d != base[s] and not (d in gens and covers(d, s * SECTOR)):
            return s
    return None


def explain(what, dec, base, gens, s):
    alts = sorted(g for g in gens if covers(g, s * SECTOR) and g != base[s])
    exp = describe(base[s]) + "".join(f", or {describe(g)} (in flight)" for g in alts)
    return (f"{what}: bytes {s * SECTOR}..{(s + 1) * SECTOR} (sector {s}): expected {exp}; "
            f"found {describe(dec[s])}")


class Replay:
    """The journal of the round, replayed over the model of the origin at its start."""

    def __init__(self):
        self.model = load_map("model.bin")
        self.inflight = set()   # generations started and not done: in doubt
        self.windows = {}       # snapshot -> (origin model when its create began, gens running)
        self.sources = {}       # snapshot -> the snapshot it was created --from
        self.creating = set()   # create begun, window still open
        self.created, self.sums = set(), {}
        self.deleting, self.deleted = set(), set()
        self.restore = None     # (target, model before) of a restore under way at the end
        for line in open(path("journal.log")):
            w = line.split()[1:]   # after the time
            op = w[0]
            if op == "start":
                g = int(w[1])
                self.inflight.add(g)
                for n in self.creating:
                    self.windows[n][1].add(g)
            elif op == "done":
                g = int(w[1])
                o, r, _ = GENS[g]
                self.model[o // SECTOR:(o + r) // SECTOR] = array.array("I", [g]) * (r // SECTOR)
                self.inflight.discard(g)
            elif op == "create-begin":
                if len(w) > 2:
                    self.sources[w[1]] = w[2]
                else:
                    self.windows[w[1]] = (array.array("I", self.model), set(self.inflight))
                    self.creating.add(w[1])
            elif op == "created":
                self.creating.discard(w[1])
                self.created.add(w[1])
            elif op == "summed":
                self.sums[w[1]] = w[2]
            elif op == "delete-begin":
                self.deleting.add(w[1])
            elif op == "deleted":
                self.deleted.add(w[1])
            elif op == "restore-begin":
                self.restore = (w[1], array.array("I", self.model))
            elif op == "restored":
                if w[2] != "-":
                    self.windows[w[2]] = (self.restore[1], set())
                    self.created.add(w[2])
                self.model = load_map("maps/" + w[1])
                self.restore = None

    def check_new(self, name, dec, what):
        """A snapshot seen for the first time: its contents against its window or source."""
        src = self.sources.get(name)
        if src is not None:
            want = load_map("maps/" + src)
            s = first_bad(dec, want, set())
            if s is not None:
                record_failure(explain(f"{what} (created --from '{src}')", dec, want, set(), s))
                return False
            return True
        if name in self.windows:
            base, gens = self.windows[name]
        elif self.restore is not None and name.startswith("pre-restore-"):
            base, gens = self.restore[1], set()   # the backup of the restore the kill cut
        else:
            record_failure(f"{what}: a snapshot the soak never created")
            return False
        s = first_bad(dec, base, gens)
        if s is not None:
            record_failure(explain(what, dec, base, gens, s))
            return False
        return True


def cmd_init():
    save_map(array.array("I", bytes(4 * NS)), "model.bin")


def cmd_snap(name, rnd):
    rp = Replay()
    img = nbd(name)
    if img is None:
        sys.exit(3)
    dec = decode(img)
    ok = rp.check_new(name, dec, f"round {rnd}: snapshot '{name}' just created")
    stat("check", name)
    if not ok:
        sys.exit(1)
    save_map(dec, "maps/" + name)
    print(hashlib.sha256(img).hexdigest())


def cmd_settle(rnd):
    rp = Replay()
    known = {}
    for line in open(path("snaps.tsv")):
        n, sha = line.split()
        known[n] = sha
    known.update(rp.sums)
    failed = 0

    def failure(msg):
        nonlocal failed
        failed += 1
        record_failure(f"round {rnd}: {msg}")

    # the origin
    img = nbd("origin")
    if img is None:
        failure("the origin could not be read: " + open(path("snap.err")).read().strip())
        sys.exit(1)
    dec = decode(img)
    del img
    if rp.restore is not None and dec == load_map("maps/" + rp.restore[0]):
        pass  # the restore the kill cut was finished when the store was opened
    else:
        base = rp.restore[1] if rp.restore is not None else rp.model
        s = first_bad(dec, base, rp.inflight)
        if s is not None:
            failure(explain("origin", dec, base, rp.inflight, s))
    # the snapshots
    out = subprocess.run([SNAPCTL, "--json", "list"], stdout=subprocess.PIPE, check=True).stdout
    listed = [s for s in json.loads(out)["snapshots"]]
    present = {s["name"] for s in listed}
    maybe = rp.deleting - rp.deleted   # deletes the kill cut
    must = (set(known) | rp.created) - rp.deleting
    for n in sorted(must - present):
        failure(f"snapshot '{n}' was created (acknowledged) but is gone after the kill")
    for n in sorted(rp.deleted & present):
        failure(f"snapshot '{n}' was deleted (acknowledged) but is back after the kill")
    keep = []
    for s in listed:
        n = s["name"]
        if n in rp.deleted:
            continue
        if s["state"] != "valid":
            failure(f"snapshot '{n}' is {s['state']}: {s.get('invalid_reason')}")
            continue
        img = read_view([SNAPCTL, "export", n])
        if img is None:
            failure(f"snapshot '{n}' could not be read: " + open(path("snap.err")).read().strip())
            continue
        sha = hashlib.sha256(img).hexdigest()
        stat("check", n)
        if n in known:
            if sha != known[n]:
                d = decode(img)
                want = load_map("maps/" + n)
                s0 = first_bad(d, want, set())
                where = explain(f"snapshot '{n}' changed", d, want, set(), s0) if s0 is not None \
                    else f"snapshot '{n}' changed: SHA-256 {sha}, {known[n]} at creation"
                failure(where)
                continue
        else:
            # created or deleted by an operation the kill cut, or a restore's backup
            if n not in rp.windows and n not in rp.sources and n not in maybe and not (
                    rp.restore is not None and n.startswith("pre-restore-")):
                failure(f"snapshot '{n}' exists but was never created")
                continue
            d = decode(img)
            if not rp.check_new(n, d, f"round {rnd}: snapshot '{n}' (not hashed before the kill)"):
                failed += 1
                continue
            save_map(d, "maps/" + n)
        keep.append((n, sha))
    with open(path("snaps.tsv.tmp"), "w") as f:
        for n, sha in keep:
            f.write(f"{n} {sha}\n")
    os.replace(path("snaps.tsv.tmp"), path("snaps.tsv"))
    for n in os.listdir(path("maps")):
        if n not in dict(keep):
            os.unlink(path("maps", n))
    save_map(dec, "model.bin")
    doubt = sum(1 for s in range(0, NS, 8) if any(covers(g, s * SECTOR) for g in rp.inflight)) \
        if rp.inflight else 0
    print(f"{len(keep)} snapshots verified, {doubt * BLOCK >> 10} KiB of the origin in doubt")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"init": cmd_init, "snap": cmd_snap, "settle": cmd_settle}[cmd](*args)
EOF

# ---- setup
mkdir -p "$work/maps"
: > "$work/gens.tsv"; : > "$work/snaps.tsv"; : > "$work/stats"; : > "$work/serve.log"
echo 0 > "$work/gen"; echo 0 > "$work/last-restore"
truncate -s "$size" "$work/origin.img"
# room for a full copy of the origin per snapshot kept, and more
truncate -s $(( (max_live + 2) * size + (64 << 20) )) "$work/store.img"
"$SNAPCTL" -q init --origin "$work/origin.img" --chunk-size "$chunk" --on-full fail-writes
python3 "$work/soak.py" init
log "soak: $kills kills, ${secs} s rounds, ${size_mb} MiB origin, $chunk chunks; in $work"

# summary KILLS: the last line
summary() {
  awk -v kills="$1" -v t="$(($(date +%s) - t_start))" '
    $1 == "bytes" { b += $2 } $1 == "mismatch" { m += $2 } $1 == "check" { seen[$2] = 1 }
    END { n = 0; for (k in seen) n++
          printf "soak: %d kills survived, %.1f GiB verified, %d mismatches, %d snapshots checked, %d s\n",
                 kills, b / 1073741824, m, n, t }' "$work/stats"
}
# die ROUND [MESSAGE]: reports the first failure (or MESSAGE) and the summary, exits 1
die() {
  [ -e "$work/failure" ] || echo "round $1: $2" > "$work/failure"
  log "soak: FAILED: $(cat "$work/failure")"
  summary "$(($1 - 1))"
  exit 1
}

count() { grep -c " $1 " "$work/journal-$round.log" || true; }   # count OP: in this round

start_server
for round in $(seq "$kills"); do
  rm -f "$work/stop" "$work/killed" "$work/pause" "$work/paused"
  : > "$work/journal.log"
  writer & wpid=$!
  churn & cpid=$!
  ms=$((secs * (400 + RANDOM % 601)))   # 40-100 % of the round
  sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
  touch "$work/killed"
  if ! kill -9 "$srv" 2>/dev/null; then
    fail "snapctl serve exited on its own before the kill: $(tail -n 3 "$work/serve.log" | tr '\n' ' ')"
  fi
  wait "$srv" 2>/dev/null || true
  jot "kill"
  touch "$work/stop"
  wait "$wpid" "$cpid" || true
  srv=
  # Every other round the first to open the killed store is a `delete` with no server, as an
  # administrator would run one: it reads the catalog on demand, and its open replays the
  # journal of copies the server left (the oldest snapshot known at the round's start that
  # no delete or restore of this round touched).
  if [ $((round % 2)) = 0 ]; then
    victim=$(awk 'NR == FNR { if ($2 == "delete-begin" || $2 == "restore-begin") gone[$3] = 1; next }
                  !($1 in gone) { print $1; exit }' "$work/journal.log" "$work/snaps.tsv")
    if [ -n "$victim" ]; then
      jot "delete-begin $victim"
      if ! out=$("$SNAPCTL" -q delete "$victim" 2>&1); then
        fail "snapctl delete $victim after the kill: $out"; die "$round"
      fi
      jot "deleted $victim"
    fi
  fi
  cp "$work/journal.log" "$work/journal-$round.log"
  if grep -q 'panicked' "$work/serve.log"; then
    fail "snapctl serve panicked: $(grep -m 1 'panicked' "$work/serve.log")"
  fi
  [ ! -e "$work/failure" ] || die "$round"
  # open the crashed store: clean (0) or leaks only (9)
  rc=0; "$SNAPCTL" check > "$work/check.out" 2>&1 || rc=$?
  if [ "$rc" != 0 ] && [ "$rc" != 9 ]; then
    fail "snapctl check after the kill exited $rc: $(cat "$work/check.out")"; die "$round"
  fi
  checked=$(tail -n 1 "$work/check.out")
  start_server
  rc=0; out=$(python3 "$work/soak.py" settle "$round") || rc=$?
  [ "$rc" = 0 ] || die "$round" "the verification failed (exit $rc)"
  log "soak: round $round: killed after $((ms / 1000)).$(printf '%03d' $((ms % 1000))) s, $(count done) fio runs done, $(count created) creates, $(count deleted) deletes, $(count restored) restores, check: $checked; $out"
done
# a clean stop, then every saved chunk against its checksum
kill "$srv"; wait "$srv" || { fail "snapctl serve did not stop cleanly on SIGTERM"; die "$kills"; }
srv=
rc=0; "$SNAPCTL" check --data > "$work/check.out" 2>&1 || rc=$?
if [ "$rc" != 0 ] && [ "$rc" != 9 ]; then
  fail "snapctl check --data at the end exited $rc: $(cat "$work/check.out")"; die "$kills"
fi
summary "$kills"
