"""Attacks on the delta receive pipeline (updater/install/_delta._fetch: one hash task per
piece on the pool, one writer thread writing in order only chunks that matched, a
write-behind thread): failures in every order inside the device (the writer fails with
ENOSPC, a hash task fails, an interrupt mid-fetch, interrupts while the pipeline winds
down) and the disk attacker between the writer's write and the seal.

What must hold after each failure: incoming holds only verified chunks, as a prefix of
what came (nothing written after a chunk that failed), the resume fetches exactly the
missing ones, and no thread of the pipeline is left running once assemble returns or
raises."""

from __future__ import annotations

import errno
import hashlib
import itertools
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.updater.bundle._chunkindex import ChunkIndex
from modelward.updater.errors import StagedFilesChangedError, StagingError
from modelward.updater.idle import Gate, UpdateInterrupted
from modelward.updater.install import _delta
from modelward.updater.install._sealed import seal_verified
from tests.unit.test_i16_fastfetch import _chunk_list, _chunks_on_disk, _Reusing, _Stable

Release = tuple[bytes, ChunkIndex, TargetFile]


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


def _assemble(tmp: Path, rel: Release, fake: object, gate: Gate | None = None
              ) -> _delta.DeltaStats:
    _, ix, tf = rel
    staging = tmp / "state" / "staging"
    staging.parent.mkdir(exist_ok=True)
    return _delta.assemble(ix, tf, "https://o/x.tar", fake, staging,  # type: ignore[arg-type]
                           staging / "incoming", [], gate or Gate())[3]


def _pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.is_alive() and t.name.startswith("delta")]


def _no_threads_left() -> bool:
    deadline = time.monotonic() + 0.5  # (a thread that ends by itself right after: fine)
    while _pipeline_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not _pipeline_threads()


def _place_of(ix: ChunkIndex, k: int) -> tuple[str, int, int]:
    """(file, offset in it, length) of chunk ``k`` in bundle order."""
    for f in ix.files:
        for c in f.chunks:
            if k == 0:
                return f.path, f.file_offset(c), c.length
            k -= 1
    raise IndexError(k)


def _is_prefix(on_disk: list[bool]) -> bool:
    k = on_disk.index(False) if False in on_disk else len(on_disk)
    return not any(on_disk[k:])


def _resume_asks_only_the_rest(tmp: Path, rel: Release) -> None:
    """The resume fetches every missing chunk and none that incoming holds (the ranges
    may coalesce the bundle's framing between chunks, never a held chunk)."""
    data, ix, _ = rel
    on_disk = _chunks_on_disk(tmp, ix)
    chunks = _chunk_list(ix)
    again = _Stable(data)
    _assemble(tmp, rel, again)
    assert all(_chunks_on_disk(tmp, ix))
    held = {o for (o, _), ok in zip(chunks, on_disk, strict=True) if ok}
    for o, n in chunks:
        fetched = any(a <= o and o + n <= a + ln for a, ln in again.asked)
        overlaps = any(a < o + n and o < a + ln for a, ln in again.asked)
        assert overlaps == fetched  # (a chunk is fetched whole or not at all)
        if o in held:
            assert not fetched, f"held chunk at {o} fetched again"
    if _is_prefix(on_disk) and False in on_disk:
        assert len(again.asked) == 1  # (a prefix: one range, the rest)
    assert _no_threads_left()


# --- the writer fails (ENOSPC) on one chunk ---------------------------------------------


def fail_write_of(monkeypatch: pytest.MonkeyPatch, ix: ChunkIndex, k: int) -> list[int]:
    """The disk is full at chunk ``k``: the chunks of its run before it are written, then
    the write fails (ENOSPC). Returns a list that gets an entry when it failed."""
    path, at, _ = _place_of(ix, k)
    real = _delta._Files.write_run
    failed: list[int] = []

    def write_run(self: _delta._Files, p: _delta.Place,
                  parts: Sequence[bytes | bytearray | memoryview]) -> None:
        ends = list(itertools.accumulate((len(d) for d in parts), initial=p.offset))
        if p.root == "incoming" and p.path == path and at in ends[:-1] and not failed:
            failed.append(1)
            if ends.index(at):
                real(self, p, parts[:ends.index(at)])
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        real(self, p, parts)

    monkeypatch.setattr(_delta._Files, "write_run", write_run)
    return failed


def test_a17_enospc_on_one_chunk_writes_nothing_after_it(
        tmp_path: Path, release: Release, monkeypatch: pytest.MonkeyPatch) -> None:
    data, ix, _ = release
    k = len(_chunk_list(ix)) // 3
    failed = fail_write_of(monkeypatch, ix, k)
    with pytest.raises(StagingError):
        _assemble(tmp_path, release, _Stable(data, 1 << 20))
    assert failed
    assert _no_threads_left()
    on_disk = _chunks_on_disk(tmp_path, ix)
    assert not on_disk[k]
    assert _is_prefix(on_disk)  # nothing written after the chunk whose write failed
    monkeypatch.undo()
    _resume_asks_only_the_rest(tmp_path, release)


# --- a hash task fails ----------------------------------------------------------------------


