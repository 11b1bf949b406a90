"""Entry point of the ``cbt`` command: parse, dispatch, turn errors into exit codes.

Exit codes: 0 success, 1 differences found (diff), 2 error, 141 stdout closed by its
reader (``cbt list | head``: the command stops quietly, no message, no traceback).
A standard stream closed before the start (``>&-``, ``2>&-``) is as ``/dev/null``.

Command modules are imported only when they run, so ``cbt scan`` does not pay
for what ``cbt demo`` needs (start-up time counts against whole-process speed).
"""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import os
import select
import sys
from collections.abc import Sequence

from cbt.cli._common import EXIT_ERROR, fail

# A command whose reader went away (``cbt list | head``) stops quietly with this code:
# 128 + SIGPIPE, what a shell reports for a C program killed by the broken pipe.
EXIT_PIPE = 141

# name -> (module, one-line help)
COMMANDS = {
    "init": ("cbt.cli.init_cmd", "create a vault (encrypted) in a directory or an "
                                 "s3:// prefix"),
    "backup": ("cbt.cli.backup_cmd", "back up a VM's disks as a new recovery point"),
    "list": ("cbt.cli.list_cmd", "list the recovery points of a vault, oldest first"),
    "show": ("cbt.cli.show_cmd", "show one recovery point (or export a disk's "
                                 "manifest)"),
    "restore": ("cbt.cli.restore_cmd", "restore a point's disks, every block verified"),
    "mount": ("cbt.cli.mount_cmd", "serve recovery points' disks as read-only image files "
              "(FUSE)"),
    "verify": ("cbt.cli.verify_cmd", "check recovery points (--data, "
                                     "--read-data-subset, --repair)"),
    "jobs": ("cbt.cli.jobs_cmd", "list the backup jobs a vault recorded (status, "
                                 "errors)"),
    "config": ("cbt.cli.config_cmd", "check a configuration file and show its plan"),
    "run-due": ("cbt.cli.run_due_cmd", "run the backup jobs whose schedule slot is due"),
    "daemon": ("cbt.cli.daemon_cmd", "run due backups in a loop, with prune and gc "
                                     "as maintenance"),
    "prune": ("cbt.cli.prune_cmd", "remove the points the retention policies do not keep"),
    "forget": ("cbt.cli.forget_cmd", "remove named recovery points (as prune does)"),
    "stats": ("cbt.cli.stats_cmd", "where the space goes: sizes, ratios, unique "
                                   "bytes (--map)"),
    "gc": ("cbt.cli.gc_cmd", "free the blocks no recovery point references"),
    "scan": ("cbt.cli.scan_cmd", "hash every block of a disk image or device "
                                 "(-o: a manifest)"),
    "diff": ("cbt.cli.diff_cmd", "blocks that differ between images, manifests, "
                                 "points (--map)"),
    "copy": ("cbt.cli.copy_cmd", "copy recovery points to another vault (only missing blocks)"),
    "key": ("cbt.cli.key_cmd", "list, add or remove the passphrases of an encrypted vault"),
    "demo": ("cbt.cli.demo_cmd", "back up, restore and diff a generated VM, "
                                 "explaining each step"),
    "completion": ("cbt.cli.completion_cmd", "print a bash or zsh completion script"),
    "man": ("cbt.cli.man_cmd", "print cbt's manual page (cbt man | man -l -)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, exit 2 (argparse's default prints the whole usage)."""
        fail(f"{message} (see {self.prog} --help)", "--json" in sys.argv[1:])
        sys.exit(EXIT_ERROR)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``cbt --help`` lists the commands."""
    from cbt import __version__
    from cbt.core.native import fast

    parser = _Parser(
        prog="cbt",
        description="Changed-block tracker and incremental disk-image backup engine.",
        epilog="Exit codes: 0 success, 1 differences found (diff), 2 error, 141 stdout "
               "closed by its reader (cbt ... | head). "
               "Run 'cbt COMMAND --help' for a command's options; -r/--vault VAULT, -q "
               "and -v may also come before COMMAND (cbt -r VAULT list).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version",
                        version=f"cbt {__version__} (BLAKE3 kernel: {fast.kernel}"
                        + (f": {fast.kernel_error()})" if fast.kernel_error() else ")"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str) -> tuple[argparse.ArgumentParser, str]:
    """The parser of one command (only its module is imported)."""
    module = COMMANDS[name][0]
    mod = importlib.import_module(module)
    p = _Parser(prog=f"cbt {name}", description=mod.__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(p)
    from cbt.cli._common import add_verbosity

    add_verbosity(p)
    return p, module


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code.  A closed stdout ends it quietly (:data:`EXIT_PIPE`)."""
    _open_std_streams()
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit, where a broken pipe would print a traceback
        return code
    except OSError as exc:
        if _stdout_gone(exc):
            return _quiet_exit()
        raise


# entry() turned the collector off for start-up; _main turns it on for the command's work
_COLLECTOR_OFF_AT_START = False


def entry() -> int:
    """The ``cbt`` command (console script): :func:`main` in a process that ends with it.

    The cyclic garbage collector is off through start-up (imports, parsing: nothing
    there is garbage, yet its passes over every new object cost ``cbt scan`` about 4 ms)
    and on while the command works (:func:`_main`); at the end everything is frozen
    (:func:`gc.freeze`), so the interpreter's collections at exit pass over nothing
    (about 5 ms).  A process that calls :func:`main` itself keeps its collector as it is.
    """
    global _COLLECTOR_OFF_AT_START
    was_on = _COLLECTOR_OFF_AT_START = gc.isenabled()
    gc.disable()
    try:
        return main()
    finally:  # (as it was: a process that goes on, calling main() say, finds it so)
        _COLLECTOR_OFF_AT_START = False
        gc.freeze()
        if was_on:
            gc.enable()


def _open_std_streams() -> None:
    """A standard stream the caller closed (``>&-``, ``2>&-``: cron, daemons) is opened on
    /dev/null: the command runs as with its output thrown away, keeps its exit codes, and
    no file cbt opens gets fd 0, 1 or 2 (where a stray write would land in it)."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        got = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
        if got != fd:  # the lowest free fd: fd itself, as the ones below it are open
            os.dup2(got, fd)
            os.close(got)
        if getattr(sys, name) is None:  # Python found the stream closed at start-up
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


def _hoist(argv: list[str]) -> list[str]:
    """``cbt -r VAULT list`` (restic's and borg's order) as ``cbt list -r VAULT``: the
    options every command shares (-r/--vault VAULT, -q, -v) moved from before the
    command to after it; a command that takes no vault then refuses -r itself."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-r", "--vault") and i + 1 < len(argv):
            i += 2
        elif a in ("-q", "--quiet", "-v", "--verbose") or a.startswith("--vault=") \
                or (a.startswith("-r") and len(a) > 2):
            i += 1
        else:
            break
    if 0 < i < len(argv) and argv[i] in COMMANDS:
        return [argv[i], *argv[:i], *argv[i + 1:]]
    return argv


def _main(argv: Sequence[str] | None) -> int:
    argv = _hoist(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0].startswith("-") or argv[0] not in COMMANDS:
        parser = build_parser()
        parser.parse_args(argv)  # --help, --version, or an error for an unknown command
        parser.print_help()
        return EXIT_ERROR
    parser, module = command_parser(argv[0])
    # intermixed: options may stand between positionals (cbt backup VAULT --vm web DISK ...)
    args = parser.parse_intermixed_args(argv[1:])
    args._module = module
    _settle_common(parser, args)
    from cbt.core.errors import CbtError

    as_json = bool(getattr(args, "json", False))
    try:
        command = importlib.import_module(args._module)
        if _COLLECTOR_OFF_AT_START:  # (entry()): start-up's objects live to the end anyway
            gc.freeze()
            gc.enable()
        code: int = command.run(args)
        return code
    except KeyboardInterrupt:
        return fail("interrupted", as_json)
    except (CbtError, OSError) as exc:
        if isinstance(exc, OSError) and _stdout_gone(exc):
            return _quiet_exit()
        return fail(_one_line(exc), as_json)


def _settle_common(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What every command shares: how much to say, and the vault (-r, $CBT_VAULT)."""
    from cbt.cli import _common

    _common.VERBOSITY = -1 if args.quiet else 1 if args.verbose else 0
    _common.JSON_OUT = bool(getattr(args, "json", False))
    if not hasattr(args, "vault_option"):
        return
    if getattr(args, "config", None) and args.vault_option is None:
        del args.vault_option  # the config names the vault (backup refuses a VAULT too)
        return
    _common.resolve_vault(parser, args, needed=True)


def _stdout_gone(exc: OSError) -> bool:
    """Whether ``exc`` is a write to a stdout whose reader closed it (not another pipe's)."""
    if exc.errno != errno.EPIPE:
        return False
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        # a pipe with no reader (POLLERR), a socket whose peer shut down (POLLHUP)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))
    except (OSError, ValueError):
        return False


def _quiet_exit() -> int:
    """Nothing more to say to a reader that left: stdout to /dev/null (so the last flush
    at exit cannot fail again), no message; exit :data:`EXIT_PIPE`."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)
    return EXIT_PIPE


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror if not exc.filename else f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc)
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(entry())
