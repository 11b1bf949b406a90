"""The *ext4db* data set: a real file system and a real database, changed day by day.

Most data a backup tool meets is compressible file-system and database content,
which neither random disks nor the synthetic images of ``cbt.source.synth``
are.  This module makes, in a directory ``ROOT``, ``ROOT/day0`` ..
``ROOT/dayN``, each holding two disks:

- ``ext4.img``: an ext4 file system (``mke2fs -t ext4 -d``) holding real
  files of this machine;
- ``app.sqlite``: a SQLite database with indexes (Python's ``sqlite3``).

Every step is reproducible from the recipe (:func:`recipe`): the seeds, the
sizes, and the directory tree the files come from (its roots, file count,
bytes, and a digest of every file's path, size and mtime, so a set made from a
tree that has changed since is rebuilt).  File times inside the image are the
ones written on the day (as on a real system); everything else follows the
seeds.

1. The tree: each of :data:`ROOTS` that exists (``/usr/share``, ``/usr/lib``)
   is walked in sorted order, and its first files (regular files and
   symlinks) up to an equal share of :data:`FILL` of the image's size go into
   day 0.  The files that follow in the same walks are held back: later days
   add them (step 3d, 3e).
2. Day 0 image: the chosen files are copied into a staging directory, and
   ``mke2fs -t ext4 -d STAGING`` makes the image from it (a fixed UUID, hash
   seed and creation time).  ``e2fsck -fn`` checks it.
3. Day n (n >= 1) image: a sparse copy of day n-1, attached to a loop device
   (``losetup``) and mounted; then, with the day's seed, as a system would
   change it in a day:
   a. deletes :data:`DELETE` of its files;
   b. modifies :data:`MODIFY` of its files (non-empty ones) in place: one to
      four 4 KiB pages each rewritten with log text, the size unchanged;
   c. appends log lines to :data:`APPEND` of its files and to a growing
      ``var/log/syslog``;
   d. adds new files: the next held-back files (:data:`ADD` of the image's
      size) into ``home/user/dayN/``, plus one incompressible download
      (:data:`DOWNLOAD` of the image's size);
   e. copies in a directory tree: the next held-back files (:data:`TREE` of
      the image's size, in walk order, so whole directories; a file too big
      for what is left of the share is passed over) into ``opt/dayN/``.
   Then ``sync``, unmount and detach (always, in ``finally``), and ``e2fsck
   -fn``.
4. Day 0 database: tables ``documents`` (long text, an archive that only
   grows: first in the file, so a VACUUM leaves its pages where they were),
   ``customers``, ``orders`` and ``events`` (text, JSON and numbers from the
   seed; four indexes) filled in batches until the file reaches 90% of its
   size, then ``VACUUM`` (as a database last vacuumed some days ago).
5. Day n database: a copy of day n-1, then, in one transaction: updates
   (:data:`DB_UPDATE` of the orders, a status and total, and of the customers,
   their email), deletes (the oldest :data:`DB_PRUNE` of the events, as log
   retention does, and :data:`DB_DELETE` of the orders at random), inserts
   (:data:`DB_INSERT` new rows in every table); then ``VACUUM``, which
   rewrites every page after the first changed row (about half of the file).
   The exact numbers are in ``ROOT/dayN/changes.json``.

Needs root (loop devices, mount), ``mke2fs``, ``e2fsck``, ``losetup``,
``mount``.  Used by ``bench/race.py --sets ext4db`` and ``bench/peers.py
--ext4db``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness

from cbt.source.synth import copy_sparse

FORMAT = 3  # bump when the way the set is made changes
ROOTS = ("/usr/share", "/usr/lib")
FILL = 0.55  # share of the image's size taken by day 0's files
DELETE, MODIFY, APPEND = 0.01, 0.01, 0.005  # shares of the image's files, per day
ADD, TREE, DOWNLOAD = 0.01, 0.02, 0.005  # shares of the image's size, per day
DB_UPDATE, DB_PRUNE, DB_DELETE, DB_INSERT = 0.03, 0.05, 0.01, 0.04  # shares of rows
UUID = "c0ffee00-0000-4000-8000-00000000cb17"
FAKE_TIME = "1767225600"  # 2026-01-01, mke2fs's creation time
IMAGE, DATABASE = "ext4.img", "app.sqlite"
PAGE = 4096


class SetError(Exception):
    """A tool failed or the machine lacks what the set needs: one line."""


# --------------------------------------------------------------------------- the tree

def _walk(root: str) -> Iterator[tuple[str, int]]:
    """(path, bytes) of the regular files and symlinks under ``root``, sorted walk."""
    for d, dirs, names in os.walk(root):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(d, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if os.path.islink(p):
                yield p, 0
            elif os.path.isfile(p) and os.access(p, os.R_OK):
                yield p, st.st_size


def tree(fs_size: int, days: int) -> tuple[list[str], list[str]]:
    """(day-0 files, held-back files), in walk order, from :data:`ROOTS`."""
    roots = [r for r in ROOTS if os.path.isdir(r)]
    if not roots:
        raise SetError(f"none of {', '.join(ROOTS)} is a directory")
    day0: list[str] = []
    held: list[str] = []
    share = int(fs_size * FILL) // len(roots)
    spare = int(fs_size * (ADD + TREE) * days * 3) // len(roots) + (1 << 20)
    for r in roots:
        used = 0
        for p, n in _walk(r):
            if used + n <= share:
                day0.append(p)
            elif used - share < spare:
                held.append(p)
            else:
                break
            used += n
    return day0, held


def _digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = os.lstat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def recipe(fs_size: int, db_size: int, days: int = 1, seed: int = 17) -> dict[str, Any]:
    """What the set is made from: any change here rebuilds it."""
    day0, held = tree(fs_size, days)
    return {"format": FORMAT, "kind": "ext4db", "fs_size": fs_size, "db_size": db_size,
            "days": days, "seed": seed, "tree": {
                "roots": [r for r in ROOTS if os.path.isdir(r)],
                "files": len(day0), "bytes": sum(os.lstat(p).st_size for p in day0),
                "held_back": len(held), "digest": _digest(day0 + held)}}


# --------------------------------------------------------------------------- tools

def _run(argv: list[str], **env: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, check=False,
                       env={**os.environ, **env} if env else None)
    if r.returncode != 0:
        raise SetError(f"{' '.join(argv)} exited {r.returncode}: "
                       f"{(r.stderr or r.stdout).strip()[-300:]}")
    return r.stdout


def fsck(image: Path) -> None:
    """``e2fsck -fn``: the image is clean (exit 0), or :class:`SetError`."""
    _run(["e2fsck", "-fn", str(image)])


@contextlib.contextmanager
def mounted(image: Path) -> Iterator[Path]:
    """``image`` on a loop device, mounted on a fresh directory; always undone."""
    mnt = Path(tempfile.mkdtemp(prefix="cbt-ext4db-"))
    dev = _run(["losetup", "--find", "--show", str(image)]).strip()
    try:
        _run(["mount", "-t", "ext4", dev, str(mnt)])
        try:
            yield mnt
        finally:
            for _ in range(50):
                if subprocess.run(["umount", str(mnt)], capture_output=True,
                                  check=False).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                raise SetError(f"cannot unmount {mnt}")
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def _copy_in(paths: list[str], dest: Path, strip: str | None = None) -> int:
    """Copy ``paths`` (symlinks as symlinks) under ``dest``, keeping their paths
    (less ``strip``); returns the bytes copied."""
    total = 0
    for p in paths:
        rel = os.path.relpath(p, strip) if strip else p.lstrip("/")
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if os.path.islink(p):
            with contextlib.suppress(FileExistsError):
                os.symlink(os.readlink(p), out)
        else:
            shutil.copy2(p, out)
            total += out.stat().st_size
    return total


# --------------------------------------------------------------------------- the image

def make_image(path: Path, fs_size: int, files: list[str]) -> None:
    """Step 2: ``mke2fs -t ext4 -d`` from a staging copy of ``files``."""
    staging = Path(tempfile.mkdtemp(prefix="cbt-ext4db-staging-", dir=path.parent))
    try:
        _copy_in(files, staging)
        path.unlink(missing_ok=True)
        _run(["mke2fs", "-q", "-F", "-t", "ext4", "-U", UUID, "-E", f"hash_seed={UUID}",
              "-L", "ext4db", "-d", str(staging), str(path), f"{fs_size // 1024}k"],
             E2FSPROGS_FAKE_TIME=FAKE_TIME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsck(path)


def _log_lines(rng: random.Random, n: int) -> bytes:
    words = ("started", "stopped", "session", "user", "root", "connection", "from",
             "closed", "accepted", "publickey", "timeout", "error", "warning", "disk",
             "backup", "cron", "job", "finished", "status=0", "pid", "kernel", "eth0")
    out = []
    size = 0
    while size < n:
        line = (f"Jan {rng.randint(1, 28):2d} {rng.randint(0, 23):02d}:"
                f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} host "
                f"{rng.choice(('sshd', 'cron', 'systemd', 'kernel', 'nginx'))}"
                f"[{rng.randint(100, 99999)}]: "
                + " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "\n")
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:n]


def _files_in(mnt: Path) -> list[Path]:
    return sorted(Path(d) / n for d, _dirs, names in os.walk(mnt)
                  if not Path(d).is_relative_to(mnt / "lost+found")
                  for n in names if (Path(d) / n).is_file()
                  and not (Path(d) / n).is_symlink())


def _take(held: list[str], start: int, budget: int) -> tuple[list[str], int]:
    """The held-back files from ``start`` that fit in ``budget`` bytes (one too big
    for what is left is passed over); the next start."""
    out, used, i = [], 0, start
    while i < len(held) and used < budget * 0.95:
        n = os.lstat(held[i]).st_size
        if used + n <= budget:
            out.append(held[i])
            used += n
        i += 1
    return out, i


def change_image(mnt: Path, day: int, rng: random.Random, fs_size: int,
                 held: list[str], start: int) -> tuple[dict[str, Any], int]:
    """Step 3: one day's changes to the mounted file system; returns what was
    done and where the held-back files continue."""
    files = _files_in(mnt)
    k = len(files)
    picks = rng.sample(files, min(k, round(k * DELETE) + round(k * APPEND)))
    deleted, appended = picks[:round(k * DELETE)], picks[round(k * DELETE):]
    taken = set(picks)  # an empty file has no page to rewrite:
    rest = [p for p in files if p not in taken and p.stat().st_size > 0]
    modified = rng.sample(rest, min(len(rest), round(k * MODIFY)))
    for p in deleted:
        p.unlink()
    pages = 0
    for p in modified:
        size = p.stat().st_size
        with open(p, "r+b") as f:
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(0, size) // PAGE * PAGE
                data = _log_lines(rng, min(PAGE, size - at))
                f.seek(at)
                f.write(data)
                pages += 1
    log_bytes = 0
    syslog = mnt / "var" / "log" / "syslog"
    syslog.parent.mkdir(parents=True, exist_ok=True)
    for p in [*appended, syslog]:
        data = _log_lines(rng, rng.randint(256, 8192) if p != syslog
                          else max(fs_size // 1000, PAGE))
        with open(p, "ab") as f:
            f.write(data)
        log_bytes += len(data)
    added, start = _take(held, start, int(fs_size * ADD))
    add_bytes = _copy_in(added, mnt / "home" / "user" / f"day{day}")
    download = mnt / "home" / "user" / f"day{day}" / "download.bin"
    download.parent.mkdir(parents=True, exist_ok=True)
    download.write_bytes(rng.randbytes(int(fs_size * DOWNLOAD)))
    copied, start = _take(held, start, int(fs_size * TREE))
    tree_bytes = _copy_in(copied, mnt / "opt" / f"day{day}")
    os.sync()
    return {"files_before": k, "deleted": len(deleted), "modified": len(modified),
            "pages_rewritten": pages, "appended": len(appended) + 1,
            "appended_bytes": log_bytes, "added": len(added) + 1,
            "added_bytes": add_bytes + int(fs_size * DOWNLOAD),
            "tree_files": len(copied), "tree_bytes": tree_bytes}, start


# --------------------------------------------------------------------------- the database

SCHEMA = """
CREATE TABLE documents(id INTEGER PRIMARY KEY, title TEXT, author TEXT, created INTEGER,
                       body TEXT);
CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT, email TEXT, city TEXT,
                       created INTEGER, notes TEXT);
CREATE TABLE orders(id INTEGER PRIMARY KEY, customer_id INTEGER, created INTEGER,
                    status TEXT, total REAL, items TEXT);
CREATE TABLE events(id INTEGER PRIMARY KEY, ts INTEGER, kind TEXT, customer_id INTEGER,
                    payload TEXT);
CREATE INDEX customers_email ON customers(email);
CREATE INDEX orders_customer ON orders(customer_id, created);
CREATE INDEX orders_status ON orders(status);
CREATE INDEX events_ts ON events(ts);
"""
TABLES = ("documents", "customers", "orders", "events")
_WORDS = ("alpha", "bravo", "delta", "order", "shipped", "pending", "invoice", "paid",
          "north", "south", "east", "west", "street", "road", "blue", "green", "small",
          "large", "widget", "gadget", "refund", "review", "login", "logout", "search",
          "cart", "checkout", "page", "view", "click", "mobile", "desktop")
_CITIES = ("Lisbon", "Oslo", "Lyon", "Turin", "Ghent", "Porto", "Krakow", "Leeds", "Graz")
_STATUS = ("new", "paid", "shipped", "delivered", "returned", "cancelled")


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(_WORDS, k=rng.randint(lo, hi)))


def _customer(rng: random.Random, i: int) -> tuple[Any, ...]:
    name = f"{rng.choice(_WORDS).title()} {rng.choice(_WORDS).title()}{i % 97}"
    return (i, name, f"user{i}.{rng.randint(0, 9999)}@example.org", rng.choice(_CITIES),
            1_600_000_000 + i * 17, _text(rng, 0, 20))


def _order(rng: random.Random, i: int, customers: int) -> tuple[Any, ...]:
    return (i, rng.randint(1, max(customers, 1)), 1_600_000_000 + i * 5,
            rng.choice(_STATUS), round(rng.uniform(1, 900), 2), _text(rng, 3, 30))


def _event(rng: random.Random, i: int, customers: int) -> tuple[Any, ...]:
    payload = json.dumps({"page": rng.choice(_WORDS), "ms": rng.randint(1, 3000),
                          "ua": rng.choice(("mobile", "desktop")), "q": _text(rng, 1, 12)})
    return (i, 1_600_000_000 + i * 3, rng.choice(_WORDS), rng.randint(1, max(customers, 1)),
            payload)


def _document(rng: random.Random, i: int) -> tuple[Any, ...]:
    paras = "\n\n".join(_text(rng, 20, 120).capitalize() + "."
                         for _ in range(rng.randint(2, 12)))
    return (i, _text(rng, 2, 8).title(), f"{rng.choice(_WORDS).title()} {i % 211}",
            1_500_000_000 + i * 97, paras)


def _insert(db: sqlite3.Connection, rng: random.Random, counts: dict[str, int],
            new: dict[str, int]) -> None:
    """``new[table]`` rows after the highest id in ``counts`` (updated)."""
    top = {t: db.execute(f"SELECT coalesce(max(id), 0) FROM {t}").fetchone()[0]
           for t in TABLES}
    c = top["customers"] + new["customers"]
    db.executemany("INSERT INTO documents VALUES (?,?,?,?,?)",
                   (_document(rng, top["documents"] + j + 1) for j in range(new["documents"])))
    db.executemany("INSERT INTO customers VALUES (?,?,?,?,?,?)",
                   (_customer(rng, top["customers"] + j + 1) for j in range(new["customers"])))
    db.executemany("INSERT INTO orders VALUES (?,?,?,?,?,?)",
                   (_order(rng, top["orders"] + j + 1, c) for j in range(new["orders"])))
    db.executemany("INSERT INTO events VALUES (?,?,?,?,?)",
                   (_event(rng, top["events"] + j + 1, c) for j in range(new["events"])))
    for t in TABLES:
        counts[t] += new[t]


def make_database(path: Path, db_size: int, rng: random.Random) -> dict[str, int]:
    """Step 4; returns the row counts."""
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.executescript(SCHEMA)
        counts = dict.fromkeys(TABLES, 0)
        batch = {"documents": 250, "customers": 500, "orders": 2000, "events": 3000}
        while True:
            db.execute("BEGIN")
            _insert(db, rng, counts, batch)
            db.execute("COMMIT")
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            if pages * db.execute("PRAGMA page_size").fetchone()[0] >= db_size * 0.9:
                break  # the VACUUM packs the pages closer
        db.execute("VACUUM")
    finally:
        db.close()
    return counts


def _ids(db: sqlite3.Connection, table: str) -> list[int]:
    return [r[0] for r in db.execute(f"SELECT id FROM {table} ORDER BY id")]


def change_database(path: Path, rng: random.Random) -> dict[str, Any]:
    """Step 5: one day's updates, deletes and inserts, then VACUUM."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        before = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        orders, customers = _ids(db, "orders"), _ids(db, "customers")
        events = _ids(db, "events")
        db.execute("BEGIN")
        upd_o = rng.sample(orders, round(len(orders) * DB_UPDATE))
        db.executemany("UPDATE orders SET status = ?, total = total + 1 WHERE id = ?",
                       ((rng.choice(_STATUS), i) for i in upd_o))
        upd_c = rng.sample(customers, round(len(customers) * DB_UPDATE))
        db.executemany("UPDATE customers SET email = ? WHERE id = ?",
                       ((f"changed{i}.{rng.randint(0, 9999)}@example.net", i) for i in upd_c))
        pruned = events[:round(len(events) * DB_PRUNE)]
        if pruned:
            db.execute("DELETE FROM events WHERE id <= ?", (pruned[-1],))
        del_o = rng.sample(orders, round(len(orders) * DB_DELETE))
        db.executemany("DELETE FROM orders WHERE id = ?", ((i,) for i in del_o))
        counts = {t: before[t] - {"events": len(pruned), "orders": len(del_o)}.get(t, 0)
                  for t in TABLES}
        new = {t: round(before[t] * DB_INSERT) for t in TABLES}
        _insert(db, rng, counts, new)
        db.execute("COMMIT")
        db.execute("VACUUM")
    finally:
        db.close()
    return {"rows_before": before, "updated": {"orders": len(upd_o),
                                               "customers": len(upd_c)},
            "deleted": {"events": len(pruned), "orders": len(del_o)}, "inserted": new,
            "rows_after": counts}


