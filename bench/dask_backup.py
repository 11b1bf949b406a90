"""Backups on Dask against the built-in forked workers: same disk, same vault kind.

For each kind of data (``random``: incompressible, every block new; ``realistic``:
a file-system-like image of data, text, zeros and holes, ``cbt.source.synth``)
and each way of running the shards (``forked``: the built-in workers;
``dask``: a ``distributed.LocalCluster`` of N worker processes, one thread each,
started once and kept, as a cluster is), it times ``--runs`` full backups into a
fresh vault each, then ``--runs`` incremental backups of the unchanged disk,
and reports the medians and the ratio dask / forked.

The vault is a directory (``--vault-dir``, default beside the disks) or an S3
prefix (``--s3 s3://BUCKET/PREFIX``, the endpoint and credentials from the
standard AWS environment): each run takes a new sub-folder or sub-prefix.

    python bench/dask_backup.py --size 256M --workers 2 --runs 3 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cbt.api import Vault
from cbt.core.sizes import parse_size
from cbt.repo.storage import LocalStorage, Storage
from cbt.source.synth import make_fs_image

BLOCK_SIZE = 16 << 10


def make_random(path: Path, size: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n


def new_storage(args: argparse.Namespace, base: Path) -> Storage:
    tag = f"{base.name}-{uuid.uuid4().hex[:12]}"
    if args.s3:
        from cbt.repo.s3 import S3Storage

        return S3Storage.create(f"{args.s3.rstrip('/')}/{tag}")
    return LocalStorage.create(base.parent / tag)


def cpu_seconds(client: Any) -> float:
    """CPU seconds so far of this process, its reaped children (forked workers) and the
    cluster's worker processes."""
    def used() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers: dict[str, float] = client.run(used)
    return used() + kids.ru_utime + kids.ru_stime + sum(workers.values())


def measure(args: argparse.Namespace, disk: Path, base: Path,
            client: Any) -> dict[str, dict[str, Any]]:
    """``--runs`` full backups (each into a new vault), then as many incrementals of the
    unchanged disk, forked and on Dask in turn (so both see the same machine load):
    wall and CPU seconds (coordinator, forked workers, cluster workers) of each."""
    ways = {"forked": None, "dask": client}
    vaults = {how: [Vault.create(new_storage(args, base / how)) for _ in range(args.runs)]
              for how in ways}
    out: dict[str, dict[str, list[float]]] = {
        how: {"full_s": [], "full_cpu_s": [], "incremental_s": [], "incremental_cpu_s": []}
        for how in ways}
    for phase in ("full", "incremental"):
        for k in range(args.runs):
            for how, executor in ways.items():
                v = vaults[how][k if phase == "full" else -1]
                cpu = cpu_seconds(client)
                t = time.perf_counter()
                v.backup("vm", [disk], block_size=BLOCK_SIZE, workers=args.workers,
                         executor=executor)
                out[how][f"{phase}_s"].append(time.perf_counter() - t)
                out[how][f"{phase}_cpu_s"].append(cpu_seconds(client) - cpu)
    return {how: {**runs, **{k.replace("_s", "_median_s"): statistics.median(v)
                             for k, v in runs.items()}}
            for how, runs in out.items()}


def _untuned() -> None:
    from cbt.jobs import dask_executor

    dask_executor._TUNED.append(True)  # (as if done: never done)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="256M", help="disk size (default 256M)")
    p.add_argument("--workers", type=int, default=2, help="workers of each kind (default 2)")
    p.add_argument("--runs", type=int, default=3, help="runs of each, at least 3")
    p.add_argument("--data", default="random,realistic", help="kinds of data")
    p.add_argument("--dir", default=None, help="where the disks and vaults go (default: tmp)")
    p.add_argument("--s3", default=None, metavar="s3://BUCKET/PREFIX",
                   help="vaults on S3 instead of a directory")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave the workers' malloc as Dask's nanny set it (the cost before)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.runs < 3:
        p.error("--runs: at least 3 (medians)")
    from distributed import Client, LocalCluster

    size = parse_size(args.size)
    root = Path(args.dir or tempfile.mkdtemp(prefix="cbt-dask-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cluster: Any = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=args.workers, threads_per_worker=1, processes=True,
                           host="127.0.0.1", scheduler_port=0,
                           dashboard_address="127.0.0.1:0",
                           worker_dashboard_address="127.0.0.1:0",
                           local_directory=str(root / "dask-scratch"))
    client: Any = Client(cluster, set_as_default=False)  # type: ignore[no-untyped-call]
    client.wait_for_workers(args.workers)
    if args.no_malloc_tuning:
        client.run(_untuned)
    startup = time.perf_counter() - started
    results: dict[str, Any] = {}
    try:
        for kind in args.data.split(","):
            disk = root / f"{kind}.img"
            (make_random if kind == "random" else make_fs_image)(disk, size)
            vaults = root / f"vaults-{kind}"
            for how, r in measure(args, disk, vaults, client).items():
                results[f"{kind}/{how}"] = r
            shutil.rmtree(vaults, ignore_errors=True)
            f, d = results[f"{kind}/forked"], results[f"{kind}/dask"]
            results[f"{kind}/ratio"] = {k: d[f"{k}_median_s"] / f[f"{k}_median_s"]
                                        for k in ("full", "full_cpu", "incremental",
                                                  "incremental_cpu")}
            disk.unlink()
    finally:
        client.close()
        cluster.close()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    report = {"size": size, "workers": args.workers, "runs": args.runs,
              "malloc_tuning": not args.no_malloc_tuning,
              "vault": "s3" if args.s3 else "directory", "cluster_startup_s": startup,
              "cpus": os.cpu_count(), "python": platform.python_version(),
              "command": " ".join([sys.executable, *sys.argv]), "results": results}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{args.size} disk, {args.workers} workers, {args.runs} runs, "
          f"{report['vault']} vault, malloc tuning {'off' if args.no_malloc_tuning else 'on'}; "
          f"cluster start-up {startup:.2f} s (not counted)")
    for kind in args.data.split(","):
        for how in ("forked", "dask"):
            r = results[f"{kind}/{how}"]
            print(f"  {kind:<10} {how:<7} full {r['full_median_s']:7.3f} s "
                  f"(CPU {r['full_cpu_median_s']:6.3f} s)   incremental "
                  f"{r['incremental_median_s']:7.3f} s "
                  f"(CPU {r['incremental_cpu_median_s']:6.3f} s)")
        ratio = results[f"{kind}/ratio"]
        print(f"  {kind:<10} dask/forked: full {ratio['full']:.2f}x "
              f"(CPU {ratio['full_cpu']:.2f}x), incremental {ratio['incremental']:.2f}x "
              f"(CPU {ratio['incremental_cpu']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
