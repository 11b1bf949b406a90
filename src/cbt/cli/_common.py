"""What every command shares: JSON output, warnings, errors, progress bars.

Conventions (DESIGN.md): human output on stdout; warnings on stderr, one line
each; progress bars on stderr only when it is a terminal; ``--json`` prints one
JSON object on stdout; errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from cbt.core.errors import CbtValueError

if TYPE_CHECKING:
    from cbt.api import Vault

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_ERROR = 2


MAX_WORKERS = 256  # --workers: 1..256 processes
MAX_WAIT = 7 * 86400.0  # --wait: up to a week
MAX_GRACE = 10 * 366 * 86400.0  # gc --grace: up to ten years
MAX_DEMO_SIZE = 1 << 40  # demo --size: up to 1T


def size_arg(text: str) -> int:
    """argparse type for sizes (``4K``, ``64K``, ``1M``, bytes); must be a block size
    (a power of two from 4K to 4M)."""
    from cbt.core.native import fast
    from cbt.core.sizes import parse_size

    try:
        value = parse_size(text)
        fast.check_block_size(value)
    except CbtValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    except OverflowError:  # beyond the core's integers: no block size either
        raise argparse.ArgumentTypeError(f"block size {text}: block size must be a power of "
                                         "two from 4K to 4M") from None
    return value


def demo_size_arg(text: str) -> int:
    """argparse type of ``demo --size``: a size from 1 byte to 1T."""
    from cbt.core.sizes import parse_size

    try:
        value = parse_size(text)
    except CbtValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 1 <= value <= MAX_DEMO_SIZE:
        raise argparse.ArgumentTypeError(f"size {text} is out of range (1 byte to 1T)")
    return value


def whole_arg(least: int, most: int, what: str) -> Callable[[str], int]:
    """argparse type of a whole number of ``what`` from ``least`` to ``most``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"not a number of {what} from {least} to {most}: "
                                             f"{text!r}")
        return value

    return parse


workers_arg = whole_arg(1, MAX_WORKERS, "workers")  # --workers


def add_removal_options(p: argparse.ArgumentParser) -> None:
    """``--dry-run`` and ``--wait`` of the commands that remove points (prune, forget)."""
    p.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")
    p.add_argument("--wait", type=seconds_arg(MAX_WAIT), default=0.0, metavar="SECONDS",
                   help="wait this long for running backups to finish (default: fail)")


