"""Issue 13 review (a5): the device's disk attacking "verify what you use, when you use it"
and "never open a path in state_dir through a symlink", through swtpm + nginx + onnxruntime.

A test marked ``xfail(strict=True)`` demonstrates an attack that works on this branch.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

import modelward.updater.install._install as install
from modelward.updater.errors import HealthCheckError, StagedFilesChangedError
from tests.conftest import World


def _tar_files(data: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t.getmembers():
            f = t.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
    return out


def _tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _overwrite(root: Path, files: dict[str, bytes]) -> None:
    """What a process writing the disk does: new bytes in place (same inode, one link)."""
    for name, data in files.items():
        with open(root / name, "r+b") as f:
            f.truncate(0)
            f.write(data)


def _boot_check(w: World, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelward", "agent", "boot-check", "--config",
         str(w.conf_path)], capture_output=True, text=True, timeout=timeout, check=False)


def _sealed_bytes(sealed: Any) -> dict[str, bytes]:
    return {name: os.pread(fd, os.fstat(fd).st_size, 0) for name, fd in sealed.fds.items()}


def test_files_swapped_between_verification_and_health_check_are_not_health_checked(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused: the health check's inputs are copied once into sealed memory and
    fingerprinted from the copies; the child loads those, never a path, so the disk's swap
    right after the check is not what onnxruntime sees (the swapped-in model fails v2's
    vectors: loading it would be a HealthCheckError). The swap is then caught before the
    commit, and nothing trusted moves."""
    world.publish("1.0.0", seed=1)
    world.update()
    v2 = _tar_files(world.publish("2.0.0", seed=2).read_bytes())
    evil = {"model.onnx": _tar_files(world.bundle("2.0.0", seed=666).read_bytes())["model.onnx"]}
    before = world.snapshot()
    seen: list[dict[str, bytes]] = []
    passed: list[str] = []
    real_health = install.run_health_check

    def health(slot: Path, *a: Any, **kw: Any) -> str:
        _overwrite(slot, evil)  # the disk, right after the pre-health-check verification
        assert _tree_files(slot)["model.onnx"] == evil["model.onnx"]
        seen.append(_sealed_bytes(kw["sealed"]))  # what the child is handed
        passed.append(real_health(slot, *a, **kw))
        return passed[-1]

    monkeypatch.setattr(install, "run_health_check", health)
    with pytest.raises(StagedFilesChangedError, match="before its commit") as e:
        world.update()
    assert e.value.__cause__ is None
    assert seen == [{k: v2[k] for k in ("manifest.json", "model.onnx", "vectors.npz")}]
    assert len(passed) == 1 and "match" in passed[0]  # onnxruntime checked the signed v2
    after = world.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    assert world.active_version() == "1.0.0"


