# ruff: noqa: S103  (planting odd modes is what these tests do)
"""Issue 13 (f-stage2): what the disk plants at the agent's own files is healed or refused,
never followed. Cheap variants of tests/integration/test_i13_disk_attacks.py."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelward.agent._commands import StatusFile
from modelward.trust._atomic import symlink_atomic
from modelward.trust._fingerprint import MAX_ENTRIES, directory_entries, slot_fingerprint
from modelward.updater.errors import StateDirError
from modelward.updater.install._journal import Journal
from modelward.updater.install._slots import SlotStore
from modelward.updater.install._statedir import open_below, plain_dir, touch_plain


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _fp(root: Path) -> str:
    return slot_fingerprint(directory_entries(root))


def _slot(root: Path) -> Path:
    (root / "sub").mkdir(parents=True, mode=0o755)
    (root / "model.onnx").write_bytes(b"model bytes")
    (root / "sub" / "w.bin").write_bytes(b"w" * 100)
    for p in [root, root / "sub"]:
        os.chmod(p, 0o750)
    for p in [root / "model.onnx", root / "sub" / "w.bin"]:
        os.chmod(p, 0o640)
    return root


# --- modes the agent creates, whatever the umask ------------------------------------------

def test_created_directories_and_files_get_fixed_modes(tmp_path: Path, strict_umask: None) -> None:
    plain_dir(tmp_path, "slots/a/data", create=True)
    for d in ["slots", "slots/a", "slots/a/data"]:
        assert stat.S_IMODE(os.stat(tmp_path / d).st_mode) == 0o750, d
    fd = open_below(tmp_path, "slots/a/data/x", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.close(fd)
    assert stat.S_IMODE(os.stat(tmp_path / "slots/a/data/x").st_mode) == 0o640


def test_a_kept_file_with_odd_modes_is_normalised_when_reopened(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"kept")
    os.chmod(tmp_path / "x", 0o6777)
    os.close(open_below(tmp_path, "x", os.O_WRONLY | os.O_CREAT))
    assert stat.S_IMODE(os.stat(tmp_path / "x").st_mode) == 0o640


def test_a_kept_file_hard_linked_outside_is_not_chmodded(tmp_path: Path) -> None:
    """Refused: the other name's mode is left alone (no fchmod through a second name)."""
    (tmp_path / "d").mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"x")
    os.chmod(outside, 0o600)
    os.link(outside, tmp_path / "d" / "x")
    with pytest.raises(OSError, match="not a plain file"):
        open_below(tmp_path / "d", "x", os.O_WRONLY | os.O_CREAT)
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o600


# --- the fingerprint refuses what the agent never creates --------------------------------

@pytest.mark.parametrize(("rel", "mode"), [
    (".", 0o777), (".", 0o1755), ("sub", 0o700), ("sub", 0o777), ("sub", 0o4750),
    ("model.onnx", 0o755), ("model.onnx", 0o620), ("model.onnx", 0o400),
])
def test_odd_modes_anywhere_in_a_slot_never_match(tmp_path: Path, rel: str, mode: int) -> None:
    slot = _slot(tmp_path / "a")
    before = _fp(slot)
    os.chmod(slot / rel, mode)
    assert _fp(slot) != before


def test_the_modes_earlier_versions_made_still_match(tmp_path: Path) -> None:
    """Slots installed before (umask 0022: 0644 / 0755) keep passing boot-check."""
    slot = _slot(tmp_path / "a")
    before = _fp(slot)
    os.chmod(slot / "sub", 0o755)
    os.chmod(slot / "model.onnx", 0o644)
    assert _fp(slot) == before
    os.chmod(slot / "sub", 0o2750)  # (made so below a set-gid state_dir)
    assert _fp(slot) == before


def test_thousands_of_empty_directories_are_a_bounded_walk(tmp_path: Path) -> None:
    slot = _slot(tmp_path / "a")
    for i in range(3000):  # (spread out: no one directory lists more than the bound)
        (slot / "sub" / f"d{i // 50}" / f"e{i % 50}").mkdir(parents=True)
    entries = directory_entries(slot)
    assert len(entries) <= MAX_ENTRIES + 2
    assert any(e.size == -1 for e in entries)


# --- journal and status: no trusted state, so a planted directory is removed -------------

def _planted_dir(path: Path, outside: Path) -> None:
    (path / "deep" / "er").mkdir(parents=True)
    (path / "deep" / "link").symlink_to(outside)
    (path / "deep" / "er" / "f").write_bytes(b"x")


def test_journal_over_a_planted_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (tmp_path / "state").mkdir()
    journal = Journal(tmp_path / "state" / "journal.json")
    _planted_dir(journal.path, outside)
    journal.enter("checking")
    assert journal.read().step == "checking"
    assert (outside / "keep").is_dir()


def test_status_over_a_planted_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    status = StatusFile(tmp_path)
    _planted_dir(status.path, outside)
    status.write({"last_error": None, "counters": {"installed": 1}})
    assert status.read() == {"last_error": None, "counters": {"installed": 1}}
    assert (outside / "keep").is_dir()


# --- the heartbeat ------------------------------------------------------------------------

def test_heartbeat_over_a_symlink_creates_nothing_outside(tmp_path: Path) -> None:
    beat = tmp_path / ".heartbeat"
    outside = tmp_path / "outside"
    beat.symlink_to(outside)
    touch_plain(beat)
    assert not outside.exists() and not beat.is_symlink() and beat.is_file()


def test_heartbeat_hard_linked_outside_leaves_the_outside_file_alone(tmp_path: Path) -> None:
    beat = tmp_path / ".heartbeat"
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    os.utime(outside, (1_000_000, 1_000_000))
    os.link(outside, beat)
    touch_plain(beat)
    assert os.stat(outside).st_mtime == 1_000_000
    assert os.stat(beat).st_ino != os.stat(outside).st_ino


@pytest.mark.parametrize("kind", ["dir", "fifo"])
def test_heartbeat_over_a_directory_or_fifo_does_not_block(tmp_path: Path, kind: str) -> None:
    beat = tmp_path / ".heartbeat"
    if kind == "dir":
        (beat / "x").mkdir(parents=True)
    else:
        os.mkfifo(beat)
    t = threading.Thread(target=touch_plain, args=(beat,), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive()
    assert stat.S_ISREG(os.lstat(beat).st_mode)


def test_heartbeat_keeps_a_plain_file_and_moves_its_mtime(tmp_path: Path) -> None:
    beat = tmp_path / ".heartbeat"
    beat.write_bytes(b"")
    os.utime(beat, (1, 1))
    ino = os.stat(beat).st_ino
    touch_plain(beat)
    assert os.stat(beat).st_ino == ino and os.stat(beat).st_mtime > 1


# --- current ------------------------------------------------------------------------------

def test_many_planted_temp_names_do_not_stop_activation(tmp_path: Path) -> None:
    (tmp_path / "slots" / "a").mkdir(parents=True)
    for i in range(50):
        (tmp_path / f".current.{i}.tmp" / "x").mkdir(parents=True)
    SlotStore(tmp_path).activate("a")
    assert os.readlink(tmp_path / "current") == "slots/a"
    symlink_atomic("slots/a", tmp_path / "current")  # (again: no temp name is left behind)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".current.")
                and not (tmp_path / p / "x").is_dir()]


def test_activate_failure_is_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "slots" / "a").mkdir(parents=True)

    def fail(*_a: object, **_k: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(StateDirError) as e:
        SlotStore(tmp_path).activate("a")
    assert e.value.path == str(tmp_path / "current")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".current.")]
