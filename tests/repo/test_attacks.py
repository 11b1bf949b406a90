"""Attacks on an encrypted vault by someone who can write to it but holds no passphrase,
and by a careless user (the adversarial review of issue 11).

Each test replays one attack on a real vault and checks, without cbt, that it
fails cleanly: one line naming the file, exit 2, nothing written or deleted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import KIB
from helpers.cli import cbt, cbt_argv, clean_env
from helpers.images import fs_image
from helpers.vaults import PASSWORD, encrypted_env, fast_kdf, vault_state

import cbt as cbt_api
from cbt.core.crypto import KdfParams
from cbt.format.records import CorruptPointError
from cbt.repo.keys import BadKeySlotError, KeySlot


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An encrypted vault with two points of VM ``web``: built once, cloned per test."""
    root = tmp_path_factory.mktemp("attacks")
    fs_image(root / "os.img", 512 * KIB, 1)
    v = cbt_api.Vault.init(root / "vault", encryption="aes-256-gcm", passphrase=PASSWORD,
                           kdf=fast_kdf())
    for day in (1, 2):
        fs_image(root / "os.img", 512 * KIB, day)
        v.backup("web", [f"os={root / 'os.img'}"], block_size=64 * KIB, workers=1,
                 created=f"2026-01-0{day}T00:00:00Z")
    return root / "vault"


@pytest.fixture
def vault(sealed: Path, tmp_path: Path) -> Path:
    shutil.copytree(sealed, tmp_path / "vault", symlinks=True)
    return tmp_path / "vault"


def _downgrade(vault: Path) -> None:
    """The config rewritten to say ``none`` and ``keys/`` deleted: what an attacker who wants
    the next backups in the clear would do."""
    config = json.loads((vault / "config").read_text())
    config.update(format_version=1, encryption="none", id_key="none")
    del config["check"]
    (vault / "config").write_text(json.dumps(config))
    shutil.rmtree(vault / "keys")


@pytest.mark.parametrize("argv", [("list",), ("verify",), ("verify", "--repair"), ("gc",),
                                  ("backup", "--vm", "web", "IMAGE")])
def test_a_downgraded_config_is_refused_while_sealed_files_remain(vault: Path, tmp_path: Path,
                                                                   argv: tuple[str, ...]) -> None:
    _downgrade(vault)
    before = vault_state(vault)
    image = tmp_path / "web.img"
    fs_image(image, 512 * KIB, 3)
    args = [a if a != "IMAGE" else f"os={image}" for a in argv]
    r = cbt(args[0], vault, *args[1:], env=encrypted_env(tmp_path))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "config says unencrypted" in r.stderr and str(vault) in r.stderr
    assert vault_state(vault) == before  # no pack deleted, nothing written in the clear