def test_files_corrupted_before_health_check_do_not_get_the_release_rejected(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    real_health = install.run_health_check

    def health(slot: Path, *a: Any, **kw: Any) -> str:
        _overwrite(slot, {"model.onnx": b"not a model"})
        return real_health(slot, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(install, "run_health_check", health)
        with pytest.raises((HealthCheckError, StagedFilesChangedError)) as e:
            world.update()
    # The right answer is StagedFilesChangedError (a local fault); the release is fine.
    assert isinstance(e.value, StagedFilesChangedError), type(e.value).__name__
    world.update()  # the disk stopped meddling: the genuine v2 installs
    assert world.active_version() == "2.0.0"


def _swap_after_commit_check(world: World, monkeypatch: pytest.MonkeyPatch,
                             evil: dict[str, bytes]) -> None:
    real_fsync = install.fsync_tree

    def fsync_tree(root: Path) -> None:  # runs right after _verify_on_disk('before commit')
        _overwrite(root, evil)
        real_fsync(root)

    monkeypatch.setattr(install, "fsync_tree", fsync_tree)


def test_files_swapped_after_the_commit_check_are_not_served(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused: the slot is re-derived after the move into it and before ``current``
    names it; the committed record is reconciled as at boot (back to v1, ``current``
    unchanged), and the next attempt installs the signed v2."""
    v1 = _tar_files(world.publish("1.0.0", seed=1).read_bytes())
    world.update()
    v2 = _tar_files(world.publish("2.0.0", seed=2).read_bytes())
    evil = _tar_files(world.bundle("2.0.0", seed=666).read_bytes())
    before = world.snapshot()
    with monkeypatch.context() as m:
        _swap_after_commit_check(world, m, evil)
        with pytest.raises(StagedFilesChangedError, match="after the move"):
            world.update()
    after = world.snapshot()
    assert after.current == before.current == "slots/a"
    assert _tree_files(world.state / "current") == v1
    assert world.active_version() == "1.0.0"
    assert after.anchor == before.anchor  # (the TUF metadata refreshed: v2 is signed)
    store = world.store()
    try:
        rec = store.load()
    finally:
        store.tpm.close()
    assert rec.active is not None and rec.active.version == "1.0.0"
    assert rec.active.slot == "a"
    world.update()
    assert _tree_files(world.state / "current") == v2


def test_files_swapped_after_the_commit_check_are_caught_by_boot_check(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused (by the update, and again at the next boot): boot-check re-derives the
    fingerprint and keeps the fallback."""
    v1 = _tar_files(world.publish("1.0.0", seed=1).read_bytes())
    world.update()
    world.publish("2.0.0", seed=2)
    evil = _tar_files(world.bundle("2.0.0", seed=666).read_bytes())
    _swap_after_commit_check(world, monkeypatch, evil)
    with pytest.raises(StagedFilesChangedError):
        world.update()
    assert _tree_files(world.state / "current") != evil  # (the window is closed)
    r = _boot_check(world)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert os.readlink(world.state / "current") == "slots/a"
    assert _tree_files(world.state / "current") == v1


def test_journal_symlinked_to_a_fifo_outside_does_not_hang_boot_check(
    world: World, tmp_path: Path,
) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    fifo = tmp_path / "outside.fifo"
    os.mkfifo(fifo)
    journal = world.state / "journal.json"
    journal.unlink()
    journal.symlink_to(fifo)
    r = _boot_check(world, timeout=30)  # fails: subprocess.TimeoutExpired
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_heartbeat_symlink_creates_nothing_outside_state_dir(
    world: World, tmp_path: Path,
) -> None:
    """Refused: the heartbeat is opened O_NOFOLLOW; the planted link is replaced."""
    world.publish("1.0.0", seed=1)
    outside = tmp_path / "outside" / "nologin"  # e.g. /etc/nologin as the agent's user
    outside.parent.mkdir()
    (world.state / ".heartbeat").symlink_to(outside)
    r = subprocess.run([sys.executable, "-m", "modelward.agent._child", str(world.conf_path)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in r.stderr, r.stderr
    assert not outside.exists()  # fails: the agent created it


def test_a_directory_at_current_tmp_does_not_stop_boot_check_from_healing(
    world: World,
) -> None:
    """Refused: the temporary link gets a fresh random name; the planted one is unused."""
    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    (world.state / "current").unlink()  # the disk deletes current ...
    planted = world.state / f".current.{os.getpid()}.tmp"  # ... and plants its temp name
    (planted / "keep").mkdir(parents=True)
    store = world.store()
    try:
        install.boot_check(world.state, store)  # fails: IsADirectoryError
    finally:
        store.tpm.close()
    assert os.readlink(world.state / "current") == "slots/a"
    assert world.snapshot() == before


def test_journal_planted_as_a_directory_gives_a_typed_error_or_is_replaced(
    world: World,
) -> None:
    """Healed: the journal is no trusted state; the directory is removed (unfollowed)."""
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    journal = world.state / "journal.json"
    journal.unlink()
    (journal / "x").mkdir(parents=True)
    r = world.cli("agent", "update", "--once", "--config", str(world.conf_path))
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert world.active_version() == "2.0.0"


def test_a_symlink_swapped_in_before_the_health_check_reads_nothing_outside(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """model.onnx replaced by a link to a model outside state_dir just after verification:
    the health check's sandbox (Landlock) cannot read through it."""
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    evil = _tar_files(world.bundle("2.0.0", seed=666).read_bytes())
    outside = tmp_path / "outside"
    outside.mkdir()
    for name, data in evil.items():
        (outside / name).write_bytes(data)
    real_health = install.run_health_check
    before = world.snapshot()

    def health(slot: Path, *a: Any, **kw: Any) -> str:
        for name in evil:
            (slot / name).unlink()
            (slot / name).symlink_to(outside / name)
        return real_health(slot, *a, **kw)

    monkeypatch.setattr(install, "run_health_check", health)
    with pytest.raises((HealthCheckError, StagedFilesChangedError)) as e:
        world.update()
    print(type(e.value).__name__, e.value)
    assert "Permission denied" in str(e.value) or isinstance(e.value, StagedFilesChangedError)
    after = world.snapshot()
    assert (after.record, after.counter, after.current, after.slots) == (
        before.record, before.counter, before.current, before.slots)


def test_the_app_group_can_reach_every_directory_of_the_active_slot(
    world: World, tmp_path: Path,
) -> None:
    """Fixed: directories are made 0750 and files 0640 exactly, whatever the umask."""
    extra = tmp_path / "labels.txt"
    extra.write_text("cat\ndog\n")
    world.publish("1.0.0", seed=1, extra=[(extra, "data/labels.txt")])
    old = os.umask(0o027)  # as systemd/modelward-agent.service runs the agent
    try:
        world.update()
        r = _boot_check(world)
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    cur = world.state / "current"
    dirs = [world.state / "slots", world.state / "slots" / "a", cur / "data"]
    modes = {str(d.relative_to(world.state)): oct(os.stat(d).st_mode & 0o777) for d in dirs}
    assert all(os.stat(d).st_mode & 0o050 == 0o050 for d in dirs), modes
