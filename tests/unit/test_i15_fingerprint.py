"""Issue 15: the boot check hashes leaves on every core; the fingerprint does not change.

``fd_merkle_root`` reads leaves with ``preadv`` into one buffer per task on a bounded
pool; these tests hold it byte for byte to RFC 6962 (written out independently), for any
number of threads, and check its bounds and its errors.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import modelward.trust._fingerprint as fpm
from modelward.trust._fingerprint import (
    LEAF_SIZE,
    FileChangedError,
    directory_entries,
    fd_merkle_root,
    file_merkle_root,
    slot_fingerprint,
)

SIZES = [0, 1, LEAF_SIZE - 1, LEAF_SIZE, LEAF_SIZE + 1, 3 * LEAF_SIZE, 3 * LEAF_SIZE - 1,
         5 * LEAF_SIZE + 7]


def _reference(data: bytes) -> str:
    """RFC 6962 2.1 over 4 MiB leaves, without the implementation's code."""
    leaves = [hashlib.sha256(b"\x00" + data[i:i + LEAF_SIZE]).digest()
              for i in range(0, len(data), LEAF_SIZE)]

    def mth(d: list[bytes]) -> bytes:
        if not d:
            return hashlib.sha256(b"").digest()
        if len(d) == 1:
            return d[0]
        k = 1
        while k * 2 < len(d):
            k *= 2
        return hashlib.sha256(b"\x01" + mth(d[:k]) + mth(d[k:])).digest()

    return mth(leaves).hex()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("fp")
    out = {}
    for size in SIZES:
        data = random.Random(size).randbytes(size)
        p = d / f"f{size}"
        p.write_bytes(data)
        out[size] = (p, _reference(data))
    return out


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("size", SIZES)
def test_same_root_for_any_thread_count(files: dict[int, tuple[Path, str]], size: int,
                                        workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fpm, "hash_workers", lambda: workers)
    path, expected = files[size]
    assert file_merkle_root(path) == (size, expected)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # the caller's pool
        assert file_merkle_root(path, pool) == (size, expected)


def test_known_vectors(tmp_path: Path) -> None:
    """Fixed values, so a change of the format (not only of the code) is caught too."""
    p = tmp_path / "f"
    p.write_bytes(b"")
    assert file_merkle_root(p)[1] == hashlib.sha256(b"").hexdigest()
    p.write_bytes(b"a")
    assert file_merkle_root(p)[1] == hashlib.sha256(b"\x00a").hexdigest()
    p.write_bytes(b"\x01" * (LEAF_SIZE + 1))
    left = hashlib.sha256(b"\x00" + b"\x01" * LEAF_SIZE).digest()
    right = hashlib.sha256(b"\x00\x01").digest()
    assert file_merkle_root(p)[1] == hashlib.sha256(b"\x01" + left + right).hexdigest()


def test_workers_follow_the_cpus_this_process_may_use() -> None:
    n = fpm.hash_workers()
    assert 1 <= n <= (os.cpu_count() or 1)
    assert n == len(os.sched_getaffinity(0))


