"""Attacker a10delta: the delta install's new Plan (arrays, grouping by sha256), its runs of
matched chunks in one pwritev, and the slot hint written in pieces.

A fast harness: a real bundle and its index (tests/integration/_i16_delta.big_model), a
fake transport over the bundle's bytes, the real assembler writing into a real staging
directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.updater.bundle._chunkindex import (
    Chunk,
    ChunkIndex,
    IndexedFile,
    make_index,
)
from modelward.updater.errors import ChunkIndexError, StagingError
from modelward.updater.idle import Gate
from modelward.updater.install import _delta
from modelward.updater.install._delta import Base, DeltaChunkError, DeltaUnavailable, plan_needs


@pytest.fixture
def release(tmp_path: Path) -> tuple[bytes, ChunkIndex, TargetFile]:
    from tests.integration._i16_delta import big_model

    model = big_model(tmp_path / "m.onnx")
    out = tmp_path / "classifier-1.0.0.tar"
    build_bundle(model, "classifier", "1.0.0", out, options=BuildOptions())
    data = out.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    tf = TargetFile(len(data), {"sha256": sha}, "classifier/classifier-1.0.0.tar")
    return data, build_index(out, sha), tf


class _Origin:
    """The bundle's bytes, each range in pieces of 30000 bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
        raise AssertionError("native ranges only")

    def fetch_ranges(self, url: str, ranges: Sequence[tuple[int, int]]
                     ) -> Iterator[tuple[int, bytes]]:
        for off, n in ranges:
            for i in range(off, off + n, 30000):
                yield i, self.data[i:min(i + 30000, off + n)]


def _assemble(tmp: Path, ix: ChunkIndex, tf: TargetFile, origin: object):  # type: ignore[no-untyped-def]
    staging = tmp / "state" / "staging"
    staging.parent.mkdir(exist_ok=True)
    return _delta.assemble(ix, tf, "https://o/x.tar", origin, staging,  # type: ignore[arg-type]
                           staging / "incoming", [], Gate())


def _biggest_file(ix: ChunkIndex) -> int:
    return max(range(len(ix.files)), key=lambda i: len(ix.files[i].chunks))


def _one_sha_many_lengths(ix: ChunkIndex) -> tuple[ChunkIndex, int]:
    """What a team key may sign: the biggest file's chunks, offsets and lengths as they
    are, but every chunk after its longest one claims the longest one's sha256 (so their
    bytes are never fetched: the longest chunk's are written at each of their places).
    Returns the index and the longest chunk's length."""
    fi = _biggest_file(ix)
    f = ix.files[fi]
    chunks = list(f.chunks)
    k = max(range(len(chunks) - 1), key=lambda j: chunks[j].length)
    longest = chunks[k]
    forged = [*chunks[:k + 1], *(Chunk(c.offset, c.length, longest.sha256)
                                 for c in chunks[k + 1:])]
    files = list(ix.files)
    files[fi] = IndexedFile(f.path, f.size, f.sha256, f.merkle_root, f.data_offset,
                            tuple(forged))
    return make_index(ix.bundle_length, ix.bundle_sha256, ix.manifest_offset,
                      ix.manifest_bytes, files, ix.chunking), longest.length


