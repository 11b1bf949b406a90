"""The codes of how a blob's payload is compressed, and a vault config's names for them.

Apart from :mod:`cbt.format.pack` (which needs numpy): opening a vault reads its
config's ``compression`` and must not load numpy for it (an incremental backup starts
hashing its disks as soon as the vault is open).
"""

from __future__ import annotations

# Do not modify: these codes decode every blob ever written (vault format 1; lz4: 4).
CODEC_NONE = 0
CODEC_ZSTD = 1
CODEC_LZ4 = 2  # vault format 4: an lz4 block (no frame, no size prefix)
# a vault config's ``compression`` -> the codec its backups write
COMPRESSION = {"zstd": CODEC_ZSTD, "lz4": CODEC_LZ4}
