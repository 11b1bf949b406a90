"""Layer 3a: where blocks come from.

A disk is opened (``scan.open_disk``), its data extents mapped and read in
windows, hashed by the one hash loop into digests; ``snapshot`` providers make
point-in-time views of disks; ``disks`` parses disk specs and starts the early
scan of an incremental backup.  Never imports ``cbt.repo``.
"""
