"""Attacks a10lock (the disk, a local user, a racer) on the device lock ``agent.lock``, as
real processes: a lock file left readable by others, the unlink-on-release race over many
iterations, a holder killed -9, hostile holder text read by ``agent status``."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from modelward.agent._lock import _FLOCK, LOCK_NAME, device_lock, holder

# Another user's process: it opened the lock file for reading while its mode allowed it
# (0644, the disk's doing) and holds a read lock on that open file description.
_READER = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(sys.argv[2], fcntl.F_RDLCK, 0, 0, 0, 0))
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_foreign_read_lock_on_a_once_readable_file_blocks_nothing(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_NAME
    lock.write_bytes(b"")
    lock.chmod(0o644)  # (the disk)
    p = subprocess.Popen([sys.executable, "-c", _READER, str(lock), _FLOCK],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "locked\n"
        ran = False
        with device_lock(tmp_path, "agent update"):
            ran = True
            assert lock.stat().st_mode & 0o777 == 0o600
        assert ran
    finally:
        p.communicate("")


# One racer: many times, take the lock (waiting), prove it is alone by an O_EXCL marker.
_RACER = """
import os, sys
from pathlib import Path
from modelward.agent._lock import device_lock
state, n = Path(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    with device_lock(state, f"agent update {os.getpid()}", wait=60.0):
        fd = os.open(state / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
        os.unlink(state / "inside")
print("done", flush=True)
"""


def test_the_unlink_on_release_race_never_gives_two_holders(tmp_path: Path) -> None:
    ps = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), "300"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in ps]
    for p, (out, err) in zip(ps, outs, strict=True):
        assert p.returncode == 0 and out == "done\n", err[-2000:]
    assert sorted(os.listdir(tmp_path)) == []


_HOLD = """
import sys
from pathlib import Path
from modelward.agent._lock import device_lock
with device_lock(Path(sys.argv[1]), "agent update"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_holder_killed_9_leaves_no_lock(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "held\n"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert (tmp_path / LOCK_NAME).exists()  # (left behind, naming a dead pid)
    assert holder(tmp_path) is None
    with device_lock(tmp_path, "agent boot-check"):  # wait 0: not refused
        pass
    assert os.listdir(tmp_path) == []


def test_status_reads_a_hostile_holder_text_escaped_and_bounded(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_NAME
    lock.write_bytes(b"pid 99999999999999999999: \x1b]52;c;ZWNobyBwd25lZA==\x07\x9b31m"
                     + b"\xff" * 100000)
    lock.chmod(0o600)
    fd = os.open(lock, os.O_RDWR)
    try:  # (held by an OFD of this process: another holder as far as status sees)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, 0, 0, 0, 0))
        h = holder(tmp_path)
        assert h is not None and h.pid is None
        assert not any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 for c in h.command)
        assert len(h.describe()) < 200
    finally:
        os.close(fd)


_IN_OPEN, _IN_DELETE_SELF = 0x20, 0x400


@pytest.mark.parametrize("command", ["agent update", "agent status"])
def test_a_planted_device_node_is_never_opened(tmp_path: Path, command: str) -> None:
    import ctypes

    lock = tmp_path / LOCK_NAME
    try:
        os.mknod(lock, 0o20666, os.makedev(1, 3))  # (/dev/null's numbers: harmless here)
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    libc = ctypes.CDLL(None, use_errno=True)
    ino = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert ino >= 0
    try:
        assert libc.inotify_add_watch(ino, str(lock).encode(), _IN_OPEN | _IN_DELETE_SELF) >= 0
        if command == "agent status":  # (holder(): O_RDONLY | O_NONBLOCK, then fstat)
            assert holder(tmp_path) is None
        else:
            with device_lock(tmp_path, command):
                assert lock.is_file()
        events = b""
        with contextlib.suppress(BlockingIOError):
            events = os.read(ino, 4096)
        masks, off = [], 0
        while off + 16 <= len(events):  # struct inotify_event: wd, mask, cookie, len, name
            _, mask, _, size = struct.unpack_from("iIII", events, off)
            masks.append(mask)
            off += 16 + size
        assert not any(m & _IN_OPEN for m in masks), "the device node was opened"
    finally:
        os.close(ino)


def test_a_missing_state_dir_is_made_and_locked_at_once(tmp_path: Path) -> None:
    from modelward.agent.errors import DeviceBusyError

    state = tmp_path / "var" / "state"
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(state)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "held\n"
        assert state.is_dir() and state.stat().st_mode & 0o007 == 0  # (0750, umask-less)
        h = holder(state)
        assert h is not None and h.command == "agent update"
        with pytest.raises(DeviceBusyError, match="agent update"), \
                device_lock(state, "agent update"):
            pytest.fail("ran beside the holder")
    finally:
        p.communicate("")
    assert os.listdir(state) == []
