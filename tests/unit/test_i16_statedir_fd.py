"""Fix a16disk, the class: every state-dir path is walked from an fd of ``state_dir`` with
``O_NOFOLLOW | O_DIRECTORY`` at each component, and read, written, listed and deleted
through that fd. What the disk attacker tries next against the fix: a swap of *any*
component (not only the last), before or after the check, on the delta path, the
whole-bundle stage and the slot move; a planted tree too large to walk."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import pytest

from modelward.updater.bundle._tarstream import Member
from modelward.updater.errors import StagingError, StateDirError
from modelward.updater.install import _delta, _statedir
from modelward.updater.install._slots import SlotStore
from modelward.updater.install._stage import Stage
from modelward.updater.install._statedir import (
    open_at,
    open_dir,
    plain_stats_at,
    remove_below,
    write_at,
)
from tests.unit.test_a16_disk import release  # noqa: F401 - the fixture

_REG = b"0"


def _victim(tmp: Path) -> Path:
    v = tmp / "victim"
    (v / "incoming" / "sub").mkdir(parents=True)
    for p in ("incoming/manifest.json", "incoming/sub/x", "passwd", "k.part"):
        (v / p).write_bytes(b"the other app's data")
    return v


def _intact(v: Path) -> None:
    for p in ("incoming/manifest.json", "incoming/sub/x", "passwd", "k.part"):
        assert (v / p).read_bytes() == b"the other app's data", p
    assert sorted(os.listdir(v)) == ["incoming", "k.part", "passwd"]
    assert sorted(os.listdir(v / "incoming")) == ["manifest.json", "sub"]


def _swap(d: Path, to: Path) -> None:
    shutil.rmtree(d)
    d.symlink_to(to)


def test_open_dir_refuses_a_link_at_any_component_and_names_it(tmp_path: Path) -> None:
    v = _victim(tmp_path)
    state = tmp_path / "state"
    (state / "staging").mkdir(parents=True)
    _swap(state / "staging", v)
    with pytest.raises(StateDirError, match="staging is a symlink") as e:
        open_dir(state, "staging/incoming")
    assert e.value.path == str(state / "staging")
    with pytest.raises(StateDirError):
        open_dir(state, "staging/incoming/sub", create=True)
    with pytest.raises(StateDirError):
        remove_below(state, "staging/incoming/manifest.json")
    _intact(v)


def test_a_component_swapped_after_the_walk_redirects_nothing(tmp_path: Path) -> None:
    v = _victim(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    fd = open_dir(state, "chunks/deep", create=True)
    try:
        os.rename(state / "chunks", state / "aside")  # after the fd was taken
        (state / "chunks").symlink_to(v)
        write_at(fd, "passwd", b"mine")
        os.close(open_at(fd, "k.part", os.O_WRONLY | os.O_CREAT))
        assert sorted(os.listdir(fd)) == ["k.part", "passwd"]
    finally:
        os.close(fd)
    _intact(v)
    assert (state / "aside" / "deep" / "passwd").read_bytes() == b"mine"  # (inside)


def test_the_hint_write_and_read_through_a_chunks_link_touch_nothing_outside(
        tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    _, ix, _ = release
    fp = _delta.index_fingerprint(ix)
    v = _victim(tmp_path)
    (v / f"{fp}.json").write_bytes(ix.to_bytes())  # (a valid hint, outside)
    state = tmp_path / "state"
    state.mkdir()
    (state / "chunks").symlink_to(v)
    _delta.write_hint(state, ix, [])  # (logged, not raised)
    assert (v / f"{fp}.json").read_bytes() == ix.to_bytes()
    (v / f"{fp}.json").unlink()
    _intact(v)
    (v / f"{fp}.json").write_bytes(ix.to_bytes())
    assert _delta.read_hint(state, fp) is None
    (state / "chunks").unlink()
    (state / "chunks").mkdir()
    (state / "chunks" / "sub").symlink_to(v)  # (a link inside chunks/: pruned, not followed)
    _delta.write_hint(state, ix, [])
    assert os.listdir(state / "chunks") == [f"{fp}.json"]
    assert _delta.read_hint(state, fp) == ix
    (v / f"{fp}.json").unlink()
    _intact(v)


def test_a_whole_bundle_member_after_staging_is_swapped_lands_nowhere_outside(
        tmp_path: Path) -> None:
    v = _victim(tmp_path)
    state = tmp_path / "state"
    staging = state / "staging"
    staging.mkdir(parents=True)
    stage = Stage(staging, staging / "incoming", "k")
    writer = stage.writer(0)  # (skeleton and index opened, incoming made)
    try:
        _swap(staging, v)  # the disk attacker wins the race here
        for name in ("manifest.json", "sub/x"):
            with pytest.raises((OSError, StagingError)):
                writer.open(Member(name, 4, _REG, 512))
    finally:
        writer.close()
    _intact(v)


def test_prune_and_strays_after_staging_is_swapped_delete_nothing_outside(
        tmp_path: Path) -> None:
    v = _victim(tmp_path)
    state = tmp_path / "state"
    staging = state / "staging"
    (staging / "incoming").mkdir(parents=True)
    stage = Stage(staging, staging / "incoming", "k")
    _swap(staging, v)
    with contextlib.suppress(OSError, StagingError):
        stage.drop_strays({"manifest.json"})
    with contextlib.suppress(OSError, StagingError):
        list(stage.prefix(10))
    _intact(v)


def test_install_incoming_moves_nothing_from_a_swapped_staging(tmp_path: Path) -> None:
    v = _victim(tmp_path)
    state = tmp_path / "state"
    (state / "staging" / "incoming").mkdir(parents=True)
    (state / "slots").mkdir()
    _swap(state / "staging", v)
    with pytest.raises(StateDirError):
        SlotStore(state).install_incoming("a")
    _intact(v)
    assert os.listdir(state / "slots") == []


def test_a_planted_tree_larger_than_a_release_is_not_walked(tmp_path: Path) -> None:
    slot = tmp_path / "state" / "slots" / "a"
    (slot / "d").mkdir(parents=True)
    for i in range(5000):
        (slot / "d" / f"f{i}").touch()
    t = time.perf_counter()
    assert _delta.plain_sizes(slot) == {}
    assert _delta.slot_bases(tmp_path / "state", tmp_path / "state" / "slots",
                             [("active", "a", "0" * 64)])[0][0].sizes == {}
    assert time.perf_counter() - t < 1.0  # (stops at MAX_ENTRIES, not 5000 lstats)
    fd = os.open(slot, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert plain_stats_at(fd, 5001) is not None  # (under the bound: every file)
    finally:
        os.close(fd)


def test_plain_dir_still_creates_with_the_exact_mode(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        p = _statedir.plain_dir(tmp_path, "x/y", create=True)
    finally:
        os.umask(old)
    assert p == tmp_path / "x" / "y"
    assert os.stat(tmp_path / "x").st_mode & 0o777 == 0o750
    assert os.stat(p).st_mode & 0o777 == 0o750


def test_stage_renames_after_staging_is_swapped_touch_nothing_outside(
        tmp_path: Path) -> None:
    v = _victim(tmp_path)
    staging = tmp_path / "state" / "staging"
    (staging / "incoming").mkdir(parents=True)
    (staging / "k.part").write_bytes(b"12345678")
    stage = Stage(staging, staging / "incoming", "k")
    _swap(staging, v)  # (the victim has a k.part too)
    with pytest.raises(StateDirError):
        stage.mark_done()
    with pytest.raises((OSError, StagingError)):
        stage.writer(4)
    _intact(v)


def test_move_back_renames_nothing_in_a_swapped_slots(tmp_path: Path) -> None:
    v = _victim(tmp_path)
    (v / "a").mkdir()
    state = tmp_path / "state"
    (state / "slots").mkdir(parents=True)
    _swap(state / "slots", v)
    with pytest.raises(StateDirError):
        SlotStore(state).move_back("a", "incoming")
    assert (v / "a").is_dir()
    (v / "a").rmdir()
    _intact(v)


def test_move_back_after_slots_is_swapped_mid_way_renames_within_state_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelward.updater.install import _slots

    v = tmp_path / "victim"
    for d in ("a", "b"):
        (v / d).mkdir(parents=True)
        (v / d / "who").write_text(f"victim {d}")
    state = tmp_path / "state"
    for d in ("a", "b"):
        (state / "slots" / d).mkdir(parents=True)
        (state / "slots" / d / "who").write_text(f"slot {d}")

    def racing(fd: int, a: str, b: str) -> bool:
        os.rename(state / "slots", state / "aside")  # the disk attacker wins the race here
        (state / "slots").symlink_to(v)
        return False  # (no renameat2: the three renames)

    monkeypatch.setattr(_slots, "_exchange_at", racing)
    SlotStore(state).move_back("a", "b")
    assert [(v / d / "who").read_text() for d in ("a", "b")] == ["victim a", "victim b"]
    assert sorted(os.listdir(v)) == ["a", "b"]
    assert (state / "aside" / "b" / "who").read_text() == "slot a"  # (moved inside)
