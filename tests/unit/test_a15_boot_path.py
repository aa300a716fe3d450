"""Attacks (a15app) on the lean boot path: the parallel leaf hashing of trust._fingerprint
(files that change while hashed, sparse and many files, leaf-boundary tricks, failing
threads) and the boot-check parser's odd argv."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from modelward.trust import _fingerprint as fp
from modelward.trust._fingerprint import (
    LEAF_SIZE,
    MAX_ENTRIES,
    FileChangedError,
    MerkleHasher,
    directory_entries,
    fd_merkle_root,
)
from tests.unit.test_i15_boot_parser import _parse


def _slot(tmp: Path) -> Path:
    s = tmp / "slot"
    s.mkdir(mode=0o750)
    os.chmod(s, 0o750)  # noqa: S103 - the mode the agent gives a slot
    return s


def _file(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    os.chmod(p, 0o640)
    return p


# --- parallel hashing --------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, LEAF_SIZE - 1, LEAF_SIZE, LEAF_SIZE + 1,
                                  2 * LEAF_SIZE, 3 * LEAF_SIZE + 7])
def test_a15_parallel_root_equals_the_streamed_bundle_root(tmp_path: Path, size: int) -> None:
    data = (hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1))[:size]
    p = _file(tmp_path / "f", data)
    h = MerkleHasher()
    for i in range(0, size, 999_983):  # (odd chunks across leaf boundaries)
        h.update(data[i:i + 999_983])
    with open(p, "rb") as f:
        assert fd_merkle_root(f.fileno()) == (size, h.hexdigest())


def test_a15_leaf_and_node_are_domain_separated(tmp_path: Path) -> None:
    """A one-leaf file holding ``left || right`` of a two-leaf file has another root (0x00
    vs 0x01 prefix), and the same bytes split at another boundary give another root."""
    two = b"a" * LEAF_SIZE + b"b"
    with open(_file(tmp_path / "two", two), "rb") as f:
        _, root_two = fd_merkle_root(f.fileno())
    left = hashlib.sha256(b"\x00" + two[:LEAF_SIZE]).digest()
    right = hashlib.sha256(b"\x00" + two[LEAF_SIZE:]).digest()
    assert root_two == hashlib.sha256(b"\x01" + left + right).hexdigest()
    with open(_file(tmp_path / "one", left + right), "rb") as f:
        assert fd_merkle_root(f.fileno())[1] != root_two
    with open(_file(tmp_path / "node", b"\x01" + left + right), "rb") as f:
        assert fd_merkle_root(f.fileno())[1] != root_two


@pytest.mark.parametrize("change", ["grow", "shrink"])
def test_a15_file_changing_size_while_threads_hash_never_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str,
) -> None:
    slot = _slot(tmp_path)
    p = _file(slot / "model.onnx", b"m" * (3 * LEAF_SIZE))
    real, once = fp._read_leaf, threading.Lock()

    def racing(fd: int, offset: int, length: int, buf: bytearray) -> bytes:
        if once.acquire(blocking=False):
            with open(p, "r+b") as f:
                if change == "grow":
                    f.seek(0, 2)
                    f.write(b"x")
                else:
                    f.truncate(LEAF_SIZE + 5)
        return real(fd, offset, length, buf)

    monkeypatch.setattr(fp, "_read_leaf", racing)
    assert [(e.path, e.size) for e in directory_entries(slot)] == [("model.onnx", -1)]


def test_a15_worker_error_is_a_non_matching_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    slot = _slot(tmp_path)
    _file(slot / "model.onnx", b"m" * (4 * LEAF_SIZE))
    real = fp._read_leaf

    def failing(fd: int, offset: int, length: int, buf: bytearray) -> bytes:
        if offset == 3 * LEAF_SIZE:
            raise FileChangedError("boom")
        return real(fd, offset, length, buf)

    monkeypatch.setattr(fp, "_read_leaf", failing)
    assert [(e.path, e.size) for e in directory_entries(slot)] == [("model.onnx", -1)]


def test_a15_thread_start_failure_waits_for_submitted_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = _file(tmp_path / "f", b"m" * (4 * LEAF_SIZE))
    monkeypatch.setattr(fp, "hash_workers", lambda: 2)
    real, running = fp._read_leaf, threading.Event()

    def slow(fd: int, offset: int, length: int, buf: bytearray) -> bytes:
        running.set()
        time.sleep(0.3)
        return real(fd, offset, length, buf)

    monkeypatch.setattr(fp, "_read_leaf", slow)
    pool = ThreadPoolExecutor(max_workers=2)
    submitted: list[object] = []
    real_submit = pool.submit

    def submit(fn, *a):  # type: ignore[no-untyped-def]
        if submitted:
            running.wait(2)
            raise RuntimeError("can't start new thread")
        fut = real_submit(fn, *a)
        submitted.append(fut)
        return fut

    monkeypatch.setattr(pool, "submit", submit)
    try:
        with open(p, "rb") as f:
            with pytest.raises(OSError):
                fd_merkle_root(f.fileno(), pool)
            assert all(fut.done() for fut in submitted)  # type: ignore[attr-defined]
    finally:
        pool.shutdown()


def test_a15_huge_sparse_file_does_not_stall_the_boot_check(tmp_path: Path) -> None:
    slot = _slot(tmp_path)
    p = _file(slot / "model.onnx", b"")
    os.truncate(p, 1 << 40)
    code = ("import sys; from pathlib import Path; "
            "from modelward.trust._fingerprint import directory_entries; "
            "print(directory_entries(Path(sys.argv[1])))")
    try:
        r = subprocess.run([sys.executable, "-c", code, str(slot)], timeout=5,
                           capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail("directory_entries still hashing a sparse 1 TiB file after 5 s")
    assert r.returncode == 0, r.stderr


@pytest.mark.xdist_group("machine")
def test_a15_many_small_files_cost_no_time(tmp_path: Path) -> None:
    slot = _slot(tmp_path)
    for i in range(5000):
        _file(slot / f"f{i:05}", b"x")
    t0 = time.monotonic()
    entries = directory_entries(slot)
    assert time.monotonic() - t0 < 2.0
    assert len(entries) == MAX_ENTRIES + 1 and entries[-1].size == -1


# --- boot-check argv ---------------------------------------------------------------------

from modelward.cli import _parser_for, build_parser  # noqa: E402


@pytest.mark.parametrize("argv", [
    ["--log", "json", "agent", "boot-check"],  # (an abbreviation: the full parser)
    ["--log-format", "json", "-v", "--debug", "agent", "boot-check", "-v"],
    ["agent", "boot-check", "--log-format", "json"],
    ["--bogus", "agent", "boot-check"],
    ["-x", "agent", "boot-check"],
    ["--", "agent", "boot-check"],
    ["--log-format", "json", "--", "agent", "boot-check"],
    ["agent", "boot-check", "--tpm-wait", "1e9"],
    ["agent", "boot-check", "--tpm-wait", "nan"],
    ["agent", "boot-check", "--tpm", "3", "--conf", "a"],
    ["--log-format", "agent", "boot-check"],
    ["agent", "boot-check", "status"],
    ["agent", "boot-check", "--config"],
])
def test_a15_boot_check_odd_argv_as_the_full_parser(argv: list[str]) -> None:
    assert _parse(_parser_for(argv), argv) == _parse(build_parser(), argv)
