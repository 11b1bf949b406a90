"""Layer 3a: where blocks come from.

A disk is a :class:`~cbt.source.base.BlockSource` (size, live or not, data
extents, windows to read, change hints, a spec to reopen it in a worker):
``image`` opens image files and block devices, ``snapshot`` providers make
point-in-time views of disks and hand them out as sources, ``disks`` names
the disks of a backup.  ``plan`` is the one shard planner, ``read`` the one
hash loop and compare loop; ``scan`` hashes whole disks (also as the early
scan of an incremental backup).  Never imports ``cbt.repo``.
"""
