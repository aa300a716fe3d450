"""The boot check's early fingerprint (updater/install/_boot.py ``EarlyFingerprint``): the
slot ``current`` names is hashed on a thread while the TPM library loads; its entries are
used only if the slot's tree did not change since, else the slot is hashed again. The disk
is the attacker: it changes, swaps or plants things between the early hash and its use."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from modelward.trust._fingerprint import directory_entries, slot_fingerprint
from modelward.trust._record import ModelRef
from modelward.updater.install import _boot
from modelward.updater.install._boot import EarlyFingerprint, slot_matches, tree_state
from modelward.updater.install._slots import SlotStore


def _device(tmp: Path) -> tuple[Path, ModelRef]:
    state = tmp / "state"
    for slot in ("a", "b"):
        d = state / "slots" / slot
        d.mkdir(parents=True, mode=0o750)
        os.chmod(d, 0o750)  # noqa: S103 - the mode the agent gives a slot
        for name, data in (("manifest.json", b"{}"), ("model.onnx", slot.encode() * 5000)):
            (d / name).write_bytes(data)
            os.chmod(d / name, 0o640)
    os.chmod(state / "slots", 0o750)  # noqa: S103 - as the agent makes it
    os.symlink("slots/a", state / "current")
    fp = slot_fingerprint(directory_entries(state / "slots" / "a"))
    return state, ModelRef("m", "1.0.0", fp, "a")


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths :func:`directory_entries` is called for, in ``_boot``."""
    seen: list[Path] = []

    def spy(root: Path, *a: object, **k: object) -> list[object]:
        seen.append(Path(root))
        return directory_entries(root)  # type: ignore[no-any-return]

    monkeypatch.setattr(_boot, "directory_entries", spy)
    return seen


def test_i15_early_entries_are_used_when_nothing_changed(tmp_path: Path,
                                                         hashed: list[Path]) -> None:
    state, ref = _device(tmp_path)
    early = EarlyFingerprint(state)
    assert slot_matches(SlotStore(state), ref, early) == (True, ref.fingerprint)
    assert hashed == [state / "slots" / "a"]  # once, early: not again at the check
    assert sys.getswitchinterval() == pytest.approx(0.005)  # (put back)


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


def _swap_slots_dir(state: Path) -> None:
    (state / "slots").rename(state / "real-slots")
    os.symlink("real-slots", state / "slots")


def _chmod(state: Path) -> None:
    os.chmod(state / "slots" / "a" / "model.onnx", 0o666)  # noqa: S103 - the attack


@pytest.mark.parametrize("attack", [_rewrite, _replace_by_link, _fifo, _chmod])
def test_i15_a_change_after_the_early_hash_is_seen(tmp_path: Path, hashed: list[Path],
                                                   attack: object) -> None:
    state, ref = _device(tmp_path)
    early = EarlyFingerprint(state)
    early.close()  # (hashed early, before the disk acts)
    attack(state)  # type: ignore[operator]
    ok, fp = slot_matches(SlotStore(state), ref, early)
    assert not ok and fp != ref.fingerprint
    assert hashed == [state / "slots" / "a"] * 2  # hashed again, as without the head start


def test_i15_slots_swapped_for_a_link_after_the_early_hash(tmp_path: Path) -> None:
    from modelward.updater.errors import StateDirError

    state, ref = _device(tmp_path)
    early = EarlyFingerprint(state)
    early.close()
    _swap_slots_dir(state)
    assert early.entries("a") is None
    with pytest.raises(StateDirError):  # (the check itself refuses a linked slots/)
        slot_matches(SlotStore(state), ref, early)


