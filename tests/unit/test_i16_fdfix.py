"""Fixes of a16fd's attacks, and the attacker's next tries against them."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from modelward.updater.install._statedir import open_at, plain_stats_at


def test_open_at_refuses_a_fifo_for_reading_too(tmp_path: Path) -> None:
    """O_RDONLY of a FIFO blocks until a writer comes: open_at opens every file
    O_NONBLOCK and refuses what is not a plain file."""
    os.mkfifo(tmp_path / "f")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError, match="not a plain file"):
            open_at(fd, "f", os.O_RDONLY)
        with pytest.raises(OSError):
            open_at(fd, "f", os.O_WRONLY)
    finally:
        os.close(fd)


def test_open_at_hands_back_a_blocking_fd_unless_asked(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out = open_at(fd, "x", os.O_WRONLY | os.O_CREAT)
        assert not fcntl.fcntl(out, fcntl.F_GETFL) & os.O_NONBLOCK
        os.close(out)
        out = open_at(fd, "x", os.O_RDONLY | os.O_NONBLOCK)
        assert fcntl.fcntl(out, fcntl.F_GETFL) & os.O_NONBLOCK
        os.close(out)
    finally:
        os.close(fd)


def test_a_hard_link_is_refused_without_o_creat(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    os.link(tmp_path / "a", tmp_path / "b")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError, match="not a plain file"):
            open_at(fd, "a", os.O_WRONLY)
    finally:
        os.close(fd)


def test_plain_stats_counts_a_too_deep_directory_as_an_entry(tmp_path: Path) -> None:
    """As the fingerprint does: a directory at max_depth is one entry, not walked."""
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "f").write_bytes(b"")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert plain_stats_at(fd, 2, max_depth=1) is not None  # (f, d/e)
        assert plain_stats_at(fd, 1, max_depth=1) is None
    finally:
        os.close(fd)


def test_planted_empty_directories_stop_the_walk(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"d{i}").mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert plain_stats_at(fd, 3, max_depth=16) is None  # (50 > 3 * 16)
        assert plain_stats_at(fd, 4, max_depth=16) == {}
    finally:
        os.close(fd)


def test_prune_makes_nothing_through_a_linked_staging(tmp_path: Path) -> None:
    """_prune re-creates a missing incoming through the fd of staging walked from the
    state directory: a staging that is a link is refused, nothing made where it points."""
    import contextlib

    from modelward.updater.errors import StateDirError
    from modelward.updater.install._stage import _prune

    state = tmp_path / "state"
    state.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, state / "staging")
    with contextlib.suppress(StateDirError, OSError):
        _prune(state / "staging" / "incoming", set(), state)
    assert os.listdir(elsewhere) == []


def test_delta_prepare_makes_no_incoming_through_a_swapped_staging(tmp_path: Path,
                                                                   monkeypatch) -> None:
    import contextlib

    from modelward.updater.errors import StateDirError
    from modelward.updater.install import _delta

    state = tmp_path / "state"
    state.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = _delta.plain_dir

    def check_then_swap(base: Path, rel: str, **kw: bool) -> Path:
        out = real(base, rel, **kw)
        os.rename(state / "staging", tmp_path / "moved")
        os.symlink(elsewhere, state / "staging")
        return out

    monkeypatch.setattr(_delta, "plain_dir", check_then_swap)
    with contextlib.suppress(StateDirError, OSError):
        _delta._prepare(state / "staging", state / "staging" / "incoming", "k", {"x"})
    assert os.listdir(elsewhere) == []


def test_install_incoming_swap_after_the_last_check_is_taken_out(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """incoming swapped for a link between the check just before the rename and the
    rename itself: the link that landed in slots/ is removed, the previous slot put back."""
    from modelward.updater.errors import StateDirError
    from modelward.updater.install import _slots
    from modelward.updater.install._slots import SlotStore

    state = tmp_path / "state"
    (state / "staging" / "incoming").mkdir(parents=True)
    (state / "slots" / "b").mkdir(parents=True)
    (state / "slots" / "b" / "prev").write_bytes(b"previous release")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = _slots._identity_at
    calls: list[str] = []

    def check_then_swap(fd: int, name: str) -> tuple[int, int] | None:
        out = real(fd, name)
        if not calls:
            os.rename(state / "staging" / "incoming", tmp_path / "moved")
            os.symlink(elsewhere, state / "staging" / "incoming")
        calls.append(name)
        return out

    monkeypatch.setattr(_slots, "_identity_at", check_then_swap)
    with pytest.raises(StateDirError, match="replaced"):
        SlotStore(state).install_incoming("b")
    assert not os.path.islink(state / "slots" / "b")
    assert (state / "slots" / "b" / "prev").read_bytes() == b"previous release"
    assert sorted(os.listdir(state / "slots")) == ["b"]
