"""The boot check hashes the slot it checks when it checks it (fix 17 removed issue 15's
early hash and its reuse on unchanged timestamps). The disk is the attacker: it changes,
swaps or plants things before the check; each change is seen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelward.trust._fingerprint import directory_entries, slot_fingerprint
from modelward.updater.errors import StateDirError
from modelward.updater.install import _boot
from modelward.updater.install._boot import slot_matches
from modelward.updater.install._slots import SlotStore
from tests.unit.test_a17_early_mmap import _device


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths :func:`directory_entries` is called for, in ``_boot``."""
    seen: list[Path] = []

    def spy(root: Path, *a: object, **k: object) -> list[object]:
        seen.append(Path(root))
        return directory_entries(root)  # type: ignore[no-any-return]

    monkeypatch.setattr(_boot, "directory_entries", spy)
    return seen


def _rewrite(state: Path) -> None:
    p = state / "slots" / "a" / "model.onnx"
    data = p.read_bytes()
    with open(p, "r+b") as f:  # same inode, same size, one byte changed
        f.write(b"X" + data[1:2])


def _replace_by_link(state: Path) -> None:
    p = state / "slots" / "a" / "model.onnx"
    copy = state.parent / "copy.onnx"
    copy.write_bytes(p.read_bytes())
    p.unlink()
    p.symlink_to(copy)


def _fifo(state: Path) -> None:
    os.mkfifo(state / "slots" / "a" / "extra")


def _chmod(state: Path) -> None:
    os.chmod(state / "slots" / "a" / "model.onnx", 0o666)  # noqa: S103 - the attack


@pytest.mark.parametrize("attack", [_rewrite, _replace_by_link, _fifo, _chmod])
def test_i15_a_change_after_the_early_hash_is_seen(tmp_path: Path, hashed: list[Path],
                                                   attack: object) -> None:
    state, ref = _device(tmp_path)
    assert slot_matches(SlotStore(state), ref)[0]  # (a boot before the disk acts)
    attack(state)  # type: ignore[operator]
    ok, fp = slot_matches(SlotStore(state), ref)
    assert not ok and fp != ref.fingerprint
    assert hashed == [state / "slots" / "a"] * 2  # hashed at each check


def test_i15_slots_swapped_for_a_link_is_refused(tmp_path: Path) -> None:
    state, ref = _device(tmp_path)
    (state / "slots").rename(state / "real-slots")
    os.symlink("real-slots", state / "slots")
    with pytest.raises(StateDirError):
        slot_matches(SlotStore(state), ref)


def test_i15_another_slot_than_the_records_is_not_read(tmp_path: Path,
                                                       hashed: list[Path]) -> None:
    state, ref = _device(tmp_path)
    cur = state / "current"
    cur.unlink()
    os.symlink("slots/b", cur)  # the disk points `current` at the other slot
    assert slot_matches(SlotStore(state), ref)[0]
    assert hashed == [state / "slots" / "a"]


def test_i15_a_planted_sparse_giant_is_not_read(tmp_path: Path) -> None:
    from modelward.trust._fingerprint import MAX_FILE_BYTES

    state, ref = _device(tmp_path)
    with open(state / "slots" / "a" / "giant", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # (sparse: no block written)
    os.chmod(state / "slots" / "a" / "giant", 0o640)
    entries = directory_entries(state / "slots" / "a")
    assert [e for e in entries if e.path == "giant"][0].size == -1  # never read, never a match
    assert not slot_matches(SlotStore(state), ref)[0]
    assert slot_fingerprint(entries) != ref.fingerprint
