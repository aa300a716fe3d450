"""Issue 13, finding 11 / must-show 13 (unit part): the idle gate's ``busy_file`` is bounded.

Only a regular file is a signal; it is opened without following links and non-blocking,
at most a few bytes of it are read, and a future mtime counts as stale. Anything else is
ignored with one warning: the gate neither hangs nor blocks updates for good.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelward.updater import idle as _idle
from modelward.updater.idle import BUSY_FILE_MAX_BYTES, BusyFileSignal, Gate, read_busy_file


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every ``os.read`` size asked for, and every path ``os.open``ed, during the test."""
    sizes: list[int] = []
    real_read = os.read

    def spy(fd: int, n: int) -> bytes:
        sizes.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", spy)
    yield sizes


def _bounded(fn: Callable[[], object], timeout: float = 5.0) -> object:
    """``fn()`` in a thread; fails the test if it does not return within ``timeout``."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the busy_file check hung"
    return out[0]


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def test_a_future_mtime_counts_as_stale(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "busy"
    f.write_text("9\n")
    future = time.time() + 3600
    os.utime(f, (future, future))
    s = BusyFileSignal(f, stale_after=60)
    with caplog.at_level(logging.WARNING, "modelward.updater.idle"):
        assert s.busy() is None
        assert s.busy() is None
    assert [r.getMessage() for r in caplog.records].count(
        f"ignoring busy_file {f}: its mtime is in the future (counted as stale)") == 1
    now = time.time()
    os.utime(f, (now, now))  # the application writes it again: a signal again
    assert "queue depth 9" in (s.busy() or "")


def test_a_fifo_neither_hangs_nor_is_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    f = tmp_path / "busy"
    os.mkfifo(f)
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (opened.append(str(p)),
                                                        real_open(p, *a, **k))[1])
    s = BusyFileSignal(f)
    with caplog.at_level(logging.WARNING, "modelward.updater.idle"):
        for _ in range(3):
            assert _bounded(s.busy) is None
    assert str(f) not in opened
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"ignoring busy_file {f}: it is a FIFO, not a regular file"]
    gate = Gate([s], poll=0.01)
    _bounded(lambda: gate.wait_idle("download"))  # the gate does not wait on it


def test_a_fifo_swapped_in_after_lstat_is_opened_non_blocking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    f = tmp_path / "busy"
    os.mkfifo(f)
    reg = tmp_path / "reg"
    reg.write_text("9")
    real_lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p: real_lstat(reg if Path(p) == f else p))
    r = _bounded(lambda: read_busy_file(f))
    assert isinstance(r, _idle.BusyFileReading) and r.kind == "FIFO"


def test_a_gib_sparse_file_is_not_read(tmp_path: Path, reads: list[int]) -> None:
    f = tmp_path / "busy"
    with open(f, "wb") as out:
        out.truncate(1 << 30)
    s = BusyFileSignal(f)
    before = _rchar()
    assert _bounded(s.busy) is None  # not a depth: ignored, not busy for stale_after
    assert _rchar() - before < 4096
    assert reads == []  # its size alone says it is no signal


def test_at_most_a_few_bytes_are_read(tmp_path: Path, reads: list[int]) -> None:
    f = tmp_path / "busy"
    f.write_bytes(b"3" * BUSY_FILE_MAX_BYTES)  # the longest a depth may be
    s = BusyFileSignal(f, max_depth=0)
    assert s.busy() is not None
    assert reads and max(reads) <= BUSY_FILE_MAX_BYTES + 1


@pytest.mark.parametrize("target", ["file", "fifo", "dangling"])
def test_a_symlink_is_not_followed(tmp_path: Path, target: str, reads: list[int]) -> None:
    t = tmp_path / "target"
    if target == "file":
        t.write_text("9\n")  # busy, if the link were followed
    elif target == "fifo":
        os.mkfifo(t)
    f = tmp_path / "busy"
    f.symlink_to(t)
    assert _bounded(BusyFileSignal(f).busy) is None
    assert reads == []


def test_a_symlink_swapped_in_after_lstat_is_refused_by_o_nofollow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = tmp_path / "target"
    t.write_text("9\n")
    f = tmp_path / "busy"
    f.symlink_to(t)
    real_lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p: real_lstat(t if Path(p) == f else p))
    assert read_busy_file(f).kind == "symlink"


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_a_device_is_not_opened(path: str, reads: list[int]) -> None:
    assert _bounded(BusyFileSignal(Path(path)).busy) is None
    assert reads == []


def test_a_directory_is_ignored(tmp_path: Path) -> None:
    assert BusyFileSignal(tmp_path).busy() is None


def test_a_small_fresh_unparsable_file_is_busy_until_stale(tmp_path: Path) -> None:
    f = tmp_path / "busy"
    f.write_bytes(b"")  # the application is mid-write
    now = [time.time()]
    s = BusyFileSignal(f, stale_after=60, clock=lambda: now[0])
    assert "unreadable" in (s.busy() or "")
    now[0] += 61
    assert s.busy() is None  # it cannot block updates beyond stale_after


@pytest.mark.parametrize(("head", "depth"), [
    (b"3\n", 3), (b" 12 \n", 12), (b"0", 0), (b"-1", None), (b"x", None), (b"", None),
    ("٣".encode(), None), (b"\xff", None), (b"1" * (BUSY_FILE_MAX_BYTES + 1), None)])
def test_parse_depth(head: bytes, depth: int | None) -> None:
    assert _idle.parse_depth(head) == depth


def test_a_file_that_never_parses_stops_meaning_busy_after_a_grace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    f = tmp_path / "busy"
    f.write_text("Name: python\n")  # e.g. busy_file pointed at a /proc file by mistake
    now = [time.time()]
    s = BusyFileSignal(f, stale_after=1e9, clock=lambda: now[0])
    assert "unreadable" in (s.busy() or "")
    now[0] += _idle.BUSY_FILE_GRACE + 1
    with caplog.at_level(logging.WARNING, "modelward.updater.idle"):
        assert s.busy() is None
        assert s.busy() is None
    assert len(caplog.records) == 1 and "held no queue depth" in caplog.records[0].getMessage()
    f.write_text("7\n")  # rewritten with a depth: a signal again
    os.utime(f, (now[0], now[0]))
    assert "queue depth 7" in (s.busy() or "")


def test_a_proc_file_does_not_block_updates_for_good() -> None:
    now = [time.time()]
    s = BusyFileSignal(Path("/proc/self/stat"), clock=lambda: now[0])
    s.busy()
    now[0] += _idle.BUSY_FILE_GRACE + 1
    assert s.busy() is None
