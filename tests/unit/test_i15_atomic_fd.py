"""Writers of the state directory act on descriptors, never on a name looked up again.

What the owner of a directory root writes in tries next, once write_atomic's chmod is
fchmod: swap the temporary file when the write fails (the clean-up unlink), swap the
directory itself between the open and the rename, plant links where a copy lands, and
swap a directory the stage just made for a link before its mode is set.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from modelward.trust import _atomic
from modelward.trust._atomic import copy_atomic, write_atomic
from modelward.updater.errors import StateDirError
from modelward.updater.install import _statedir
from modelward.updater.install._statedir import mkdir_exact, plain_dir

SECRET = "root:$6$secret:::\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    v = etc / "shadow"
    v.write_text(SECRET)
    v.chmod(0o600)
    return v


def _on_file_fsync(monkeypatch: pytest.MonkeyPatch, act: Callable[[], None]) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            act()

    monkeypatch.setattr(_atomic.os, "fsync", fsync)


def _swap_temps(directory: Path, victim: Path) -> Callable[[], None]:
    def act() -> None:
        temps = [p for p in directory.glob(".*.tmp") if not p.is_symlink()]
        assert temps, "nothing to swap: the test would pass vacuously"
        for p in temps:
            p.rename(p.with_name(p.name + ".x"))
            p.symlink_to(victim)
    return act


def _untouched(victim: Path) -> None:
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert victim.read_text() == SECRET


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600])
def test_swapped_temp_file_mode_and_contents_of_target_untouched(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch, mode: int,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _on_file_fsync(monkeypatch, _swap_temps(state, victim))
    write_atomic(state / "record.json", b"{}\n", mode=mode)
    _untouched(victim)
    moved = list(state.glob(".*.tmp.x"))
    assert len(moved) == 1 and stat.S_IMODE(moved[0].stat().st_mode) == mode  # fchmod-ed


def test_copy_atomic_swapped_temp_file_target_untouched(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    targets = tmp_path / "targets"
    targets.mkdir()
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(b"x" * 5000)
    _on_file_fsync(monkeypatch, _swap_temps(targets, victim))
    copy_atomic(bundle, targets / "abc.m-1.tar")
    _untouched(victim)


def test_failed_write_removes_the_swapped_link_not_its_target(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    swap = _swap_temps(state, victim)

    def act() -> None:
        swap()
        raise OSError(28, "No space left on device")

    _on_file_fsync(monkeypatch, act)
    with pytest.raises(OSError, match="No space"):
        write_atomic(state / "record.json", b"{}\n")
    _untouched(victim)
    assert not list(state.glob(".*.tmp")), "the link left behind (or its target removed)"
    assert not (state / "record.json").exists()


def test_directory_swapped_before_the_rename_file_stays_in_the_opened_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    state.mkdir()
    elsewhere.mkdir()

    def act() -> None:
        state.rename(tmp_path / "state.old")
        state.symlink_to(elsewhere)

    _on_file_fsync(monkeypatch, act)
    write_atomic(state / "status.json", b"{}\n")
    assert list(elsewhere.iterdir()) == []  # nothing created, renamed or left there
    assert (tmp_path / "state.old" / "status.json").read_bytes() == b"{}\n"


def test_a_planted_temp_name_is_never_opened(tmp_path: Path, victim: Path) -> None:
    """Whatever sits at a name that looks like a temporary file is neither followed nor
    used: names are random and created O_EXCL | O_NOFOLLOW."""
    state = tmp_path / "state"
    state.mkdir()
    for i in range(20):
        (state / f".status.json.{i:016x}.tmp").symlink_to(victim)
    write_atomic(state / "status.json", b"{}\n")
    _untouched(victim)
    assert (state / "status.json").read_bytes() == b"{}\n"


@pytest.mark.parametrize("umask", [0o077, 0o000])
def test_mode_is_exact_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "m.prom", b"x\n", mode=0o644)
        d = mkdir_exact(tmp_path / "d")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.prom").stat().st_mode) == 0o644
    assert stat.S_IMODE(d.st_mode) == 0o750


def _swap_after_mkdir(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    real = os.mkdir

    def mkdir(path: str | os.PathLike[str], mode: int = 0o777, *,
              dir_fd: int | None = None) -> None:
        real(path, mode, dir_fd=dir_fd)
        os.rmdir(path, dir_fd=dir_fd)
        os.symlink(target, path, dir_fd=dir_fd)  # the directory's owner, between mkdir and chmod

    monkeypatch.setattr(_statedir.os, "mkdir", mkdir)


def test_new_directory_swapped_for_a_link_is_refused_target_mode_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret_dir = tmp_path / "root-only"
    secret_dir.mkdir(mode=0o700)
    secret_dir.chmod(0o700)
    _swap_after_mkdir(monkeypatch, secret_dir)
    with pytest.raises(OSError):
        mkdir_exact(tmp_path / "incoming")
    with pytest.raises(StateDirError):
        plain_dir(tmp_path, "slots/a", create=True)
    monkeypatch.undo()
    assert stat.S_IMODE(secret_dir.stat().st_mode) == 0o700
