"""Mount recovery points as read-only disk image files (FUSE), to copy files out.

With POINT (an id, a unique prefix, or VM.latest) each of its disks is
MOUNTPOINT/LABEL.img; without, every point of the vault is
MOUNTPOINT/VM/POINT/LABEL.img (the points there when it was mounted).  The
files are read-only (opening one for writing fails with EROFS, for root too);
each is the disk's size, and a file system on it mounts read-only through a loop
device to copy files out:

    cbt mount VAULT web.latest /mnt/point &
    mount -o ro,loop /mnt/point/os.img /mnt/os      (or: losetup -r -P, for partitions)
    cp -a /mnt/os/etc/fstab .; umount /mnt/os; umount /mnt/point

Every block read is checked against its id, as restore does: a block that fails
makes that read fail with EIO (and a warning line on stderr), never wrong data.
Holes and zero blocks read as zeros without touching the vault.  Blocks read are
kept in a cache (--cache, default 256M); sequential reads fetch the next 4 MiB
ahead.  Requests are served on several threads.

It runs in the foreground until SIGINT (Ctrl-C), SIGTERM, or 'umount
MOUNTPOINT' ('fusermount3 -u MOUNTPOINT'), then unmounts and exits 0.  The
mount point must be an empty directory.  Needs /dev/fuse and libfuse3
(apt-get install fuse3).  Killed (SIGKILL), it leaves a dead mount behind
('Transport endpoint is not connected'): 'fusermount3 -u MOUNTPOINT' (or
'umount -l MOUNTPOINT') releases it.

While mounted it holds the vault's shared lock (as a backup does): prune and
other commands that need the vault alone wait (or fail); while one of them runs,
cbt mount fails at once (or waits, --wait).  gc may move packs the mount reads
into its trash but empties none of what it trashed since the mount started (the
mount reads them there): a long mount holds gc's space back.

Once mounted it prints a line (with --json one object: {"mountpoint","points",
"files":[{"path","size"}],"cache_bytes","warnings"}).
"""

from __future__ import annotations

import argparse
import errno
import os
import stat

from cbt.cli._common import (
    EXIT_OK,
    MAX_WAIT,
    add_json,
    add_password_file,
    add_vault,
    local_path_arg,
    open_vault,
    say,
    seconds_arg,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_vault(p, "the vault")
    p.add_argument("point", nargs="?", metavar="POINT",
                   help="point id, unique prefix, or VM.latest (default: every point, as "
                        "VM/POINT/LABEL.img)")
    p.add_argument("mountpoint", type=local_path_arg, metavar="MOUNTPOINT",
                   help="an empty directory to mount on")
    p.add_argument("--cache", type=_cache_arg, default=None, metavar="SIZE",
                   help="memory for blocks read (e.g. 64M, 1G; default 256M; 0: none)")
    p.add_argument("--wait", type=seconds_arg(MAX_WAIT), default=0.0, metavar="SECONDS",
                   help="wait up to this long while a prune, repair or key change holds "
                        "the vault alone (default: fail)")
    add_password_file(p)
    add_json(p)


def _cache_arg(text: str) -> int:
    from cbt.core.errors import CbtValueError
    from cbt.core.sizes import parse_size

    try:
        value = parse_size(text)
    except CbtValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 0 <= value <= 1 << 40:
        raise argparse.ArgumentTypeError(f"cache size {text}: out of range (0 to 1T)")
    return value


def _check_mountpoint(path: str) -> str:
    """An existing, empty directory (one clear error line otherwise); its absolute path."""
    from cbt.core.errors import CbtIOError

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CbtIOError(errno.ENOENT, f"mount point {path} does not exist (make an empty "
                         "directory)") from None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        # (a FUSE mount whose server is gone: a cbt mount killed with SIGKILL, say)
        raise CbtIOError(errno.ENOTCONN, f"mount point {path} is a dead FUSE mount (its "
                         f"server was killed): release it with 'fusermount3 -u {path}' (or "
                         f"'umount -l {path}'), then mount again") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CbtIOError(errno.ENOTDIR, f"mount point {path} is not a directory")
    if os.listdir(path):
        raise CbtIOError(errno.ENOTEMPTY, f"mount point {path} is not empty")
    return os.path.abspath(path)


def run(args: argparse.Namespace) -> int:
    from cbt.core.errors import CbtError
    from cbt.ops.mount import DEFAULT_CACHE, READ_AHEAD, BlockCache, Shared, mount_tree
    from cbt.repo.lock import shared_lock

    mountpoint = _check_mountpoint(args.mountpoint)
    # mfusepy takes libfuse 2 where both are installed: libfuse3 here (fusermount3)
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy

        from cbt.cli._mountfs import MountFs
    except (ImportError, OSError) as exc:  # (no libfuse3 on this host: an OSError)
        raise CbtError(f"cbt mount needs libfuse3 (apt-get install fuse3): {exc}") from None
    # libfuse makes / the working directory once mounted: a vault named by a relative
    # path would be looked for there
    vault = open_vault(args, args.vault if "://" in args.vault else os.path.abspath(args.vault))
    warnings: list[str] = []
    points = [vault.point(args.point)] if args.point else vault.points(warnings=warnings)
    if not points:
        raise CbtError(f"no recovery point in {vault.root} to mount")
    cache = DEFAULT_CACHE if args.cache is None else args.cache
    with shared_lock(vault.storage, args.wait, reveal_command=not vault.encrypted):
        index = vault.load_index(warnings, headers=True)
        # (read-ahead into a cache too small to keep it would only fetch blocks twice)
        shared = Shared(vault, index, BlockCache(cache), read_ahead=min(READ_AHEAD, cache // 4))
        files = mount_tree(shared, points, one=args.point is not None)
        ops = MountFs(shared, files, mountpoint, args.json, warnings)
        try:
            mfusepy.FUSE(ops, mountpoint, foreground=True, ro=True, fsname="cbt",
                         subtype="cbt", default_permissions=True, kernel_cache=True,
                         max_threads=MAX_THREADS, max_idle_threads=MAX_THREADS)
        except RuntimeError:  # libfuse's loop ends "in error" when a signal stops it
            if not ops.mounted:
                raise CbtError(f"could not mount on {mountpoint} (see above; is /dev/fuse "
                               "there, and fusermount3?)") from None
        finally:
            shared.close()
    if not ops.mounted:
        raise CbtError(f"could not mount on {mountpoint} (is /dev/fuse there, and "
                       "fusermount3?)")
    if not args.json:  # (--json: the one object printed once mounted)
        say(f"unmounted {mountpoint}")
    return EXIT_OK


# libfuse's threads serving requests at most (reads of different blocks run at once:
# decryption, decompression and hashing let go of the GIL)
MAX_THREADS = 8