# --------------------------------------------------------------------------- the set

def check_machine() -> None:
    """:class:`SetError` unless this process can make the set (root, the tools)."""
    if os.geteuid() != 0:
        raise SetError("the ext4db set needs root (a loop device and mount)")
    for tool in ("mke2fs", "e2fsck", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            raise SetError(f"the ext4db set needs {tool} (apt-get install e2fsprogs "
                           "util-linux mount)")


def build(root: Path, r: dict[str, Any]) -> None:
    """Make ``root/day0`` .. ``root/dayN`` from recipe ``r`` (:func:`recipe`); any
    half-made set is removed on failure."""
    check_machine()
    try:
        _build(root, r)
    except (OSError, sqlite3.Error) as exc:  # a file gone from the tree, a full disk
        shutil.rmtree(root, ignore_errors=True)
        raise SetError(f"making the ext4db set in {root}: {exc}") from exc
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _finish(day: Path, changes: dict[str, Any]) -> None:
    """The day's disks on disk (fsync), and what was done to them."""
    for p in (day / IMAGE, day / DATABASE):
        harness.fsync_path(p)
    (day / "changes.json").write_text(json.dumps(changes, indent=1) + "\n")


def _build(root: Path, r: dict[str, Any]) -> None:
    day0, held = tree(r["fs_size"], r["days"])
    if _digest(day0 + held) != r["tree"]["digest"]:
        raise SetError("the directory tree changed while the set was being made")
    shutil.rmtree(root, ignore_errors=True)
    d0 = root / "day0"
    d0.mkdir(parents=True)
    started = time.perf_counter()
    make_image(d0 / IMAGE, r["fs_size"], day0)
    counts = make_database(d0 / DATABASE, r["db_size"], random.Random(r["seed"]))
    _finish(d0, {"rows": counts})
    harness.log(f"  day 0: {len(day0)} files in {IMAGE}, {counts} rows in {DATABASE} "
                f"({time.perf_counter() - started:.1f} s)")
    start = 0
    for day in range(1, r["days"] + 1):
        prev, cur = root / f"day{day - 1}", root / f"day{day}"
        cur.mkdir()
        rng = random.Random(r["seed"] * 1000 + day)
        copy_sparse(prev / IMAGE, cur / IMAGE)
        with mounted(cur / IMAGE) as mnt:
            fs, start = change_image(mnt, day, rng, r["fs_size"], held, start)
        fsck(cur / IMAGE)
        shutil.copyfile(prev / DATABASE, cur / DATABASE)
        db = change_database(cur / DATABASE, rng)
        _finish(cur, {"ext4": fs, "db": db})
        harness.log(f"  day {day}: {fs}; {db['rows_after']} rows")
