"""Layer 3b: where blocks go.

The ``Storage`` protocol and its implementations, the vault opened over one
(``vault``), its index, locks and trash.  No operations live here (those are
``cbt.ops``).  Never imports ``cbt.source``.
"""
