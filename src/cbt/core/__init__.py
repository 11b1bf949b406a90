"""Layer 1, the bottom: compiled kernels and what every layer above needs.

The compiled core (``_fast``, loaded and version-checked by ``native``) and
its pure-Python ``reference``; forked workers over shared memory
(``parallel``); durable commits and the ``CBT_CRASH_AT`` test hook
(``durable``); low-level I/O (``blockio``, ``extents``); the error hierarchy,
size strings and time formats.  Imports nothing of cbt outside ``cbt.core``.
"""