def seconds_arg(most: float) -> Callable[[str], float]:
    """argparse type of a duration (``--wait``, ``--grace``): finite seconds, 0 to ``most``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 <= value <= most:  # nan, inf, negative, too large
            raise argparse.ArgumentTypeError(f"not a number of seconds from 0 to {most:.0f}: "
                                             f"{text!r}")
        return value

    return parse


def now_arg(text: str) -> str:
    """argparse type of ``--now``: an ISO 8601 time with an offset, from 1970 to 9999
    (returned as given; a point's id carries its time, ids sort by it)."""
    from cbt.core.timefmt import parse_now, rfc3339
    from cbt.format.records import check_point_time

    try:
        check_point_time(rfc3339(parse_now(text)))
    except CbtValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def vault_arg(text: str) -> str:
    """argparse type of a VAULT: a local directory or ``s3://BUCKET/PREFIX`` (an unknown
    ``scheme://``, or what reads as another host's, is refused)."""
    from cbt.repo.storage import check_location

    if text and not text.strip():  # CBT_VAULT=" ": a folder named " " made or looked for
        raise argparse.ArgumentTypeError(f"the vault location {text!r} is only blanks")
    try:
        return check_location(text)
    except CbtValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


VAULT_ENV = "CBT_VAULT"
VAULT_HELP = ("the vault: a directory or s3://BUCKET/PREFIX (or -r VAULT, or $CBT_VAULT; "
              "with either, leave this out)")


def add_vault(p: argparse.ArgumentParser, help: str = "the vault") -> None:
    """The vault of a command that takes one: the positional ``VAULT`` (first), or
    ``-r/--vault VAULT``, or ``$CBT_VAULT`` (like restic's ``RESTIC_REPOSITORY``).

    The positional is optional to argparse; :func:`resolve_vault` (run by
    ``cbt.cli.main`` after parsing) moves the other positionals over when the vault
    came from the option or the environment, and refuses a command left without one.
    """
    p.add_argument("vault", nargs="?", type=vault_arg, metavar="VAULT",
                   help=f"{help} (or -r VAULT, or $CBT_VAULT)")
    p.add_argument("-r", "--vault", dest="vault_option", type=vault_arg, metavar="VAULT",
                   action=OneVault,
                   help=f"{help}, instead of the positional VAULT (default: ${VAULT_ENV})")


class OneVault(argparse.Action):
    """``-r``'s store: a second, other vault (``-r A ... -r B``) is an error, not the last
    one silently (a script adding its own -r to a user's)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        before = getattr(namespace, self.dest, None)
        if before is not None and before != values:
            parser.error(f"two vaults given: -r {before} and {option_string} {values}")
        setattr(namespace, self.dest, values)


def _looks_like_vault(text: str) -> bool:
    """A positional read as the vault although ``-r`` or ``$CBT_VAULT`` names one: a URL,
    or a directory holding a vault's config (a point id, a disk or a key id is none, even
    when a directory of that name stands in the current one, say a restore's)."""
    import os

    from cbt.repo.vault import CONFIG

    return "://" in text or os.path.isfile(os.path.join(text, CONFIG))


def resolve_vault(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  needed: bool) -> None:
    """Settle ``args.vault`` of a command that took :func:`add_vault`.

    1. ``-r VAULT`` and a first positional that looks like a vault
       (:func:`_looks_like_vault`): two vaults, an error.
    2. ``-r VAULT``: the positionals argparse filled from the left move one place
       right (the first was not the vault); one too many is an error.
    3. No option, ``$CBT_VAULT`` set: the first positional is the vault when it
       looks like one, or when every slot was filled and none takes a list (the
       count tells: ``show V P``); else they move and the environment's vault is used
       (``backup --vm w D1 D2``: D1 is a disk, ``forget P1 P2``: P1 a point).
    4. ``needed``: no vault at all is an error.
    """
    import os

    option = args.vault_option
    del args.vault_option
    slots = [a for a in parser._actions if not a.option_strings]
    slots = slots[[a.dest for a in slots].index("vault"):]  # key ACTION VAULT [ID]
    first = args.vault
    if option is not None and first is not None and _looks_like_vault(first):
        parser.error(f"two vaults given: {first} and -r {option}")
    if option is None:
        env = os.environ.get(VAULT_ENV) or None
        counted = _all_filled(args, slots) and slots[-1].nargs not in ("*", "+")
        if env is None or (first is not None and (counted or _looks_like_vault(first))):
            if needed and first is None:
                parser.error(f"no vault given: name one (VAULT, -r VAULT or ${VAULT_ENV})")
            return
        option = vault_arg_or_error(parser, env, f"${VAULT_ENV}")
    _shift(parser, args, slots, option)


def vault_arg_or_error(parser: argparse.ArgumentParser, text: str, where: str) -> str:
    try:
        return vault_arg(text)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"{where}: {exc}")
        raise  # not reached: error() exits


def _all_filled(args: argparse.Namespace, slots: list[argparse.Action]) -> bool:
    return all(getattr(args, a.dest) not in (None, []) for a in slots)


def _shift(parser: argparse.ArgumentParser, args: argparse.Namespace,
           slots: list[argparse.Action], vault: str) -> None:
    """Put ``vault`` in the first slot and move each filled positional one slot right
    (into a list slot at its front); one too many is an error."""
    carry: str | None = vault
    for a in slots:
        value = getattr(args, a.dest)
        if isinstance(value, list):
            if carry is not None:
                setattr(args, a.dest, [_typed(parser, a, carry), *value])
            return
        setattr(args, a.dest, carry if a.dest == "vault" else
                (None if carry is None else _typed(parser, a, carry)))
        carry = value
        if carry is None:
            return
    if carry is not None:
        parser.error(f"unrecognized arguments: {carry}")


def _typed(parser: argparse.ArgumentParser, a: argparse.Action, text: str) -> object:
    """``text`` as the slot ``a`` would have taken it (its type and choices)."""
    value: object = text
    if a.type is not None and callable(a.type):
        try:
            value = a.type(text)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            parser.error(f"argument {a.metavar or a.dest}: {exc}")
    if a.choices is not None and value not in a.choices:
        parser.error(f"argument {a.metavar or a.dest}: invalid choice: {text!r}")
    return value


def local_path_arg(text: str) -> str:
    """argparse type of a local file or folder cbt writes (restore's ``--to``, ``-o``): a
    URL (``s3://b/x``: a folder ``s3:`` made here, silently) is refused."""
    import re

    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if m:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a URL ({m.group(1)}://): cbt writes this to a local path only "
            f"(write ./{text} for a local one)")
    return text


# -- how much to say: -q/--quiet, -v/--verbose (every command) ---------------------------

VERBOSITY = 0  # -1 quiet, 0 normal, 1 verbose; set by cbt.cli.main from the options
JSON_OUT = False  # --json: stdout is for a script, stderr for its warnings (no bars)


