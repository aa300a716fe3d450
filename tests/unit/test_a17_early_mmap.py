"""Attacks by the disk attacker, who writes the state dir at any time, also while the boot
check runs, on a boot check that would reuse an earlier hash of the slot when its
inodes, modes, links, sizes, mtimes and ctimes are unchanged (issue 15's
``EarlyFingerprint``, removed in fix 17): a store through a primed shared mapping changes
a file's bytes without moving any of those, so no timestamp can prove the bytes unchanged.
The boot check now hashes the slot it checks when it checks it; these tests hold it to
seeing every such change."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import pytest

from modelward.trust._fingerprint import directory_entries, slot_fingerprint
from modelward.trust._record import ModelRef
from modelward.updater.install import _boot
from modelward.updater.install._boot import slot_matches
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


def _primed_map(p: Path) -> tuple[int, mmap.mmap]:
    """A shared writable mapping of ``p`` whose first page is already dirty: a later store
    into it takes no write fault, so the kernel never calls ``file_update_time``."""
    fd = os.open(p, os.O_RDWR)
    m = mmap.mmap(fd, os.fstat(fd).st_size)
    m[0:1] = m[0:1]  # (same byte: the write fault, and its mtime update, happen now)
    return fd, m


def test_a17_mmap_store_after_the_early_hash_is_seen(tmp_path: Path) -> None:
    state, ref = _device(tmp_path)
    model = state / "slots" / "a" / "model.onnx"
    fd, m = _primed_map(model)
    try:
        time.sleep(0.02)  # (a later timestamp tick than the priming write)
        assert slot_matches(SlotStore(state), ref) == (True, ref.fingerprint)  # a boot
        m[0:1] = b"X"  # the attack: no syscall on the file, no fault
        assert model.read_bytes()[:1] == b"X"  # the bytes did change
        ok, fp = slot_matches(SlotStore(state), ref)  # the next check
        assert fp == slot_fingerprint(directory_entries(state / "slots" / "a"))
        assert not ok  # what a hash at the time of use gives
    finally:
        m.close()
        os.close(fd)


def _stats(state: Path) -> list[tuple[int, ...]]:
    return [(st.st_ino, st.st_mode, st.st_nlink, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            for p in ("slots", "slots/a", "slots/a/model.onnx", "slots/a/manifest.json")
            for st in [os.lstat(state / p)]]


def test_a17_mmap_store_is_invisible_to_tree_state(tmp_path: Path) -> None:
    """The cause, by itself: the same lstat of the slot's tree before and after the bytes
    changed (why no earlier hash may be reused on the strength of timestamps)."""
    state, _ = _device(tmp_path)
    model = state / "slots" / "a" / "model.onnx"
    fd, m = _primed_map(model)
    try:
        time.sleep(0.02)
        before = _stats(state)
        m[0:1] = b"X"
        assert _stats(state) == before
    finally:
        m.close()
        os.close(fd)


def _utime_back(state: Path) -> None:
    p = state / "slots" / "a" / "model.onnx"
    st = os.lstat(p)
    with open(p, "r+b") as f:
        f.write(b"X")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime moves


def _swap_and_back(state: Path) -> None:
    s = state / "slots"
    for _ in range(2):
        (s / "a").rename(s / "t")
        (s / "b").rename(s / "a")
        (s / "t").rename(s / "b")


def _current_flipped_and_back(state: Path) -> None:
    cur = state / "current"
    for target in ("slots/b", "slots/a"):
        tmp = state / "current.tmp"
        tmp.symlink_to(target)
        tmp.replace(cur)


def _rewrite_same_tick(state: Path) -> None:
    with open(state / "slots" / "a" / "model.onnx", "r+b") as f:
        f.write(b"X")  # right after the early hash (and tree_state's lstat)


@pytest.mark.parametrize("attack", [_utime_back, _swap_and_back, _rewrite_same_tick])
def test_a17_changes_after_the_early_hash_are_seen(tmp_path: Path, attack: object) -> None:
    """mtime put back with utimensat, the two slots renamed into each other twice, a
    rewrite right after a check (within one timestamp tick): the next check sees it."""
    state, ref = _device(tmp_path)
    assert slot_matches(SlotStore(state), ref)[0]
    attack(state)  # type: ignore[operator]
    expected = slot_fingerprint(directory_entries(state / "slots" / "a"))
    ok, fp = slot_matches(SlotStore(state), ref)
    assert fp == expected
    assert ok is (attack is _swap_and_back)  # (a double swap keeps every byte)


def test_a17_current_flipped_and_back_reuses_only_an_unchanged_slot(tmp_path: Path) -> None:
    """`current` names b and then a again before the check: a is unchanged and matches."""
    state, ref = _device(tmp_path)
    _current_flipped_and_back(state)
    assert slot_matches(SlotStore(state), ref) == (True, ref.fingerprint)


def test_a17_current_switched_before_the_early_hash_is_not_reused(tmp_path: Path) -> None:
    """`current` names b; the record's slot is a: a is what is hashed (b's bytes are
    never taken for a's)."""
    state, ref = _device(tmp_path)
    (state / "current").unlink()
    (state / "current").symlink_to("slots/b")
    assert slot_matches(SlotStore(state), ref) == (True, ref.fingerprint)
    b_ref = ModelRef("m", "1.0.0", ref.fingerprint, "b")
    assert slot_matches(SlotStore(state), b_ref)[0] is False


def test_a17_no_earlier_hash_is_kept_to_be_reused() -> None:
    """Nothing in the boot path keeps entries hashed before the check (the class of the
    bug: a cache whose validity rests on timestamps)."""
    assert not hasattr(_boot, "EarlyFingerprint") and not hasattr(_boot, "tree_state")