def test_a17_a_hash_task_that_fails_writes_nothing_after_it(
        tmp_path: Path, release: Release, monkeypatch: pytest.MonkeyPatch) -> None:
    data, ix, _ = release
    chunks = _chunk_list(ix)
    k = len(chunks) // 3
    off, n = chunks[k]
    target = data[off:off + n]
    real = _delta._digest

    def digest(d: bytes | bytearray | memoryview) -> bytes:
        if len(d) == n and bytes(d) == target:
            raise MemoryError("the hash thread failed (test)")
        return real(d)

    monkeypatch.setattr(_delta, "_digest", digest)
    with pytest.raises(MemoryError):
        _assemble(tmp_path, release, _Stable(data, 1 << 20))
    assert _no_threads_left()
    on_disk = _chunks_on_disk(tmp_path, ix)
    assert not on_disk[k]
    assert _is_prefix(on_disk)
    monkeypatch.setattr(_delta, "_digest", real)
    _resume_asks_only_the_rest(tmp_path, release)


# --- an interrupt mid-fetch -----------------------------------------------------------------


class _InterruptAt(Gate):
    def __init__(self, after: int, exc: type[BaseException]) -> None:
        super().__init__()
        self.after, self.exc, self.seen = after, exc, 0

    def checkpoint(self, what: str) -> None:
        if what == "delta: download":
            self.seen += 1
            if self.seen == self.after:
                raise self.exc("interrupted mid-fetch (test)")
        super().checkpoint(what)


@pytest.mark.parametrize("stable", [True, False])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, UpdateInterrupted])
def test_a17_interrupt_mid_fetch_leaves_a_verified_prefix_and_no_thread(
        tmp_path: Path, release: Release, stable: bool, exc: type[BaseException]) -> None:
    data, ix, _ = release
    fake = _Stable(data, 200_000) if stable else _Reusing(data, 200_000)
    with pytest.raises(exc):
        _assemble(tmp_path, release, fake, _InterruptAt(7, exc))
    assert _no_threads_left()
    on_disk = _chunks_on_disk(tmp_path, ix)
    assert any(on_disk) and not all(on_disk)
    assert _is_prefix(on_disk)
    _resume_asks_only_the_rest(tmp_path, release)


def test_a17_repeated_interrupts_leave_no_pipeline_thread_running(
        tmp_path: Path, release: Release, monkeypatch: pytest.MonkeyPatch) -> None:
    data, ix, _ = release
    real = _delta._digest

    def slow(d: bytes | bytearray | memoryview) -> bytes:
        time.sleep(0.1)
        return real(d)

    monkeypatch.setattr(_delta, "_digest", slow)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("Ctrl-C again (test)")

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        gate = _InterruptAt(30, KeyboardInterrupt)
        real_cp = gate.checkpoint

        def checkpoint(what: str) -> None:
            if what == "delta: download" and gate.seen == 29:
                signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)  # the user keeps pressing
            real_cp(what)

        gate.checkpoint = checkpoint  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            _assemble(tmp_path, release, _Stable(data, 50_000), gate)
        signal.setitimer(signal.ITIMER_REAL, 0)
        left = _pipeline_threads()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    for t in left:  # (let them end before the next test)
        t.join(10)
    assert not left, [t.name for t in left]


# --- the disk attacker between the writer's write and the seal ------------------------------


@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
def test_a17_a_byte_changed_after_the_write_is_caught_by_the_seal(
        tmp_path: Path, release: Release, where: float) -> None:
    data, ix, _ = release
    _assemble(tmp_path, release, _Stable(data, 1 << 20))
    assert _no_threads_left()
    incoming = tmp_path / "state" / "staging" / "incoming"
    sizes = {MANIFEST_NAME: len(ix.manifest_bytes), **{f.path: f.size for f in ix.files}}
    seal_verified(incoming, [], sizes, ix.fingerprint, "classifier 1.0.0", "test").close()
    path, at, n = _place_of(ix, int(len(_chunk_list(ix)) * where))
    with open(incoming / path, "r+b") as fh:
        fh.seek(at + n // 2)
        b = fh.read(1)
        fh.seek(at + n // 2)
        fh.write(bytes([b[0] ^ 1]))
    with pytest.raises(StagedFilesChangedError):
        seal_verified(incoming, [], sizes, ix.fingerprint, "classifier 1.0.0", "test")


MANIFEST_NAME = _delta.MANIFEST


# --- a hostile origin hides an altered chunk behind a cut connection --------------------------


def test_a17_an_altered_chunk_then_a_cut_is_still_refused_as_altered(
        tmp_path: Path, release: Release) -> None:
    data, ix, _ = release
    chunks = _chunk_list(ix)
    k = len(chunks) // 2
    off, n = chunks[k]
    bad = bytearray(data)
    bad[off + n // 2] ^= 1
    # (the piece that completes chunk k is handed on; the connection is cut just after)
    cut = off + n - chunks[0][0] + 1
    honest = tmp_path / "honest"
    honest.mkdir()
    with pytest.raises(tuf_exc.DownloadError):  # (control: the same cut, honest bytes)
        _assemble(honest, release, _Stable(data, 1 << 20, cut_at=cut))
    assert _chunks_on_disk(honest, ix)[k]  # (chunk k came whole before the cut)
    fake = _Stable(bytes(bad), 1 << 20, cut_at=cut)
    with pytest.raises(_delta.DeltaChunkError):
        _assemble(tmp_path, release, fake)
    assert _no_threads_left()
    on_disk = _chunks_on_disk(tmp_path, ix)
    assert not any(on_disk[k:]) and _is_prefix(on_disk)