def add_verbosity(p: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``-v/--verbose``: cbt.cli.main adds them to every command."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true",
                       help="say only what was asked for and errors: no progress, no "
                            "summaries of what was done")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="say more: the details behind each step")


def say(text: str) -> None:
    """A line of human output on stdout, unless ``--quiet``."""
    if VERBOSITY >= 0:
        print(text)


def quiet() -> bool:
    """Whether ``--quiet`` was given (summaries and notices are left out)."""
    return VERBOSITY < 0


def detail(text: str) -> None:
    """A line on stderr only with ``--verbose``."""
    if VERBOSITY > 0:
        sys.stderr.write(f"cbt: {text}\n")


def print_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None,
                indent: str = "") -> None:
    """A table for people on stdout: a header line, then one line per row, columns
    padded to their widest cell; the columns in ``right`` (numbers) aligned right."""
    right = right or set()
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return (indent + "  ".join(out)).rstrip()

    print(line(headers))
    for r in rows:
        print(line(r))


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="machine-readable output: one JSON object on stdout")


# -- passphrases -------------------------------------------------------------------------

PASSWORD_FILE_HELP = ("read the passphrase of an encrypted vault from the first line of FILE "
                      "(else CBT_PASSWORD_FILE, CBT_PASSWORD, or a prompt on a terminal); "
                      "an unencrypted vault needs none")


def add_password_file(parser: argparse.ArgumentParser) -> None:
    """``--password-file FILE``: every command that opens a vault takes it."""
    parser.add_argument("--password-file", metavar="FILE", help=PASSWORD_FILE_HELP)


def on_terminal() -> bool:
    """Whether a prompt can be shown and answered (stdin and stderr are terminals)."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def prompt_passphrase(prompt: str, confirm: bool) -> bytes:
    """Ask on the terminal (twice when ``confirm``); refuses an empty one or a mismatch."""
    import getpass

    from cbt.core.errors import CbtValueError

    try:
        first = getpass.getpass(prompt, stream=sys.stderr)
        if not first:
            raise CbtValueError("empty passphrase: refused")
        if confirm and getpass.getpass("repeat it: ", stream=sys.stderr) != first:
            raise CbtValueError("the passphrases do not match: nothing done")
    except EOFError:
        raise CbtValueError("no passphrase typed (end of input)") from None
    return first.encode()


class PassphraseFinder:
    """The passphrase of one vault, found only when the vault turns out to be encrypted.

    Passed to ``Vault.open(path, passphrase=finder)`` / ``Vault.init``: an
    unencrypted vault never calls it (never prompts).  First found first:
    ``--password-file``, ``CBT_PASSWORD_FILE``, ``CBT_PASSWORD``, a prompt when
    stdin and stderr are terminals (twice with ``confirm``).  Found once, it is
    kept: later openings in the same command do not ask again.
    """

    def __init__(self, vault: object, password_file: str | None = None,
                 confirm: bool = False, hint: str = "", what: str = "") -> None:
        self.vault = str(vault)
        self.what = what or f"vault {self.vault} is encrypted"
        self.password_file = password_file
        self.confirm = confirm
        self.hint = hint
        self._found: bytes | None = None

    def __call__(self) -> bytes:
        if self._found is None:
            self._found = self._find()
        return self._found

    def _find(self) -> bytes:
        from cbt.repo.keys import (
            HOW_TO_GIVE,
            PassphraseRequiredError,
            passphrase_from_env,
            read_password_file,
        )

        if self.password_file:
            return read_password_file(self.password_file)
        found = passphrase_from_env()
        if found:
            return found
        if on_terminal():
            return prompt_passphrase(f"passphrase of {self.vault}: ", self.confirm)
        raise PassphraseRequiredError(f"{self.what} and no passphrase was given: "
                                      f"{HOW_TO_GIVE}{self.hint}")


def finder(args: argparse.Namespace, vault: object | None = None) -> PassphraseFinder:
    """The finder of a command's vault (``args.vault`` unless given) and ``--password-file``."""
    return PassphraseFinder(args.vault if vault is None else vault,
                            getattr(args, "password_file", None))


def open_vault(args: argparse.Namespace, path: object | None = None) -> Vault:
    """``cbt.api.Vault.open`` of ``path`` (default ``args.vault``) with the command's finder."""
    from cbt.api import Vault

    where = args.vault if path is None else path
    return Vault.open(str(where), passphrase=finder(args, where))


def change_source_text(d: Any) -> str:
    """How a disk's point found its changed blocks, in words (backup and show)."""
    text = str(d.change_source)
    if d.change_source_reason:
        text += f" ({d.change_source_reason})"
    if d.verified_blocks or d.hint_mismatches:
        text += f", verified {d.verified_blocks} blocks, {d.hint_mismatches} mismatched"
    return text


