"""The disk attacker points ``current`` at the inactive slot and fills that slot with
planted sparse files (each at most ``MAX_FILE_BYTES``, 8 GiB, so each is read: about 2 s
per GiB on this machine, up to 257 of them): the early thread hashes the slot ``current``
names, and the boot check joins it before it looks at the record's slot. Before the early
hash the check never read the inactive slot while the active one matched; now the
attacker's slot held the boot check (``TimeoutStartSec=300``) and inference never started,
although the trusted model was intact. Fix 17: no early hash; the check reads the record's
slot only, and a slot's files are not read past ``MAX_SLOT_BYTES`` in total."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from modelward.trust import _fingerprint as fpmod
from modelward.trust._fingerprint import LEAF_SIZE, directory_entries
from modelward.updater.install import _boot
from modelward.updater.install._boot import slot_matches
from modelward.updater.install._slots import SlotStore
from tests.unit.test_a17_early_mmap import _device


def test_a17_the_check_does_not_wait_for_a_hash_of_the_other_slot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, ref = _device(tmp_path)
    (state / "current").unlink()
    (state / "current").symlink_to("slots/b")  # the attacker's choice
    hashing_b, release = threading.Event(), threading.Event()

    def slow_for_b(root: Path, *a: object, **k: object) -> list[object]:
        if Path(root).name == "b":  # stands in for hours of planted sparse files
            hashing_b.set()
            release.wait(30)
        return directory_entries(root)  # type: ignore[no-any-return]

    monkeypatch.setattr(_boot, "directory_entries", slow_for_b)
    got: list[tuple[bool, str]] = []
    try:
        t = threading.Thread(target=lambda: got.append(slot_matches(SlotStore(state), ref)),
                             daemon=True)
        t.start()
        t.join(3)  # slot a is tiny: its own hash takes milliseconds
        assert got == [(True, ref.fingerprint)]
        assert not hashing_b.is_set()  # the attacker's slot is never read
    finally:
        release.set()


def test_a17_planted_sparse_files_in_the_other_slot_are_each_read(tmp_path: Path) -> None:
    """What makes it long: the bound is per file, not per slot (sparse files of
    ``LEAF_SIZE * 2`` here, each hashed in full, all reported with their real sizes)."""
    state, _ = _device(tmp_path)
    for i in range(3):
        p = state / "slots" / "b" / f"pad{i}"
        with open(p, "wb") as f:
            f.truncate(2 * LEAF_SIZE)  # (no block written)
        os.chmod(p, 0o640)
    entries = directory_entries(state / "slots" / "b")
    assert sorted(e.size for e in entries if e.path.startswith("pad")) == [2 * LEAF_SIZE] * 3


def _sparse(d: Path, names: list[str], size: int) -> None:
    for name in names:
        with open(d / name, "wb") as f:
            f.truncate(size)  # (no block written)
        os.chmod(d / name, 0o640)


def test_a17_a_slot_past_the_total_bound_is_not_read_past_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attacker's next try: plant the sparse files in the record's own slot (which the
    check must read). The bytes read for one slot stop at ``MAX_SLOT_BYTES`` (no bundle
    holds more): each file that would take the total past it is an entry that never
    matches, and is not read (here the bound is 3 leaves, the files 2 leaves each)."""
    state, ref = _device(tmp_path)
    slot = state / "slots" / "a"
    _sparse(slot, ["pad0", "pad1", "pad2"], 2 * LEAF_SIZE)
    monkeypatch.setattr(fpmod, "MAX_SLOT_BYTES", 3 * LEAF_SIZE)
    read: list[int] = []
    real = fpmod._read_leaf

    def counted(fd: int, offset: int, length: int, buf: bytearray) -> bytes:
        read.append(length)
        return real(fd, offset, length, buf)

    monkeypatch.setattr(fpmod, "_read_leaf", counted)
    entries = {e.path: e.size for e in directory_entries(slot)}
    assert sum(read) <= 3 * LEAF_SIZE
    assert sorted(v for k, v in entries.items() if k.startswith("pad")) == \
        [-1, -1, 2 * LEAF_SIZE]
    assert slot_matches(SlotStore(state), ref)[0] is False


def test_a17_a_slot_of_exactly_the_total_bound_still_matches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound refuses nothing a bundle can hold: files totalling exactly it are read."""
    state, _ = _device(tmp_path)
    slot = state / "slots" / "a"
    _sparse(slot, ["pad0", "pad1"], 2 * LEAF_SIZE)
    total = sum(p.stat().st_size for p in slot.iterdir())
    monkeypatch.setattr(fpmod, "MAX_SLOT_BYTES", total)
    assert all(e.size >= 0 for e in directory_entries(slot))
    monkeypatch.setattr(fpmod, "MAX_SLOT_BYTES", total - 1)
    assert any(e.size < 0 for e in directory_entries(slot))


def test_a17_the_total_bound_covers_any_bundle() -> None:
    from modelward.updater._config import UpdaterConfig

    assert UpdaterConfig.__dataclass_fields__["max_bundle_bytes"].default <= \
        fpmod.MAX_SLOT_BYTES
