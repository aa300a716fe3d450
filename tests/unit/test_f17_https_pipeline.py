"""The next attacks on the delta receive pipeline after the a17 fixes
(updater/install/_delta._fetch): failures that come while it winds down from another one.

A write that fails (ENOSPC) while the chunks received before a cut are written, an altered
chunk still waiting when the user interrupts, an altered chunk behind a cut together with
a write that fails before it, and a hash task that fails after a cut: in each, nothing
after the first chunk that failed is on disk (a verified prefix), the error raised is the
one that names the fault, and no pipeline thread is left running."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.updater.errors import StagingError
from modelward.updater.install import _delta
from tests.unit.test_a17_https_pipeline import (
    Release,
    _assemble,
    _InterruptAt,
    _is_prefix,
    _no_threads_left,
    _resume_asks_only_the_rest,
    fail_write_of,
)
from tests.unit.test_i16_fastfetch import _chunk_list, _chunks_on_disk, _Stable


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    from tests.integration._i16_delta import big_model

    tmp = tmp_path_factory.mktemp("rel")
    out = tmp / "classifier-1.0.0.tar"
    build_bundle(big_model(tmp / "m.onnx"), "classifier", "1.0.0", out,
                 options=BuildOptions())
    data = out.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    return data, build_index(out, sha), TargetFile(len(data), {"sha256": sha},
                                                   "classifier/classifier-1.0.0.tar")


def test_f17_enospc_while_winding_down_a_cut_keeps_a_prefix(
        tmp_path: Path, release: Release, monkeypatch: pytest.MonkeyPatch) -> None:
    data, ix, _ = release
    chunks = _chunk_list(ix)
    k = len(chunks) // 4
    cut = chunks[len(chunks) // 2][0] - chunks[0][0]  # (k and more still wait at the cut)
    monkeypatch.setattr(_delta, "FETCH_INFLIGHT", len(data) * 2)
    failed = fail_write_of(monkeypatch, ix, k)
    with pytest.raises((tuf_exc.DownloadError, StagingError)):
        _assemble(tmp_path, release, _Stable(data, 100_000, cut_at=cut))
    assert failed
    assert _no_threads_left()
    on_disk = _chunks_on_disk(tmp_path, ix)
    assert not on_disk[k] and _is_prefix(on_disk)
    monkeypatch.undo()
    _resume_asks_only_the_rest(tmp_path, release)


def test_f17_an_altered_chunk_waiting_at_an_interrupt_is_never_written(
        tmp_path: Path, release: Release, monkeypatch: pytest.MonkeyPatch) -> None:
    data, ix, _ = release
    chunks = _chunk_list(ix)
    k = 3
    off, n = chunks[k]
    bad = bytearray(data)
    bad[off + n // 2] ^= 1
    monkeypatch.setattr(_delta, "FETCH_INFLIGHT", len(data) * 2)  # (all wait at the interrupt)
    with pytest.raises(KeyboardInterrupt):  # (the user's interrupt is what is raised)
        _assemble(tmp_path, release, _Stable(bytes(bad), 100_000),
                  _InterruptAt(len(data) // 100_000 - 2, KeyboardInterrupt))
    assert _no_threads_left()
    on_disk = _chunks_on_disk(tmp_path, ix)
    assert all(on_disk[:k]) and not any(on_disk[k:])


def test_f17_a_write_failure_before_an_altered_chunk_behind_a_cut(
        tmp_path: Path, release: Release, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fails on chunk j, chunk k > j is altered, then the connection is cut:
    nothing from j on is written (the altered chunk never reaches the disk)."""
    data, ix, _ = release
    chunks = _chunk_list(ix)
    j, k = len(chunks) // 4, len(chunks) // 2
    off, n = chunks[k]
    bad = bytearray(data)
    bad[off + n // 2] ^= 1
    monkeypatch.setattr(_delta, "FETCH_INFLIGHT", len(data) * 2)
    failed = fail_write_of(monkeypatch, ix, j)
    with pytest.raises((tuf_exc.DownloadError, StagingError)):
        _assemble(tmp_path, release,
                  _Stable(bytes(bad), 100_000, cut_at=off + n - chunks[0][0] + 1))
    assert failed
    assert _no_threads_left()
    on_disk = _chunks_on_disk(tmp_path, ix)
    assert not any(on_disk[j:]) and _is_prefix(on_disk)


def test_f17_a_hash_task_failing_after_a_cut_keeps_a_prefix(
        tmp_path: Path, release: Release, monkeypatch: pytest.MonkeyPatch) -> None:
    data, ix, _ = release
    chunks = _chunk_list(ix)
    k = len(chunks) // 4
    off, n = chunks[k]
    target = data[off:off + n]
    real = _delta._digest

    def digest(d: bytes | bytearray | memoryview) -> bytes:
        if len(d) == n and bytes(d) == target:
            raise MemoryError("the hash thread failed (test)")
        return real(d)

    monkeypatch.setattr(_delta, "FETCH_INFLIGHT", len(data) * 2)
    monkeypatch.setattr(_delta, "_digest", digest)
    cut = chunks[len(chunks) // 2][0] - chunks[0][0]
    with pytest.raises(tuf_exc.DownloadError):  # (the transfer failure: resumed)
        _assemble(tmp_path, release, _Stable(data, 100_000, cut_at=cut))
    assert _no_threads_left()
    on_disk = _chunks_on_disk(tmp_path, ix)
    assert not on_disk[k] and _is_prefix(on_disk)
    monkeypatch.undo()
    _resume_asks_only_the_rest(tmp_path, release)