def test_i15_nothing_is_hashed_early_through_a_link(tmp_path: Path, hashed: list[Path]) -> None:
    state, _ = _device(tmp_path)
    _swap_slots_dir(state)
    EarlyFingerprint(state).close()
    (state / "real-slots" / "a").rename(state / "elsewhere")
    os.symlink("../elsewhere", state / "real-slots" / "a")
    os.unlink(state / "slots")
    os.rename(state / "real-slots", state / "slots")
    EarlyFingerprint(state).close()  # slot a is now a link
    cur = state / "current"
    cur.unlink()
    os.symlink(str(state / "elsewhere"), cur)  # `current` outside the state dir
    EarlyFingerprint(state).close()
    assert hashed == []


def test_i15_another_slot_than_the_records_is_not_used(tmp_path: Path,
                                                       hashed: list[Path]) -> None:
    state, ref = _device(tmp_path)
    cur = state / "current"
    cur.unlink()
    os.symlink("slots/b", cur)  # the disk points `current` at the other slot
    early = EarlyFingerprint(state)
    assert slot_matches(SlotStore(state), ref, early)[0]
    assert hashed == [state / "slots" / "b", state / "slots" / "a"]


def test_i15_an_early_failure_only_loses_the_head_start(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    state, ref = _device(tmp_path)

    def boom(*a: object) -> None:
        raise RuntimeError("no thread for you")

    monkeypatch.setattr(_boot, "tree_state", boom)
    early = EarlyFingerprint(state)
    early.close()
    monkeypatch.undo()
    assert early.entries("a") is None
    assert slot_matches(SlotStore(state), ref, early)[0]


def test_i15_tree_state_is_bounded_and_sees_renames(tmp_path: Path) -> None:
    state, _ = _device(tmp_path)
    before = tree_state(state / "slots", "a")
    assert before is not None and len(before) == 4  # slots/, a/, two files
    (state / "slots" / "a" / "model.onnx").rename(state / "slots" / "a" / "m2")
    (state / "slots" / "a" / "m2").rename(state / "slots" / "a" / "model.onnx")
    assert tree_state(state / "slots", "a") != before  # (ctime moved: renamed and back)
    many = state / "slots" / "a" / "d"
    many.mkdir()
    for i in range(300):
        (many / str(i)).touch()
    assert tree_state(state / "slots", "a") is None


# --- the disk during the early hash itself ------------------------------------------------


def test_i15_a_file_grown_while_the_early_threads_hash_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two leaves, hashed on two threads; the disk appends while the first is read: the
    early entries are not used (the tree changed), and the check's own hash sees the
    grown file, which no longer matches."""
    from modelward.trust import _fingerprint as fpmod

    state, _ = _device(tmp_path)
    big = state / "slots" / "a" / "model.onnx"
    big.write_bytes(b"\x01" * (fpmod.LEAF_SIZE + 1))
    ref = ModelRef("m", "1.0.0", slot_fingerprint(directory_entries(big.parent)), "a")
    real, grown = fpmod._read_leaf, threading.Event()

    def grow_once(fd: int, offset: int, length: int, buf: bytearray) -> bytes:
        if not grown.is_set():
            grown.set()
            with open(big, "ab") as f:
                f.write(b"\x02")
        return real(fd, offset, length, buf)

    monkeypatch.setattr(fpmod, "_read_leaf", grow_once)
    early = EarlyFingerprint(state)
    early.close()
    monkeypatch.undo()
    assert grown.is_set()
    assert early.entries("a") is None
    ok, fp = slot_matches(SlotStore(state), ref, early)
    assert not ok and fp == slot_fingerprint(directory_entries(big.parent))


def test_i15_a_planted_sparse_giant_is_not_read_early(tmp_path: Path) -> None:
    from modelward.trust._fingerprint import MAX_FILE_BYTES

    state, ref = _device(tmp_path)
    with open(state / "slots" / "a" / "giant", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # (sparse: no block written)
    os.chmod(state / "slots" / "a" / "giant", 0o640)
    early = EarlyFingerprint(state)
    entries = early.entries("a")
    assert entries is not None
    assert [e for e in entries if e.path == "giant"][0].size == -1  # never read, never a match
    assert not slot_matches(SlotStore(state), ref, early)[0]