def print_json(obj: dict[str, Any]) -> None:
    import json  # (here: a command without --json need not load it)

    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    sys.stderr.write(f"cbt: warning: {message}\n")


def emit_warnings(warnings: list[str]) -> None:
    for w in warnings:
        warn(w)


def fail(message: str, as_json: bool) -> int:
    """One line on stderr (and a JSON error object with --json); returns exit code 2."""
    sys.stderr.write(f"cbt: error: {message}\n")
    if as_json:
        print_json({"type": "error", "message": message, "warnings": []})
    return EXIT_ERROR


ProgressFn = Callable[[int, int], None]


def rate_text(done: float, seconds: float | None) -> str:
    """A speed for people in the one unit system (``12.3 MiB/s``); ``?`` before any."""
    if not seconds or seconds <= 0:
        return "?/s"
    from cbt.core.sizes import human_bytes

    return f"{human_bytes(done / seconds)}/s"


def eta_text(done: float, total: float | None, seconds: float | None) -> str:
    """Time left at the speed so far (``0:01:05``), ``-:--:--`` while unknown."""
    if not total or not seconds or done <= 0 or seconds <= 0:
        return "-:--:--"
    left = max(0, math.ceil((total - done) * seconds / done))
    return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"


def bytes_text(done: float, total: float | None) -> str:
    """``1.5 MiB / 64.0 MiB`` (binary units, as every summary)."""
    from cbt.core.sizes import human_bytes

    return f"{human_bytes(done)} / {'?' if total is None else human_bytes(total)}"


def _bars(tasks: list[str], counts: str | None = None) -> tuple[Any, dict[str, Any]]:
    """A rich Progress on stderr of one bar per name: bytes, speed and ETA in binary units
    (rich's own columns count in MB: not the unit of cbt's summaries); with ``counts``
    (say "points") things counted instead of bytes."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
    from rich.text import Text

    class _Bytes(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(bytes_text(task.completed, task.total), style="progress.download")

    class _Speed(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(rate_text(task.completed, task.elapsed), style="progress.data.speed")

    class _Eta(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text("eta " + eta_text(task.completed, task.total, task.elapsed),
                        style="progress.remaining")

    class _Count(ProgressColumn):
        def render(self, task: Task) -> Text:
            total = "?" if task.total is None else f"{task.total:.0f}"
            return Text(f"{task.completed:.0f}/{total} {counts}", style="progress.download")

    amount: list[ProgressColumn] = [_Bytes(), _Speed()] if counts is None else [_Count()]
    bar = Progress(TextColumn("{task.description}"), BarColumn(), *amount, _Eta(),
                   console=Console(stderr=True), transient=True)
    # started at its first update: a disk waiting its turn does not count as slow
    return bar, {name: bar.add_task(name, total=None, start=False) for name in tasks}


def bars_on() -> bool:
    """Whether progress bars are drawn: stderr a terminal, and neither ``--quiet`` nor
    ``--json``."""
    return VERBOSITY >= 0 and not JSON_OUT and sys.stderr.isatty()


@contextlib.contextmanager
def progress_bars(names: list[str], counts: str | None = None
                  ) -> Iterator[Callable[[str, int, int], None] | None]:
    """One bar per name (backup: per disk) on stderr when :func:`bars_on`; the callback
    takes ``(name, done, total)``.  None when off.  ``counts``: as :func:`_bars`."""
    if not bars_on():
        yield None
        return
    bar, ids = _bars(names, counts)
    last: dict[str, float] = {}

    def update(name: str, done: int, total: int) -> None:
        now = time.monotonic()
        if name not in ids:  # a disk found only as the job ran (a QEMU VM's)
            ids[name] = bar.add_task(name, total=None, start=False)
        if name not in last:
            bar.start_task(ids[name])
        elif now - last[name] < 0.1 and done < total:
            return
        last[name] = now
        bar.update(ids[name], completed=done, total=total)
        if done >= total:  # its clock stops: a finished disk's speed stays what it was
            bar.stop_task(ids[name])

    with bar:
        yield update


@contextlib.contextmanager
def progress_bar(description: str, counts: str | None = None) -> Iterator[ProgressFn | None]:
    """A progress bar on stderr when :func:`bars_on`: bytes, speed (MiB/s) and time left
    (with ``counts``, say "points": things counted); else no callback at all."""
    with progress_bars([description], counts) as update:
        if update is None:
            yield None
            return

        def one(done: int, total: int) -> None:
            update(description, done, total)

        yield one
