#!/usr/bin/env bash
# Builds snapctl and runs the whole flow on a small example: two loop devices (plain files when
# not root), init, create, write through snapctl, list, export and compare, delete, check.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --quiet
SNAPCTL="$PWD/target/release/snapctl"
work=$(mktemp -d /tmp/snapctl-demo.XXXXXX)
loops=()
cleanup() {
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$(basename "$1") ${*:2}"; "$@"; }

# A 64 MiB origin with data in it, and a 64 MiB store.
head -c 64M /dev/urandom > "$work/origin.img"
truncate -s 64M "$work/store.img"
origin="$work/origin.img"
store="$work/store.img"
if [ "$(id -u)" -eq 0 ] && command -v losetup >/dev/null && origin_dev=$(losetup --find --show "$origin" 2>/dev/null); then
  loops+=("$origin_dev")
  store_dev=$(losetup --find --show "$store")
  loops+=("$store_dev")
  origin="$origin_dev"; store="$store_dev"
  echo "demo: origin on $origin, store on $store (loop devices)"
else
  echo "demo: not root or no loop devices: using plain files"
fi
cp "$work/origin.img" "$work/before.img"   # what the origin holds now, to compare with later

run "$SNAPCTL" init "$store" --origin "$origin"
export SNAPCTL_STORE="$store"
run "$SNAPCTL" create before-upgrade --label reason=demo --expires 7d
say "head -c 8M /dev/urandom | snapctl write --offset 4M   # change the origin, through snapctl"
head -c 8M /dev/urandom | "$SNAPCTL" write --offset 4M
run "$SNAPCTL" create after-upgrade
run "$SNAPCTL" list
run "$SNAPCTL" export before-upgrade -o "$work/exported.img"
say "cmp exported.img before.img"
cmp "$work/exported.img" "$work/before.img" && echo "identical: the snapshot holds the origin as it was"
say "snapctl export origin | cmp - before.img"
if "$SNAPCTL" export origin | cmp -s - "$work/before.img"; then
  echo "unexpected: the origin did not change" >&2; exit 1
else
  echo "differs: the live origin has the new data"
fi
run "$SNAPCTL" info
run "$SNAPCTL" --json show after-upgrade
run "$SNAPCTL" delete before-upgrade
run "$SNAPCTL" check
echo
echo "demo: done"
