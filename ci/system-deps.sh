#!/usr/bin/env bash
# System tools the tests use (never needed to build cbt): loop devices and
# mkfs for the block-device and file-system tests, strace for the fsync-order
# test, qemu-img/qemu-nbd/qemu-io (qemu-utils), qemu-storage-daemon
# (qemu-system-common) and qemu-system-x86 for the NBD and QMP tests, qemu-ga
# (qemu-guest-agent, run on the host with every rpc that could touch it blocked) for
# the guest agent protocol tests.  Needs
# root; a no-op for what is already installed.
set -euo pipefail
pkgs=(util-linux strace xfsprogs btrfs-progs e2fsprogs qemu-utils qemu-system-common
      qemu-system-x86 qemu-guest-agent)
missing=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
