"""SlotStore.move_back: slots found swapped are put back by rename, never copied."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelward.updater.install import _slots
from modelward.updater.install._slots import SlotStore


def _slots_with(tmp_path: Path, a: str | None, b: str | None) -> SlotStore:
    for name, content in (("a", a), ("b", b)):
        if content is not None:
            (tmp_path / "slots" / name).mkdir(parents=True)
            (tmp_path / "slots" / name / "f").write_text(content)
    (tmp_path / "slots").mkdir(exist_ok=True)
    return SlotStore(tmp_path)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "three-renames"])
def test_move_back_swaps_the_two_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(_slots, "_exchange_at", lambda fd, a, b: False)
    store = _slots_with(tmp_path, "prev", "active")
    (tmp_path / "slots" / ".swap").write_text("planted")  # removed, not followed
    ino = (tmp_path / "slots" / "b").stat().st_ino
    store.move_back("b", "a")
    assert (tmp_path / "slots" / "a" / "f").read_text() == "active"
    assert (tmp_path / "slots" / "b" / "f").read_text() == "prev"
    assert (tmp_path / "slots" / "a").stat().st_ino == ino  # renamed, not copied
    assert sorted(p.name for p in (tmp_path / "slots").iterdir() if p.name != ".swap") == [
        "a", "b"]


def test_move_back_into_a_missing_slot(tmp_path: Path) -> None:
    store = _slots_with(tmp_path, None, "active")
    store.move_back("b", "a")
    assert (tmp_path / "slots" / "a" / "f").read_text() == "active"
    assert not (tmp_path / "slots" / "b").exists()


def test_move_back_renames_a_planted_link_itself(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("operator data")
    store = _slots_with(tmp_path, None, "active")
    (tmp_path / "slots" / "a").symlink_to(outside)
    store.move_back("b", "a")
    assert (tmp_path / "slots" / "a" / "f").read_text() == "active"
    assert (tmp_path / "slots" / "b").is_symlink()
    assert (outside / "f").read_text() == "operator data"
