"""Layer 2: every on-disk layout and magic of cbt, in one place.

``manifest`` (Arrow IPC manifests and deltas), ``pack`` (pack files, blob
headers, trailers), ``records`` (recovery points, names and ids).  Pure
encode/decode with checksums: no storage, no policy.
"""
