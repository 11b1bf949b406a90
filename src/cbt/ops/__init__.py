"""Layer 4: operations over sources and a repository.

``backup`` (plan, transfer, commit), ``restore`` (plan, write, instant),
``verify`` and repair, ``gc``, ``prune``, ``diff``.  Each takes its inputs and
returns typed results; rendering them is the CLI's business.
"""
