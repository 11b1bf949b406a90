#!/usr/bin/env python3
"""Memory and time of cbt on a thin disk: they must follow its data, not its size.

Usage::

    python bench/thin_disk.py [--dir /var/tmp/cbt-thin] [--size 1T] [--data 256M]
                              [--encryption none|aes-256-gcm] [--json]

Makes a sparse file of ``--size`` holding ``--data`` in 300 scattered,
unaligned places (half random bytes, half text), then runs, each as its own
process: ``cbt init``, a full backup, an incremental one after 20 writes of
100 KB, a restore of the disk, ``verify`` and ``verify --data``.  For each it
prints the peak RSS of the largest process (cbt or one of its forked workers:
``wait4``'s ``ru_maxrss``, what GNU time's ``%M`` reports) and the wall time;
then the bytes of the vault's manifests, and checks the restored disk against
the original (apparent size, and the same bytes wherever either has data).
An encrypted vault's passphrase is given as ``CBT_PASSWORD``; its unlock
(scrypt, 128 MiB) is part of every figure.  Everything made is removed at the
end.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import harness

from cbt.core.extents import data_extents
from cbt.core.sizes import human_bytes

PIECES = 300
CHANGES = 20
CHANGE_BYTES = 100_000


def make_disk(path: Path, size: int, data: int, seed: int = 12) -> None:
    rng = random.Random(seed)
    per = max(1, data // PIECES)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(PIECES):
            f.seek(rng.randrange(0, max(1, size - per)))
            if i % 2:
                f.write(rng.randbytes(per))
            else:
                f.write(b"".join(b"line %d of piece %d, lorem ipsum dolor sit amet\n" % (j, i)
                                 for j in range(per // 40 + 1))[:per])


def change_disk(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        for i in range(CHANGES):
            f.seek(i * (size // CHANGES) + 12345)
            f.write(os.urandom(min(CHANGE_BYTES, size // CHANGES)))


def timed(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``argv``; its wall time and the peak RSS of its largest process."""
    started = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=[
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise harness.BenchError(f"{' '.join(argv)} exited {code}")
    return {"seconds": round(seconds, 3), "max_rss": usage.ru_maxrss * 1024}


def same_data(a: Path, b: Path, chunk: int = 8 << 20) -> bool:
    """Equal apparent sizes, and equal bytes wherever either file holds data."""
    size = a.stat().st_size
    if b.stat().st_size != size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for f in (fa, fb):
            for start, end in data_extents(f.fileno(), size):
                for at in range(start, end, chunk):
                    n = min(chunk, end - at)
                    if os.pread(fa.fileno(), n, at) != os.pread(fb.fileno(), n, at):
                        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = harness.parser("cbt's memory and time on a thin disk (see the module docstring)",
                       "/var/tmp/cbt-thin", "work directory", "1T",
                       "apparent size of the thin disk (default 1T)")
    p.add_argument("--data", default="256M", help="bytes of data in it (default 256M)")
    p.add_argument("--encryption", default="none", help="the vault's (default none)")
    harness.add_output_options(p)
    args, size = harness.parse(p, argv)
    data = harness.size_arg(p, args.data)
    work = Path(args.dir).absolute()
    cbt = harness.find_cbt(args.cbt)
    env = harness.tool_env(CBT_PASSWORD="thin-disk-bench")
    result: dict[str, Any] = {"size": size, "data": data, "encryption": args.encryption,
                              "commands": {}}
    try:
        work.mkdir(parents=True, exist_ok=False)
        disk, vault, out = work / "disk.img", work / "vault", work / "restored.img"
        harness.log(f"making a {human_bytes(size)} thin disk with {human_bytes(data)} ...")
        make_disk(disk, size, data)
        steps = [
            ("init", [cbt, "init", "--encryption", args.encryption, str(vault)]),
            ("full", [cbt, "backup", str(vault), "--vm", "thin", f"disk={disk}"]),
            ("incr", [cbt, "backup", str(vault), "--vm", "thin", f"disk={disk}"]),
            ("restore", [cbt, "restore", str(vault), "thin.latest", "--disk", "disk",
                         "--to", str(out)]),
            ("verify", [cbt, "verify", str(vault)]),
            ("verify_data", [cbt, "verify", "--data", str(vault)]),
        ]
        for name, step in steps:
            if name == "incr":
                change_disk(disk, size)
            result["commands"][name] = timed(step, env) | {"argv": step}
            harness.log(f"  {name}: {human_bytes(result['commands'][name]['max_rss'])}, "
                        f"{result['commands'][name]['seconds']:.2f} s")
        result["manifest_bytes"] = sum(f.stat().st_size for f in (vault / "manifests").rglob("*")
                                       if f.is_file())
        result["restored_equal"] = same_data(disk, out)
    except (harness.BenchError, OSError) as exc:
        harness.log(f"{harness.prog()}: {exc}")
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def human() -> str:
        lines = [f"a {human_bytes(size)} thin disk with {human_bytes(data)} "
                 f"(encryption {args.encryption}); peak RSS of the largest process, wall time:"]
        lines += [f"  {k:<12} {human_bytes(v['max_rss']):>10}  {v['seconds']:7.2f} s"
                  for k, v in result["commands"].items()]
        lines.append(f"  manifests in the vault: {human_bytes(result['manifest_bytes'])}; "
                     f"restored disk equal: {result['restored_equal']}")
        return "\n".join(lines)

    harness.emit(args.json, lambda: result, human)
    return 0 if result["restored_equal"] else 2


if __name__ == "__main__":
    sys.exit(main())
