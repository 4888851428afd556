#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian machine (run as root).
# Idempotent: does nothing when everything is already there.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have losetup    || need+=(util-linux)
have mount      || need+=(mount)
have mkfs.ext4  || need+=(e2fsprogs)
have qemu-img   || need+=(qemu-utils)
have nbdinfo    || need+=(libnbd-bin)
have nbdkit     || need+=(nbdkit)
have fio        || need+=(fio)
have fusermount3 || need+=(fuse3)
have cmp        || need+=(diffutils)
have openssl    || need+=(openssl)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${need[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! have cargo; then
  echo "setup: cargo is not installed (snapctl needs a Rust toolchain, 1.85 or newer)" >&2
  exit 1
fi
echo "setup: ok"