def test_a10_one_sha256_of_two_lengths_is_written_only_within_each_place(
        tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    data, ix, tf = release
    forged, longest = _one_sha_many_lengths(ix)
    f = forged.files[_biggest_file(forged)]
    assert any(c.length != longest for c in f.chunks[1:])  # (lengths differ indeed)
    written = 0
    real_run = _delta._Files.write_run

    def counting(self, p, parts):  # type: ignore[no-untyped-def]
        nonlocal written
        written += sum(memoryview(d).nbytes for d in parts)
        return real_run(self, p, parts)

    _delta._Files.write_run = counting  # type: ignore[method-assign]
    try:
        try:
            _assemble(tmp_path, forged, tf, _Origin(data))
        except (DeltaChunkError, DeltaUnavailable, ChunkIndexError):
            refused = True  # (the correct outcome: the lying index is refused)
        else:
            refused = False
    finally:
        _delta._Files.write_run = real_run  # type: ignore[method-assign]
    incoming = tmp_path / "state" / "staging" / "incoming"
    if not refused:
        # Every byte written lies within a place of the chunk it was hashed as: no file
        # grows past its signed size and nothing is written twice over.
        for g in forged.files:
            assert (incoming / g.path).stat().st_size == g.size, g.path
        assert written <= forged.data_bytes + len(forged.manifest_bytes), (
            written, forged.data_bytes)


def test_a10_a_disk_that_takes_no_byte_fails_the_assembly(
        tmp_path: Path, release, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    data, ix, tf = release
    calls = 0
    real_pwrite = os.pwrite

    def pwrite_none(fd: int, buf: object, off: int) -> int:
        nonlocal calls
        calls += 1
        return 0  # (a write that took nothing, no errno)

    def pwritev_none(fd: int, bufs: object, off: int) -> int:
        nonlocal calls
        calls += 1
        return 0

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            _assemble(tmp_path, ix, tf, _Origin(data))
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            outcome.append(e)

    monkeypatch.setattr(os, "pwrite", pwrite_none)
    monkeypatch.setattr(os, "pwritev", pwritev_none)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    spun = calls
    # (the real calls back: a spinning writer completes and the thread ends)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    monkeypatch.undo()
    t.join(30)
    assert outcome, "the assembly did not end"
    assert spun < 1000, f"{spun} writes of 0 bytes retried at the same offset"
    assert isinstance(outcome[0], (StagingError, OSError)), outcome[0]


def _enospc_after(limit: int):  # type: ignore[no-untyped-def]
    """A pwritev/pwrite that takes at most ``limit`` bytes in all, a short write at the
    limit, then ENOSPC."""
    left = limit
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def pwritev(fd: int, bufs: list[memoryview], off: int) -> int:
        nonlocal left
        if left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        total = sum(b.nbytes for b in bufs)
        if total <= left:
            left -= total
            return real_pwritev(fd, bufs, off)
        # a short write: ``left`` bytes, ending inside some buffer of the run
        took = 0
        for b in bufs:
            n = min(b.nbytes, left - took)
            if n <= 0:
                break
            took += real_pwrite(fd, b[:n], off + took)
        left = 0
        return took

    def pwrite(fd: int, buf: memoryview, off: int) -> int:
        return pwritev(fd, [memoryview(buf).cast("B")], off)

    return pwrite, pwritev


def test_a10_enospc_inside_a_run_leaves_only_matched_bytes_at_their_places(
        tmp_path: Path, release, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A run of chunks cut by a short write then ENOSPC: the assembly fails as a staging
    error, every byte on disk is the bundle's at its place (a prefix of the run, a chunk
    cut short at most), and the next attempt completes and verifies."""
    data, ix, tf = release
    limit = len(ix.manifest_bytes) + ix.data_bytes // 2 + 12345
    pwrite, pwritev = _enospc_after(limit)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "pwritev", pwritev)
    with pytest.raises(StagingError):
        _assemble(tmp_path, ix, tf, _Origin(data))
    monkeypatch.undo()
    incoming = tmp_path / "state" / "staging" / "incoming"
    for f in ix.files:
        got = (incoming / f.path).read_bytes()
        want = data[f.data_offset:f.data_offset + f.size]
        assert len(got) == f.size
        # (every byte is the bundle's or still a hole)
        g, w = np.frombuffer(got, np.uint8), np.frombuffer(want, np.uint8)
        bad = np.flatnonzero((g != w) & (g != 0))
        assert bad.size == 0, (f.path, bad[:3])
    stage, _, entries, stats = _assemble(tmp_path, ix, tf, _Origin(data))
    from modelward.trust._fingerprint import directory_entries, slot_fingerprint

    assert slot_fingerprint(directory_entries(stage.incoming)) == _delta.index_fingerprint(ix)
    assert stats.in_place_bytes > 0  # (what the first attempt wrote was kept)


@pytest.mark.parametrize("swap", ["symlink", "fifo", "torn"])
def test_a10_hint_swapped_or_torn_while_written_in_pieces_is_never_trusted(
        tmp_path: Path, release, swap: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The hint is written in pieces (2f94bc9): the disk replaces its temporary by a link
    or a FIFO between two pieces, or power fails after some pieces (the iterator breaks
    off). Nothing is written outside chunks/, a torn or swapped hint is never read as
    the slot's, and the hint stored before stays intact."""
    _, ix, _ = release
    fp = _delta.index_fingerprint(ix)
    state = tmp_path / "state"
    state.mkdir()
    _delta.write_hint(state, ix, [])  # (the good hint of before)
    before = (state / "chunks" / f"{fp}.json").read_bytes()
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    real = ChunkIndex.iter_bytes

    def pieces(self: ChunkIndex) -> Iterator[bytes]:
        for i, piece in enumerate(real(self)):
            yield piece
            if i == 3:
                d = state / "chunks"
                tmps = [n for n in os.listdir(d) if n.endswith(".tmp")]
                assert len(tmps) == 1
                if swap == "torn":
                    raise OSError(errno.EIO, "power lost")
                os.unlink(d / tmps[0])
                if swap == "symlink":
                    os.symlink(outside, d / tmps[0])
                else:
                    os.mkfifo(d / tmps[0])

    monkeypatch.setattr(ChunkIndex, "iter_bytes", pieces)
    _delta.write_hint(state, ix, [])  # (best effort: never raises for the disk)
    monkeypatch.undo()
    assert outside.read_bytes() == b"untouched"
    names = os.listdir(state / "chunks")
    assert not [n for n in names if n.endswith(".tmp") and swap == "torn"]
    h = state / "chunks" / f"{fp}.json"
    if swap == "torn":
        assert h.read_bytes() == before  # (the old one, whole)
        assert _delta.read_hint(state, fp) == ix
    else:
        # (what the disk put there was renamed in place: refused, not followed)
        assert h.is_symlink() or not h.is_file() or h.read_bytes() == before
        assert _delta.read_hint(state, fp) is None or h.read_bytes() == before


class _CountingKeys:
    """A hint's sorted keys that count the items iteration goes through (bisect uses
    indexing: not counted)."""

    def __init__(self, keys: Sequence[int]) -> None:
        self.keys, self.walked = keys, 0

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> int:
        return self.keys[i]

    def __iter__(self) -> Iterator[int]:
        for k in self.keys:
            self.walked += 1
            yield k


def test_a10_hint_lookups_cost_a_bounded_scan_each() -> None:
    from tests.unit.test_i16_plan_memory import _h, _index

    n = 8_000  # (a 2 GiB release has ~26,000: kept small, the count is what is asserted)
    old = _index([_h(0, i) for i in range(n)])
    new = _index([_h(0, i) if i % 2 else _h(1, i) for i in range(n)])  # (half held)
    plan = plan_needs(new, {}, [Base("active", {"model.onnx": 1 << 40}, old),
                                Base("previous", {"model.onnx": 1 << 40}, old)])
    counters = []
    for lookup in plan._hints:
        assert lookup is not None
        c = _CountingKeys(lookup.keys)
        lookup.keys = c  # type: ignore[assignment]
        counters.append(c)
    held = sum(1 for need in plan if need.sources)
    assert held == n // 2
    walked = sum(c.walked for c in counters)
    # (each lookup looks at no more than _HINT_SCAN entries of the same prefix)
    assert walked <= 2 * n * _delta._HINT_SCAN, f"{walked} keys walked for {n} chunks"


class _OnePiece(_Origin):
    """Each range in one piece: a piece completes many chunks (one batch, one run)."""

    def fetch_ranges(self, url: str, ranges: Sequence[tuple[int, int]]
                     ) -> Iterator[tuple[int, bytes]]:
        for off, n in ranges:
            yield off, self.data[off:off + n]


def test_a10_a_run_is_never_written_past_its_first_altered_chunk(
        tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    """The origin alters one chunk in the middle of a piece that completes many chunks
    following each other (cf511c6: one pwritev per run): the chunks before it are
    written, it and every chunk after it (in this run and the next pieces) are not."""
    data, ix, tf = release
    fi = _biggest_file(ix)
    f = ix.files[fi]
    k = len(f.chunks) // 2
    bad = f.chunks[k]
    altered = bytearray(data)
    altered[bad.offset + bad.length // 2] ^= 0x55
    with pytest.raises(DeltaChunkError) as e:
        _assemble(tmp_path, ix, tf, _OnePiece(bytes(altered)))
    assert (e.value.file, e.value.chunk) == (f.path, k)
    incoming = tmp_path / "state" / "staging" / "incoming"
    for g in ix.files:
        got = (incoming / g.path).read_bytes()
        assert len(got) == g.size
        for j, c in enumerate(g.chunks):
            part = got[g.file_offset(c):g.file_offset(c) + c.length]
            if c.offset < bad.offset:
                assert part == data[c.offset:c.offset + c.length], (g.path, j)
            else:
                assert part == b"\0" * c.length, (g.path, j)


def test_a10_one_chunk_at_3000_places_crosses_iov_max_with_short_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk that maps to 3,000 places in a row (a zero tensor): one run of more than
    _IOV_MAX buffers, on a disk that takes an odd number of bytes per call: every place
    gets the chunk, nothing is written past the file."""
    from modelward.updater.install._delta import Place, _Files
    from modelward.updater.install._statedir import open_root

    inc = tmp_path / "state" / "incoming"
    inc.mkdir(parents=True)
    fd = open_root(tmp_path / "state", inc)
    files = _Files(inc, fd, {})
    n, size = 3000, 16 * 1024
    chunk = bytes(range(256)) * (size // 256)
    real_pwritev = os.pwritev
    calls = 0

    def short(fd_: int, bufs: list[memoryview], off: int) -> int:
        nonlocal calls
        calls += 1
        assert len(bufs) <= 1024
        # (at most 100,003 bytes a call: ends inside a buffer)
        out, left = [], 100_003
        for b in bufs:
            if left <= 0:
                break
            out.append(b[:left])
            left -= len(out[-1])
        return real_pwritev(fd_, out, off)

    monkeypatch.setattr(os, "pwritev", short)
    try:
        files.open_out("model.onnx", n * size)
        files.write_all((Place("incoming", "model.onnx", i * size), memoryview(chunk))
                        for i in range(n))
    finally:
        monkeypatch.undo()
        files.close()
    got = (inc / "model.onnx").read_bytes()
    assert len(got) == n * size
    assert got == chunk * n
    assert calls >= n * size // 100_003


def test_a10_no_write_goes_past_the_file_whatever_the_plan_says(tmp_path: Path) -> None:
    """The writer's own bound (not the plan's): a run that would end past the file's size
    as opened is a StagingError naming the file, and nothing of it is written."""
    from modelward.updater.install._delta import Place, _Files
    from modelward.updater.install._statedir import open_root

    inc = tmp_path / "state" / "incoming"
    inc.mkdir(parents=True)
    files = _Files(inc, open_root(tmp_path / "state", inc), {})
    try:
        files.open_out("model.onnx", 1000)
        with pytest.raises(StagingError, match="model.onnx"):
            files.write_run(Place("incoming", "model.onnx", 600), [b"a" * 300, b"b" * 200])
        files.write_run(Place("incoming", "model.onnx", 500), [b"c" * 500])  # (to the end)
    finally:
        files.close()
    assert (inc / "model.onnx").read_bytes() == b"\0" * 500 + b"c" * 500
