#!/usr/bin/env bash
# Installs the Debian packages iovirt's main job and tests need, if missing:
# QEMU (system emulator + qemu-storage-daemon; qemu-utils for qemu-nbd and
# qemu-img), nbdkit (a second NBD server for the NBD client tests),
# busybox-static and cpio for the test guest, the toolchain node-gyp uses
# for the native addon, and for the network tests and bench:net DPDK
# (dpdk-dev holds dpdk-testpmd; dpdk the PMDs it loads), tcpdump and iproute2.
set -euo pipefail
pkgs=(qemu-system-x86 qemu-utils nbdkit busybox-static cpio python3 make g++ dpdk dpdk-dev tcpdump iproute2)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all Debian packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "setup: installing ${missing[*]}"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
