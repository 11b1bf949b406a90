"""Issue 12: the vault reads around a damaged point record.

The record stays where it is, its manifests stay its own (a backup's clean-up of
killed runs' leftovers must not take them), its name is never given to a new
point, and the points based on it are named as unavailable.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.damage import History, damage_record, pristine

from cbt.format.records import CorruptPointError


@pytest.fixture(params=[False, True], ids=["plain", "sealed"])
def h(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
      tmp_path: Path) -> History:
    return pristine(tmp_path_factory, request.param).clone(tmp_path / "h")


def test_records_points_and_the_damage_they_name(h: History) -> None:
    path = damage_record(h, h.web[2], "flip")
    vault = h.opened()
    good, damaged = vault.scan_records()
    assert sorted(r.id for r in good) == sorted([h.web[0], h.web[1], h.web[3], h.db])
    assert [d.where for d in damaged] == [str(path)]
    assert damaged[0].point == (None if h.encrypted else h.web[2])
    warnings: list[str] = []
    assert [p.id for p in vault.points("web", warnings)] == h.web[:2]
    assert len(warnings) == 2 and str(path) in warnings[0] and h.web[3] in warnings[1]
    assert vault.unavailable(good) == {h.web[3]: warnings[1]}
    assert vault.latest("web").id == h.web[1] == vault.point("web.latest").id
    # db's own listing names web's damage only where the file name cannot tell the VM
    warnings = []
    assert [p.id for p in vault.points("db", warnings)] == [h.db]
    assert len(warnings) == (1 if h.encrypted else 0)
    with pytest.raises(CorruptPointError, match=str(path)):
        vault.point(h.web[2])
    with pytest.raises(CorruptPointError, match=str(path)):
        vault.resolve(vault.point(h.web[3]), "os")


def test_a_damaged_records_manifests_are_no_leftovers(h: History) -> None:
    damage_record(h, h.web[3], "flip")
    vault = h.opened()
    folder = vault.manifest_dir(h.web[3])
    assert vault.storage.list(folder)
    assert not [n for n in vault.leftovers() if n.startswith(folder + "/")]
    # a backup (which removes leftovers first) keeps them
    vault.backup("web", [h.disks / "os.img", h.disks / "data.img"], workers=1)
    assert len(h.opened().storage.list(folder)) == 2


def test_a_new_point_never_takes_a_damaged_records_name(h: History) -> None:
    path = damage_record(h, h.web[3], "flip")
    damaged = path.read_bytes()
    created = h.opened().load_point(h.web[2]).created.replace("01-03", "01-04")
    vault = h.opened()
    assert vault.unused_point_id("web", created) == f"{h.web[3]}-2"
    p = vault.backup("web", [h.disks / "os.img", h.disks / "data.img"], workers=1,
                     created=created)
    assert p.id == f"{h.web[3]}-2"
    assert path.read_bytes() == damaged
    # it follows web[2], the latest point that can be read, on web[2]'s chain
    assert p.parent == h.web[2] and p.disk("os").base == h.web[2]
    assert any(h.web[2] in w for w in p.warnings), p.warnings
