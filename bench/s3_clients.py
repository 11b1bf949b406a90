"""Three S3 client libraries against the same local SeaweedFS server, the same work.

``pyarrow.fs.S3FileSystem`` (a dependency of cbt already), ``obstore`` and
``boto3`` (install them in the bench's venv: ``pip install obstore boto3``; a
missing one is skipped and said so) each do, in this order, on a fresh bucket:

- put and get of 8 MiB objects, 1 and 8 requests in flight (threads: the same
  pool for every library, so the library's own per-request cost shows);
- put and get of 64 KiB objects (8 in flight);
- ranged reads: 64 KiB at random offsets of an 8 MiB object (8 in flight);
- list 1,000 keys under a prefix; delete them (8 in flight);
- conditional create (``If-None-Match: *``): whether the second create of a
  key is refused by the server (what a commit or lock without rename needs).

The server is the tests' (``tests/helpers/s3.py``: ``weed mini`` on 127.0.0.1,
started and stopped here).  Figures are the medians of ``--runs`` runs: MiB/s
(or keys/s, operations/s) of wall time, and the CPU seconds of this process (all
threads) the test took.
"""

from __future__ import annotations

import importlib
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness

MIB = 1 << 20
BIG = 8 * MIB
SMALL = 64 << 10


class Client:
    """One library's calls, all on one bucket."""

    name = ""

    def put(self, key: str, data: bytes) -> None: raise NotImplementedError
    def get(self, key: str) -> bytes: raise NotImplementedError
    def read_range(self, key: str, offset: int, length: int) -> bytes:
        raise NotImplementedError
    def list(self, prefix: str) -> list[str]: raise NotImplementedError
    def delete(self, key: str) -> None: raise NotImplementedError
    def create(self, key: str, data: bytes) -> bool | None:
        """Put only if missing: True created, False refused, None not supported."""
        raise NotImplementedError


class Arrow(Client):
    name = "pyarrow.fs"

    def __init__(self, env: dict[str, str], bucket: str) -> None:
        import pyarrow.fs as pafs
        self.fs = pafs.S3FileSystem(
            access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
            region=env["AWS_REGION"], endpoint_override=env["AWS_ENDPOINT_URL"],
            scheme="http", allow_bucket_creation=True)
        self.fs.create_dir(bucket)
        self.b = bucket
        self.pafs = pafs

    def put(self, key: str, data: bytes) -> None:
        with self.fs.open_output_stream(f"{self.b}/{key}", metadata={}) as f:
            f.write(data)

    def get(self, key: str) -> bytes:
        with self.fs.open_input_stream(f"{self.b}/{key}") as f:
            return bytes(f.read())

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with self.fs.open_input_file(f"{self.b}/{key}") as f:
            return bytes(f.read_at(length, offset))

    def list(self, prefix: str) -> list[str]:
        sel = self.pafs.FileSelector(f"{self.b}/{prefix}", recursive=True)
        return [i.path for i in self.fs.get_file_info(sel)]

    def delete(self, key: str) -> None:
        self.fs.delete_file(f"{self.b}/{key}")

    def create(self, key: str, data: bytes) -> bool | None:
        return None  # no conditional write in pyarrow.fs


class Obstore(Client):
    name = "obstore"

    def __init__(self, env: dict[str, str], bucket: str) -> None:
        self.obs = importlib.import_module("obstore")
        store_mod = importlib.import_module("obstore.store")
        boto = importlib.import_module("boto3")  # (obstore makes no buckets)
        boto.client("s3").create_bucket(Bucket=bucket)
        self.s = store_mod.S3Store(bucket, client_options={"allow_http": True})

    def put(self, key: str, data: bytes) -> None:
        self.obs.put(self.s, key, data)

    def get(self, key: str) -> bytes:
        return bytes(self.obs.get(self.s, key).bytes())

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        return bytes(self.obs.get_range(self.s, key, start=offset, length=length))

    def list(self, prefix: str) -> list[str]:
        return [m["path"] for batch in self.obs.list(self.s, prefix) for m in batch]

    def delete(self, key: str) -> None:
        self.obs.delete(self.s, key)

    def create(self, key: str, data: bytes) -> bool | None:
        try:
            self.obs.put(self.s, key, data, mode="create")
        except Exception as exc:  # AlreadyExistsError
            if "exist" in type(exc).__name__.lower() or "exist" in str(exc).lower():
                return False
            raise
        return True


