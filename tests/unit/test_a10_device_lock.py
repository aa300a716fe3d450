"""The device lock (agent/_lock.py): refusal naming the holder, re-entrance, a bounded
wait, nothing left behind, a planted entry replaced, the holder text bounded and escaped,
and the daemon's schedule after a skipped attempt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelward.agent._lock import LOCK_NAME, device_lock, holder
from modelward.agent._schedule import BUSY_RETRY, Schedule
from modelward.agent.errors import DeviceBusyError

_HOLD = """
import sys, time
from pathlib import Path
from modelward.agent._lock import device_lock
with device_lock(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _other(state: Path, command: str = "agent update") -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(state), command],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "held\n"
    return p


def test_a_second_command_is_refused_naming_the_holder(tmp_path: Path) -> None:
    p = _other(tmp_path)
    try:
        with pytest.raises(DeviceBusyError) as ei, device_lock(tmp_path, "agent provision"):
            raise AssertionError("ran beside the holder")
        msg = str(ei.value)
        assert f"agent update (pid {p.pid}) is running" in msg and "\n" not in msg
        assert ei.value.pid == p.pid
        h = holder(tmp_path)
        assert h is not None and (h.command, h.pid) == ("agent update", p.pid)
    finally:
        p.communicate("")
    assert holder(tmp_path) is None
    assert not (tmp_path / LOCK_NAME).exists()  # (the holder removed it)


def test_the_wait_is_bounded(tmp_path: Path) -> None:
    p = _other(tmp_path)
    now = [0.0]
    try:
        with pytest.raises(DeviceBusyError), device_lock(
                tmp_path, "agent boot-check", wait=5.0, clock=lambda: now[0],
                sleep=lambda s: now.__setitem__(0, now[0] + 1.0)):
            raise AssertionError("ran beside the holder")
        assert now[0] >= 5.0
    finally:
        p.communicate("")


def test_reentrant_in_one_process_and_nothing_left(tmp_path: Path) -> None:
    with device_lock(tmp_path, "agent run (update attempt)"):
        with device_lock(tmp_path, "agent update"):
            assert (tmp_path / LOCK_NAME).stat().st_mode & 0o777 == 0o600
        assert (tmp_path / LOCK_NAME).exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("plant", ["symlink", "dir", "fifo", "hardlink"])
def test_a_planted_entry_is_replaced_not_followed(tmp_path: Path, plant: str) -> None:
    state, outside = tmp_path / "state", tmp_path / "outside"
    state.mkdir()
    outside.write_bytes(b"keep")
    lock = state / LOCK_NAME
    if plant == "symlink":
        lock.symlink_to(outside)
    elif plant == "dir":
        lock.mkdir()
    elif plant == "fifo":
        os.mkfifo(lock)
    else:
        os.link(outside, lock)
    with device_lock(state, "agent update"):
        assert lock.is_file() and not lock.is_symlink() and lock.stat().st_nlink == 1
    assert outside.read_bytes() == b"keep"


def test_the_holder_text_is_bounded_and_escaped(tmp_path: Path) -> None:
    p = _other(tmp_path, "agent update\x1b[2J" + "x" * 5000)
    try:
        h = holder(tmp_path)
        assert h is not None and "\x1b" not in h.command and len(h.command) < 200
    finally:
        p.communicate("")


def test_a_skipped_attempt_retries_soon_without_a_backoff() -> None:
    s = Schedule(poll_interval=600.0)
    s.announce(7)
    s.started(0.0)
    wait = s.skipped(1.0)
    assert wait == BUSY_RETRY and s.backoff == 0.0
    assert s.due() == pytest.approx(1.0 + BUSY_RETRY)
    s.started(40.0)  # the announcement is still answered by the retry
    assert s.finished(True, 41.0, trusted=7) == 600.0  # (it verified timestamp v7)
    assert not s.announce(7)