@pytest.mark.parametrize("params", [(24, 32, 16), (22, 8, 16), (20, 32, 1), (21, 8, 1)])
def test_a_key_slot_asking_for_a_huge_scrypt_cost_is_refused_not_run(
        vault: Path, tmp_path: Path, params: tuple[int, int, int]) -> None:
    slot = next((vault / "keys").glob("*.json"))
    body = json.loads(slot.read_text())
    body.update(log_n=params[0], r=params[1], p=params[2])
    slot.write_text(json.dumps(body))
    with pytest.raises(BadKeySlotError, match=str(slot)):
        KeySlot.from_json(slot.read_bytes(), str(slot))
    r = cbt("list", vault, env=encrypted_env(tmp_path), timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"bad key slot {slot}" in r.stderr


def test_the_costliest_scrypt_allowed_runs(tmp_path: Path) -> None:
    """The bound is no lower than what ``cbt init --kdf-log-n`` offers: its highest cost is
    within what scrypt can run (its memory limit), checked without running it."""
    from cbt.cli.init_cmd import KDF_LOG_N_MAX

    top = KdfParams(log_n=KDF_LOG_N_MAX)
    top.check()
    assert top.maxmem < 2**31 - 1



# -- crafted files of an unencrypted vault (anyone can recompute their checksums) -----------


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.vaults import two_point_vault

    return two_point_vault(tmp_path_factory.mktemp("plain"))[0]


def test_a_segment_whose_version_is_no_number_is_named_not_a_traceback(plain: Path,
                                                                       tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    shutil.copytree(plain, vault)
    segment = sorted((vault / "index").glob("*.cbtidx"))[0]
    data = bytearray(segment.read_bytes())  # (the trailer's version: 96 bytes from the end)
    data[-96 + 8:-96 + 12] = b"\xff\xff\xff\x7f"
    segment.write_bytes(bytes(data))
    # issue 12: a damaged segment is named, and restore reads the packs' trailers instead
    r = cbt("restore", vault, "web.latest", "--to", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and str(segment) in r.stderr
    r = cbt("verify", vault, "--data")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and str(segment) in r.stderr


def _huge_delta(vault: Path, point: str, record_too: bool) -> Path:
    """The db delta of ``point`` rewritten to describe a 1 PiB disk (a few rows: the file
    stays small), its checksums recomputed; with ``record_too`` the record says so too."""
    import blake3
    from helpers.vaults import forge_record

    from cbt.format.manifest import Delta, read_manifest_bytes

    path = vault / "manifests" / point / "db.arrow"
    delta = read_manifest_bytes(path.read_bytes(), str(path))
    assert isinstance(delta, Delta)
    delta.disk_size = 1 << 50
    path.write_bytes(delta.to_bytes())
    digest = blake3.blake3(path.read_bytes()).hexdigest()

    def change(body: dict[str, object]) -> None:
        disks = body["disks"]
        assert isinstance(disks, list)
        db = next(d for d in disks if d["label"] == "db")
        db["manifest_checksum"] = digest
        if record_too:
            db.update(size=1 << 50, blocks=(1 << 50) // db["block_size"])

    forge_record(vault, point, change)
    return path


def _limited(*argv: object) -> subprocess.CompletedProcess[str]:
    """``cbt *argv`` with 4 GiB of address space: a 1 PiB disk's per-block arrays would be
    hundreds of GiB (fail, not swap)."""
    import resource

    limit = (4 << 30, 4 << 30)
    return subprocess.run(cbt_argv(*argv), capture_output=True, text=True, check=False,
                          env=clean_env(None), timeout=60,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, limit))


def test_a_delta_claiming_a_huge_disk_is_refused_not_allocated(plain: Path,
                                                               tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    shutil.copytree(plain, vault)
    points = sorted(p.stem for p in (vault / "points").glob("*.json"))
    path = _huge_delta(vault, points[1], record_too=False)
    before = vault_state(vault)
    for argv in (("restore", vault, points[1], "--to", tmp_path / "out"), ("verify", vault),
                 ("gc", vault), ("show", vault, points[1], "--manifest", "db", "-o",
                                 tmp_path / "m.arrow")):
        r = _limited(*argv)
        # issue 12: gc works beside a damaged point, keeping what its manifests name
        assert r.returncode == (0 if argv[0] == "gc" else 2), r.stderr
        assert "Traceback" not in r.stderr and str(path) in r.stderr
    assert vault_state(vault) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_point_of_a_huge_thin_disk_costs_its_rows_not_its_size(plain: Path,
                                                                 tmp_path: Path) -> None:
    """Record and delta agree on a 1 PiB disk holding a few blocks: memory follows the rows
    (nothing is allocated per block), so verify, gc and the export work in 4 GiB; a restore
    makes a 1 PiB sparse file where the file system allows one, else fails in one line
    naming the target, leaving nothing."""
    vault = tmp_path / "vault"
    shutil.copytree(plain, vault)
    points = sorted(p.stem for p in (vault / "points").glob("*.json"))
    _huge_delta(vault, points[1], record_too=True)
    for argv in (("verify", vault), ("gc", vault, "--dry-run"),
                 ("show", vault, points[1], "--manifest", "db", "-o", tmp_path / "m.arrow")):
        r = _limited(*argv)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (argv, r.stderr)
    assert (tmp_path / "m.arrow").stat().st_size < 1 << 20
    out = tmp_path / "out"
    r = _limited("restore", vault, points[1], "--to", out)
    assert "Traceback" not in r.stderr, r.stderr
    if r.returncode == 0:
        assert (out / "db.img").stat().st_size == 1 << 50
        assert (out / "db.img").stat().st_blocks * 512 < 1 << 30
    else:
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert "db.img" in r.stderr
        assert not any(out.iterdir())


def test_a_record_whose_time_is_no_time_is_corrupt_naming_its_file(plain: Path,
                                                                    tmp_path: Path) -> None:
    from helpers.vaults import forge_record

    vault = tmp_path / "vault"
    shutil.copytree(plain, vault)
    point = sorted(p.stem for p in (vault / "points").glob("*.json"))[0]
    path = forge_record(vault, point, lambda body: body.update(created="garbage"))
    with pytest.raises(CorruptPointError, match=str(path)):
        cbt_api.Vault.open(vault).load_point(point)
    path = forge_record(vault, point, lambda body: body.update(created="2026-01-01T02:00:00Z",
                                                             slot="soon"))
    with pytest.raises(CorruptPointError, match="slot 'soon'"):
        cbt_api.Vault.open(vault).load_point(point)


# -- permissions of what a vault command writes outside the vault ---------------------------


def test_show_manifest_output_is_0600_even_under_umask_0(vault: Path, tmp_path: Path) -> None:
    """The exported manifest holds the disk's path, label and the vault's block ids, which
    the encrypted vault hides: it is created 0600, like a restored image."""
    import os
    import stat

    out = tmp_path / "m.arrow"
    r = subprocess.run(cbt_argv("show", vault, "web.latest", "--manifest", "os", "-o", out),
                       capture_output=True, text=True, check=False,
                       env=clean_env(encrypted_env(tmp_path)), timeout=60,
                       preexec_fn=lambda: os.umask(0))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


# -- job records: what the next job of a VM does with a dead job's leftovers ---------------


def _job_config(root: Path, disk: Path) -> Path:
    cfg = root / "cbt.toml"
    cfg.write_text(f'vault = "vault"\n[policy.daily]\nschedule = "daily 02:00"\n'
                   f'instant_restore_days = 2\n[vm.web]\npolicy = "daily"\n'
                   f'disks = {{ os = "{disk}" }}\nsnapshot = "copy"\nsnapshot_dir = "snaps"\n')
    return cfg


@pytest.mark.parametrize("job_id", ["", "web", "web.2", "web.20200101T000000Z.000000"])
def test_a_forged_running_job_cannot_make_recovery_delete_other_snapshots(
        tmp_path: Path, job_id: str) -> None:
    """Recovery removes the snapshots a dead job left, found by the job's id in their names:
    a forged record of a ``running`` job whose id is short (``""`` is in every name) made
    it delete every kept snapshot of the VM, files on the host the vault does not own."""
    disk = tmp_path / "os.img"
    fs_image(disk, 512 * KIB, 1)
    cbt_api.Vault.init(tmp_path / "vault")
    cfg = _job_config(tmp_path, disk)
    r = cbt("backup", "--config", cfg)
    assert r.returncode == 0, r.stderr
    snaps = tmp_path / "snaps" / "web"
    kept = sorted(p.name for p in snaps.iterdir())
    assert kept  # the first job's snapshot, kept for instant restore
    (snaps / "other.2.img").write_bytes(b"not cbt's")
    record = {"id": job_id, "vm": "web", "policy": "daily", "start": "2026-01-01T00:00:00Z",
              "status": "running", "hook_pending": False}
    (tmp_path / "vault" / "jobs" / "web.20260101T000000Z.abcdef.json").write_text(
        json.dumps(record))
    fs_image(disk, 512 * KIB, 2)
    r = cbt("backup", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    left = {p.name for p in snaps.iterdir()}
    assert set(kept) <= left and "other.2.img" in left


# -- pack trailers: their checksum is unkeyed, in an encrypted vault too --------------------


def _reverse_trailer_offsets(pack: Path) -> None:
    """Rewrite a pack's trailer so each entry points at another blob, checksum recomputed."""
    import blake3
    import numpy as np

    from cbt.format import pack as pk

    b = bytearray(pack.read_bytes())
    count, _checksum, end = pk.FOOTER.unpack_from(b, len(b) - pk.FOOTER.size)
    start = len(b) - pk.FOOTER.size - count * pk.ENTRY.size
    entries = np.frombuffer(bytes(b[start:len(b) - pk.FOOTER.size]), dtype=pk.ENTRY_DTYPE).copy()
    entries["offset"] = entries["offset"][::-1].copy()
    trailer = entries.tobytes()
    b[start:len(b) - pk.FOOTER.size] = trailer
    b[len(b) - pk.FOOTER.size:] = pk.FOOTER.pack(count, blake3.blake3(trailer).digest(), end)
    pack.write_bytes(bytes(b))


def test_repair_after_a_lying_trailer_keeps_every_blob(vault: Path, tmp_path: Path) -> None:
    """A trailer pointing each entry into another blob, the index lost: repair indexed
    nothing from such a pack and moved it to quarantine (gc then freed what was left);
    the blob headers still say where every blob is."""
    for pack in (vault / "packs").glob("*/*.pack"):
        _reverse_trailer_offsets(pack)
    for segment in (vault / "index").iterdir():
        segment.unlink()
    env = encrypted_env(tmp_path)
    r = cbt("verify", vault, "--repair", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["repair"]["packs_quarantined"] == 0
    assert not (vault / "quarantine").exists() or not any((vault / "quarantine").iterdir())
    r = cbt("restore", vault, "web.latest", "--to", tmp_path / "out", env=env)
    assert r.returncode == 0, r.stderr
    fs_image(tmp_path / "truth.img", 512 * KIB, 2)
    assert (tmp_path / "out" / "os.img").read_bytes() == (tmp_path / "truth.img").read_bytes()


def test_a_job_record_of_wrong_types_is_skipped_not_a_traceback(tmp_path: Path) -> None:
    """``start`` a number among strings made sorting the history raise (cbt jobs, run-due
    and every job of the VM failed with a traceback): such a record is skipped, named."""
    disk = tmp_path / "os.img"
    fs_image(disk, 512 * KIB, 1)
    cbt_api.Vault.init(tmp_path / "vault")
    cfg = _job_config(tmp_path, disk)
    assert cbt("backup", "--config", cfg).returncode == 0
    job_id = "web.20260101T000000Z.abcdef"
    forged = tmp_path / "vault" / "jobs" / f"{job_id}.json"
    forged.write_text(json.dumps({"id": job_id, "vm": "web", "start": 5, "status": "running",
                                  "start_ns": "x", "pid": -1}))
    r = cbt("jobs", tmp_path / "vault", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    listed = json.loads(r.stdout)
    assert listed["jobs"] and job_id not in [j["id"] for j in listed["jobs"]]
    assert any(str(forged) in w for w in listed["warnings"])
    r = cbt("backup", "--config", cfg)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_a_kept_snapshot_record_whose_time_is_no_time_is_skipped_and_named(
        tmp_path: Path) -> None:
    """prune failed on it with 'not an ISO 8601 time', naming no file."""
    disk = tmp_path / "os.img"
    fs_image(disk, 512 * KIB, 1)
    cbt_api.Vault.init(tmp_path / "vault")
    cfg = _job_config(tmp_path, disk)
    assert cbt("backup", "--config", cfg).returncode == 0
    record = next((tmp_path / "vault" / "snapshots").glob("*.json"))
    body = json.loads(record.read_text())
    record.write_text(json.dumps({**body, "created": "garbage"}))
    kept = sorted((tmp_path / "snaps" / "web").iterdir())
    r = cbt("prune", "--config", cfg, "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert any(str(record) in w for w in json.loads(r.stdout)["warnings"])
    assert sorted((tmp_path / "snaps" / "web").iterdir()) == kept


# -- key slots someone added -------------------------------------------------------------


def _junk_slot(vault: Path, slot_id: str, params: KdfParams) -> None:
    import base64
    import os

    body = {"magic": "cbt-key", "id": slot_id, "created": "", "kdf": "scrypt",
            "log_n": params.log_n, "r": params.r, "p": params.p, "wrap": "aes-256-gcm",
            "salt": base64.b64encode(os.urandom(16)).decode(),
            "wrapped": base64.b64encode(os.urandom(60)).decode()}
    (vault / "keys" / f"{slot_id}.json").write_text(json.dumps(body))


def test_a_costly_slot_someone_added_is_tried_after_the_cheap_ones(vault: Path) -> None:
    """Unlocking tries every slot; one at the highest cost allowed (16 times the default's
    work), named to be listed first, cost every opening seconds before the real slot."""
    import time

    _junk_slot(vault, "0" * 16, KdfParams(log_n=17, r=8, p=16))
    start = time.monotonic()
    cbt_api.Vault.open(vault, passphrase=PASSWORD)
    assert time.monotonic() - start < 1.5


def test_a_vault_with_too_many_key_slots_is_refused(vault: Path, tmp_path: Path) -> None:
    from cbt.repo.vault import MAX_KEY_SLOTS

    for i in range(MAX_KEY_SLOTS):
        _junk_slot(vault, f"{i:016x}", KdfParams(log_n=10))
    r = cbt("list", vault, env=encrypted_env(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"more than {MAX_KEY_SLOTS}" in r.stderr and str(vault / "keys") in r.stderr