def test_threads_and_leaves_in_memory_are_bounded(files: dict[int, tuple[Path, str]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """At most one leaf per task is read at a time, on at most hash_workers() threads,
    and every leaf is read exactly once."""
    monkeypatch.setattr(fpm, "hash_workers", lambda: 3)
    real = fpm._read_leaf  # noqa: SLF001
    lock = threading.Lock()
    active, peak, threads, offsets, buffers = 0, 0, set(), [], set()

    def counting(fd: int, offset: int, length: int, buf: bytearray) -> bytes:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
            threads.add(threading.get_ident())
            offsets.append(offset)
            buffers.add(id(buf))
        try:
            time.sleep(0.002)
            return real(fd, offset, length, buf)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(fpm, "_read_leaf", counting)
    path, expected = files[5 * LEAF_SIZE + 7]
    assert file_merkle_root(path) == (5 * LEAF_SIZE + 7, expected)
    assert peak <= 3 and len(threads) <= 3 and len(buffers) <= 3
    assert sorted(offsets) == [i * LEAF_SIZE for i in range(6)]


class _TruncatingPool(ThreadPoolExecutor):
    """A pool that truncates ``path`` before it runs its first task (a file that shrinks
    while it is hashed)."""

    def __init__(self, path: Path, to: int) -> None:
        super().__init__(max_workers=2)
        self.path, self.to, self.done = path, to, False

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        if not self.done:
            self.done = True
            os.truncate(self.path, self.to)
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize("to", [0, LEAF_SIZE + 3, 3 * LEAF_SIZE - 1])
def test_file_that_shrinks_while_hashed_is_an_error_not_a_crash(tmp_path: Path,
                                                                to: int) -> None:
    """A mapping of a truncated file faults (SIGBUS kills the boot check); a read is
    short: a typed OSError, and the file then never matches."""
    p = tmp_path / "m"
    p.write_bytes(b"\x05" * (3 * LEAF_SIZE))
    with open(p, "rb") as f, _TruncatingPool(p, to) as pool, \
            pytest.raises(FileChangedError, match="file ended at"):
        fd_merkle_root(f.fileno(), pool)
    assert issubclass(FileChangedError, OSError)  # callers' `except OSError` holds


@pytest.mark.parametrize("size", [100, 3 * LEAF_SIZE])
def test_file_that_grows_while_hashed_is_an_error(tmp_path: Path, size: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes appended while the leaves are read: the root of the first ``size`` bytes is
    not the file's (it would vouch for a file that has more), so it is an error too."""
    p = tmp_path / "m"
    p.write_bytes(b"\x05" * size)
    real = fpm._read_leaf  # noqa: SLF001

    def growing(fd: int, offset: int, length: int, buf: bytearray) -> bytes:
        with open(p, "ab") as f:
            f.write(b"more")
        return real(fd, offset, length, buf)

    monkeypatch.setattr(fpm, "_read_leaf", growing)
    with open(p, "rb") as f, pytest.raises(FileChangedError, match="changed size"):
        fd_merkle_root(f.fileno())


def test_shrunk_file_in_a_slot_never_matches(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    slot = tmp_path / "slot"
    slot.mkdir(mode=0o750)
    (slot / "model.onnx").write_bytes(b"\x07" * (2 * LEAF_SIZE + 1))
    good = slot_fingerprint(directory_entries(slot))
    real = fpm._read_leaf  # noqa: SLF001

    def shrinking(fd: int, offset: int, length: int, buf: bytearray) -> bytes:
        os.truncate(slot / "model.onnx", LEAF_SIZE)
        return real(fd, offset, length, buf)

    monkeypatch.setattr(fpm, "_read_leaf", shrinking)
    entries = directory_entries(slot)
    assert [(e.path, e.size) for e in entries] == [("model.onnx", -1)]
    assert slot_fingerprint(entries) != good


def test_no_task_reads_the_fd_after_an_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """When one leaf fails, the call returns only after every task has stopped, so no
    thread reads an fd the caller closes (and whose number may be reused) meanwhile; the
    tasks stop early instead of reading the rest."""
    monkeypatch.setattr(fpm, "hash_workers", lambda: 2)
    p = tmp_path / "m"
    p.touch()
    os.truncate(p, 12 * LEAF_SIZE)  # (sparse: nothing written)
    running, reads = 0, 0
    lock = threading.Lock()

    def failing(fd: int, offset: int, length: int, buf: bytearray) -> bytes:
        nonlocal running, reads
        with lock:
            running += 1
            reads += 1
        try:
            if offset == 0:  # (the first task's first leaf fails while the second reads)
                time.sleep(0.03)
                raise OSError(5, "I/O error")
            time.sleep(0.1)
            return b"\x00" * 32
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(fpm, "_read_leaf", failing)
    with ThreadPoolExecutor(max_workers=2) as pool:  # the caller's, as directory_entries'
        with open(p, "rb") as f, pytest.raises(OSError, match="I/O error"):
            fd_merkle_root(f.fileno(), pool)
        seen = reads
        assert running == 0  # nothing runs on
        time.sleep(0.15)
        assert reads == seen  # nothing starts after
    assert reads < 7  # (the second task stopped before its sixth and last leaf)


def test_links_and_other_files_still_never_match(tmp_path: Path) -> None:
    """The no-follow, single-link and regular-file checks are unchanged."""
    slot = tmp_path / "slot"
    slot.mkdir(mode=0o750)
    (slot / "model.onnx").write_bytes(b"m" * 100)
    outside = tmp_path / "outside"
    outside.write_bytes(b"m" * 100)
    os.symlink(outside, slot / "link.onnx")
    os.link(slot / "model.onnx", tmp_path / "second-name")
    os.mkfifo(slot / "fifo")
    rows = {e.path: e.size for e in directory_entries(slot)}
    assert rows == {"model.onnx": -1, "link.onnx": -1, "fifo": -1}
