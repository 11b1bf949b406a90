"""What a traced ``cbt`` process wrote to its target, as the kernel saw it.

``strace -f -y`` of the real process shows every write-like syscall with the
path of its file descriptor; the parse below turns it into offsets and lengths,
independent of cbt's own account of what it wrote.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from helpers.cli import cbt_argv, clean_env
from helpers.system import need_root_tools


@dataclass(frozen=True)
class Write:
    """One successful syscall that changed bytes of the traced target."""

    call: str  # pwrite64, fallocate (punch), ioctl (BLKZEROOUT), write
    offset: int
    length: int


_CALL = re.compile(r"^(\d+)\s+(pwrite64|pwritev2?|fallocate|ioctl|write|ftruncate)\((.*)$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")


def _result(tail: str) -> int | None:
    m = re.search(r"\)\s+=\s+(-?\d+)", tail)
    return int(m.group(1)) if m else None


def _first_int(text: str) -> int:
    m = re.match(r"\s*(\d+)", text)
    assert m, text
    return int(m.group(1))


def strace_cbt(log: Path, *args: object,
               calls: str = "pwrite64,pwritev,pwritev2,fallocate,ioctl,write,ftruncate",
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``cbt ARGS`` under ``strace -f -y`` (fds shown with their paths)."""
    need_root_tools("strace")
    argv = ["strace", "-f", "-y", "-s", "0", "-e", f"trace={calls}", "-o", str(log),
            *cbt_argv(*args)]
    return subprocess.run(argv, capture_output=True, text=True, env=clean_env(),
                          timeout=timeout, check=False)


def traced_writes(log: Path, target: str | os.PathLike[str]) -> list[Write]:
    """Every successful write-like syscall on a file descriptor open on ``target``."""
    want = os.path.realpath(target)
    pending: dict[str, tuple[str, str]] = {}
    done: list[tuple[str, str, int | None]] = []
    for line in log.read_text().splitlines():
        m = _CALL.match(line)
        if m:
            pid, call, rest = m.groups()
            if "<unfinished ...>" in rest:
                pending[pid] = (call, rest.replace("<unfinished ...>", ""))
            else:
                done.append((call, rest, _result(rest)))
            continue
        m = _RESUMED.match(line)
        if m and m.group(1) in pending:
            call, rest = pending.pop(m.group(1))
            done.append((call, rest, _result(m.group(3))))
    out = []
    for call, rest, result in done:
        fd = re.match(r"\d+<([^>]*)>,\s*(.*)$", rest)
        if not fd or os.path.realpath(fd.group(1)) != want:
            continue
        if result is None or result < 0:
            continue
        args = [a.strip() for a in fd.group(2).split(",")]
        if call == "pwrite64":
            out.append(Write(call, _first_int(args[2]), result))
        elif call in ("pwritev", "pwritev2"):
            # strace -s 0 prints the iovec array as "[...]": fd, iov, iovcnt, offset[, flags]
            iov_end = fd.group(2).index("]") + 1
            rest_args = [a.strip() for a in fd.group(2)[iov_end:].split(",") if a.strip()]
            out.append(Write(call, _first_int(rest_args[1]), result))
        elif call == "fallocate":
            assert "PUNCH_HOLE" in args[0], rest
            out.append(Write(call, _first_int(args[1]), _first_int(args[2])))
        elif call == "ioctl":
            if "BLKZEROOUT" in args[0]:
                nums = re.findall(r"\d+", fd.group(2).split("BLKZEROOUT", 1)[1])
                out.append(Write(call, int(nums[0]), int(nums[1])))
        elif call == "ftruncate":
            continue  # a size change, not a block write
        else:
            raise AssertionError(f"unexpected write to the target: {call}({rest}")
    return out


def touched_blocks(writes: list[Write], bs: int) -> set[int]:
    """Blocks any of ``writes`` touched."""
    out: set[int] = set()
    for w in writes:
        if w.length:
            out.update(range(w.offset // bs, (w.offset + w.length - 1) // bs + 1))
    return out
