"""The disk attacker points ``current`` at the inactive slot and fills that slot with
planted sparse files (each at most ``MAX_FILE_BYTES``, 8 GiB, so each is read: about 2 s
per GiB on this machine, up to 257 of them): the early thread hashes the slot ``current``
names, and the boot check joins it before it looks at the record's slot. Before the early
hash the check never read the inactive slot while the active one matched; now the
attacker's slot holds the boot check (``TimeoutStartSec=300``) and inference never starts,
although the trusted model is intact."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from modelward.trust._fingerprint import directory_entries
from modelward.updater.install import _boot
from modelward.updater.install._boot import EarlyFingerprint, slot_matches
from modelward.updater.install._slots import SlotStore
from tests.unit.test_a17_early_mmap import _device


@pytest.mark.xfail(strict=True, reason=(
    "EarlyFingerprint.entries (updater/install/_boot.py) joins the early thread even when "
    "it hashes another slot than the record's: a slot the attacker chose via `current` "
    "(up to 257 planted 8 GiB sparse files) holds the boot check for as long as it hashes"))
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
    early = EarlyFingerprint(state)
    got: list[tuple[bool, str]] = []
    try:
        assert hashing_b.wait(5)
        t = threading.Thread(target=lambda: got.append(slot_matches(SlotStore(state), ref,
                                                                    early)), daemon=True)
        t.start()
        t.join(3)  # slot a is tiny: its own hash takes milliseconds
        assert got == [(True, ref.fingerprint)]
    finally:
        release.set()
        early.close()


def test_a17_planted_sparse_files_in_the_other_slot_are_each_read(tmp_path: Path) -> None:
    """What makes it long: the bound is per file, not per slot (sparse files of
    ``LEAF_SIZE * 2`` here, each hashed in full, all reported with their real sizes)."""
    from modelward.trust._fingerprint import LEAF_SIZE

    state, _ = _device(tmp_path)
    for i in range(3):
        p = state / "slots" / "b" / f"pad{i}"
        with open(p, "wb") as f:
            f.truncate(2 * LEAF_SIZE)  # (no block written)
        os.chmod(p, 0o640)
    entries = directory_entries(state / "slots" / "b")
    assert sorted(e.size for e in entries if e.path.startswith("pad")) == [2 * LEAF_SIZE] * 3