class Boto(Client):
    name = "boto3"

    def __init__(self, env: dict[str, str], bucket: str) -> None:
        boto = importlib.import_module("boto3")
        config = importlib.import_module("botocore.config")
        self.c = boto.client("s3", config=config.Config(max_pool_connections=16))
        self.c.create_bucket(Bucket=bucket)
        self.b = bucket

    def put(self, key: str, data: bytes) -> None:
        self.c.put_object(Bucket=self.b, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return bytes(self.c.get_object(Bucket=self.b, Key=key)["Body"].read())

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        r = self.c.get_object(Bucket=self.b, Key=key, Range=f"bytes={offset}-{offset + length - 1}")
        return bytes(r["Body"].read())

    def list(self, prefix: str) -> list[str]:
        out: list[str] = []
        for page in self.c.get_paginator("list_objects_v2").paginate(Bucket=self.b, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def delete(self, key: str) -> None:
        self.c.delete_object(Bucket=self.b, Key=key)

    def create(self, key: str, data: bytes) -> bool | None:
        try:
            self.c.put_object(Bucket=self.b, Key=key, Body=data, IfNoneMatch="*")
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall and CPU (this process, all threads) seconds of ``fn()``."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def in_flight(n: int, fn: Callable[[Any], Any], items: list[Any]) -> None:
    """``fn(item)`` for every item, ``n`` at a time (threads)."""
    if n == 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(fn, items))


def one_run(c: Client, run: int, count_big: int,
            count_small: int) -> dict[str, tuple[float, float]]:
    """Each test's (wall, cpu) seconds."""
    rnd = random.Random(run)
    big = os.urandom(BIG)
    small = os.urandom(SMALL)
    out: dict[str, tuple[float, float]] = {}
    for n in (1, 8):
        keys = [f"r{run}/big{n}/{i}" for i in range(count_big)]
        out[f"put 8 MiB x{n}"] = timed(partial(in_flight, n, lambda k: c.put(k, big), keys))
        out[f"get 8 MiB x{n}"] = timed(partial(in_flight, n, c.get, keys))
    skeys = [f"r{run}/small/{i}" for i in range(count_small)]
    out["put 64 KiB x8"] = timed(partial(in_flight, 8, lambda k: c.put(k, small), skeys))
    out["get 64 KiB x8"] = timed(partial(in_flight, 8, c.get, skeys))
    offs = [rnd.randrange(0, BIG - SMALL) for _ in range(count_small)]
    src = f"r{run}/big8/0"
    out["range 64 KiB x8"] = timed(partial(in_flight, 8,
                                           lambda o: c.read_range(src, o, SMALL), offs))
    lkeys = [f"r{run}/list/{i:04d}" for i in range(1000)]
    in_flight(8, lambda k: c.put(k, b"x"), lkeys)
    got: list[str] = []
    out["list 1000"] = timed(lambda: got.extend(c.list(f"r{run}/list/")))
    if len(got) != 1000:
        raise harness.BenchError(f"{c.name} listed {len(got)} of 1000 keys")
    out["delete x8"] = timed(partial(in_flight, 8, c.delete, lkeys))
    return out


def amount(test: str, count_big: int, count_small: int) -> tuple[float, str]:
    """How much a test moves: MiB for transfers, operations otherwise."""
    if "8 MiB" in test:
        return count_big * BIG / MIB, "MiB/s"
    if "64 KiB" in test:
        return count_small * SMALL / MIB, "MiB/s"
    return 1000.0, "ops/s"


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__.split("\n")[0], tempfile.gettempdir(),
                       "where the server keeps its data (a temporary directory in it)",
                       "128M", "bytes of 8 MiB objects per test and run")
    p.add_argument("--json", action="store_true", help="machine output on stdout")
    args, size = harness.parse(p, argv)
    count_big, count_small = max(1, size // BIG), 256
    s3 = importlib.import_module("helpers.s3")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, s3.s3_server(Path(tmp)) as server:
        os.environ.update(server.env)
        for cls in (Arrow, Obstore, Boto):
            try:
                client = cls(server.env, s3.fresh_bucket())
            except ImportError as exc:
                harness.log(f"{cls.name}: not installed ({exc}); skipped")
                continue
            runs = [one_run(client, r, count_big, count_small) for r in range(args.runs)]
            row: dict[str, Any] = {}
            for test in runs[0]:
                walls = [r[test][0] for r in runs]
                cpus = [r[test][1] for r in runs]
                qty, unit = amount(test, count_big, count_small)
                row[test] = {"rate": qty / harness.median(walls), "unit": unit,
                             "cpu_s": harness.median(cpus), "spread": harness.spread(walls)}
            first = client.create("cond/x", b"1")
            second = client.create("cond/x", b"2") if first else None
            row["conditional create"] = ("not supported" if first is None else
                                         "honoured" if second is False else "IGNORED")
            results[cls.name] = row
            harness.log(f"{cls.name}: done")

    def report() -> str:
        names = list(results)
        tests = [t for t in results[names[0]] if t != "conditional create"]
        rows = [["test", *[f"{n} rate" for n in names], *[f"{n} cpu s" for n in names]]]
        for t in tests:
            rows.append([t, *[f"{results[n][t]['rate']:.0f} {results[n][t]['unit']}"
                              + ("*" if results[n][t]["spread"] > harness.NOISY else "")
                              for n in names],
                         *[f"{results[n][t]['cpu_s']:.2f}" for n in names]])
        rows.append(["If-None-Match: *", *[str(results[n]["conditional create"]) for n in names],
                     *["" for _ in names]])
        return "\n".join(harness.table(rows, set(range(1, len(rows[0])))))

    harness.emit(args.json, lambda: {"runs": args.runs, "objects_8mib": count_big,
                                     "objects_64kib": count_small, "results": results},
                 report, note="* noisy (spread above 25%)\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except harness.BenchError as exc:
        sys.exit(f"{harness.prog()}: {exc}")
