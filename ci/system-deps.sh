#!/usr/bin/env bash
# System tools the tests use (never needed to build cbt): fuse3 (libfuse3 and
# fusermount3) for the cbt mount tests, loop devices and
# mkfs for the block-device and file-system tests, strace for the fsync-order
# test, qemu-img/qemu-nbd/qemu-io (qemu-utils), qemu-storage-daemon
# (qemu-system-common) and qemu-system-x86 for the NBD and QMP tests, qemu-ga
# (qemu-guest-agent, run on the host with every rpc that could touch it blocked) for
# the guest agent protocol tests, systemd (systemd-analyze) and procps (/bin/kill of the
# daemon's ExecReload) for the test of the units in contrib/.  The TCG guest of the VM tests
# (tests/helpers/guest.py) is built from .debs that `apt-get download` fetches (so
# apt's package lists must be there) plus the host's copies of the libraries qemu-ga
# loads (libglib2.0-0, libnuma1, liburing2, libudev1).  zsh parses the completion
# script cbt generates; man-db and groff-base render its man page.  qemu-user
# (qemu-x86_64) runs the compiled core on emulated older CPUs (no AVX-512, AVX2 or
# SSE4.1) in the BLAKE3 dispatch test.  time (GNU time) measures bench/scale.py's peak
# RSS.  liblz4-1 is the LZ4 library bench/lz4_decoder.py times cbt's decoder against.
# Needs root; a no-op for what is already installed.
set -euo pipefail
pkgs=(util-linux fuse3 strace xfsprogs btrfs-progs e2fsprogs qemu-utils qemu-system-common
      qemu-system-x86 qemu-guest-agent libglib2.0-0 libnuma1 liburing2 libudev1
      zsh man-db groff-base systemd qemu-user time liblz4-1)
missing=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
lists=(/var/lib/apt/lists/*_Packages*)
if ((${#missing[@]})) || [[ ! -e ${lists[0]} ]]; then
    apt-get update
fi
if ((${#missing[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
