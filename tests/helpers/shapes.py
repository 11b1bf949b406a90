"""The exact ``--json`` key sets of every command: the CLI contract the README documents.

Where an issue fixed a shape it is named; a test asserts ``set(obj) == KEYS``.
"""

from __future__ import annotations

# issue 2: scan and diff
SCAN_KEYS = {"path", "size", "block_size", "blocks", "data_blocks", "zero_blocks",
             "hole_blocks", "bytes_read", "seconds", "warnings"}
DIFF_KEYS = {"block_size", "size_a", "size_b", "blocks", "changed_blocks", "changed_bytes",
             "ranges", "warnings"}

# issue 3: backup, list, restore, verify
POINT_LINE_KEYS = {"type", "recovery_point", "vm", "created", "consistency",
                   "consistency_reason", "disks", "seconds", "warnings"}
POINT_DISK_KEYS = {"label", "path", "size", "block_size", "blocks", "changed_blocks",
                   "bytes_read", "bytes_new", "bytes_stored", "seconds", "change_source",
                   "change_source_reason", "verified_blocks", "hint_mismatches"}
PROGRESS_KEYS = {"type", "vm", "disk", "bytes_done", "bytes_total"}
LIST_KEYS = {"points", "warnings"}
LIST_POINT_KEYS = {"recovery_point", "vm", "created", "consistency", "parent", "disks",
                   "bytes_new", "bytes_stored", "copied_from"}
LIST_DISK_KEYS = {"label", "size", "block_size"}
RESTORE_KEYS = {"recovery_point", "disks", "seconds", "warnings"}
RESTORE_DISK_KEYS = {"label", "to", "size", "bytes_written", "blocks_verified"}
VERIFY_KEYS = {"points", "blocks_checked", "data", "problems", "unreferenced_bytes",
               "warnings",
               "data_subset", "packs_data_checked", "bytes_data_checked"}  # issue 16
# issue 12: problems grouped per damaged file, each counting the blocks it affects
PROBLEM_KEYS = {"point", "disk", "block", "pack", "problem", "count"}

# issue 5: config check, jobs, and a job's error line
CHECK_KEYS = {"vault", "vms", "maintenance", "warnings"}
CHECK_VM_KEYS = {"name", "policy", "disks", "qmp", "guest_agent", "nbd",  # issue 14: QEMU VMs
                 "host"}  # issue 15: a VM on another host (Dask)
CHECK_DISK_KEYS = {"label", "path", "snapshot"}
JOBS_KEYS = {"jobs", "warnings"}
JOB_KEYS = {"id", "vm", "policy", "start", "end", "status", "consistency", "recovery_point",
            "disks", "error", "hooks"}
ERROR_LINE_KEYS = {"type", "vm", "message", "warnings"}

# issue 6: run-due and prune are exact; gc names at least these
SUMMARY_KEYS = {"type", "now", "ran", "skipped", "warnings"}
RAN_KEYS = {"vm", "slot", "status", "recovery_point"}
SKIPPED_KEYS = {"vm", "reason"}
PRUNE_KEYS = {"dry_run", "points", "snapshots_expired", "warnings"}
PRUNE_POINT_KEYS = {"recovery_point", "vm", "keep", "reasons"}
GC_KEYS = {"dry_run", "packs_removed", "packs_rewritten", "bytes_freed", "warnings",
           # issue 16: what was deleted, trashed, written and kept; the vault's size
           "trash_emptied", "bytes_deleted", "bytes_trashed", "bytes_written", "trash_bytes",
           "trash_free_after", "dead_kept_bytes", "dead_kept_packs", "max_unused",
           "vault_bytes_before", "vault_bytes_after"}

# issue 16: cbt mount (its one line once mounted)
MOUNT_KEYS = {"mountpoint", "points", "files", "cache_bytes", "warnings"}
MOUNT_FILE_KEYS = {"path", "size"}
