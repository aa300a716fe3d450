"""The delta's receive pipeline (issue 16, full install >= 0.9x curl): chunks hashed on the
pool and written in order by one writer thread, uncopied from a transport's stable pieces.
Attacks: a chunk altered in the middle of one coalesced read, a connection cut mid-chunk
then resumed, a transport that reuses its buffer after handing it on, pieces in any split;
each received byte is written only after its chunk matched, and a resume fetches only what
is missing."""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.updater.bundle._chunkindex import ChunkIndex
from modelward.updater.idle import Gate
from modelward.updater.install import _delta

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


class _Stable:
    """A transport like RequestsFetcher: each piece a view of a fresh buffer, never changed
    (``stable_pieces``), ``step`` bytes each; ``cut_at``: the transfer breaks off once
    that many bytes were sent (the piece it falls in is cut there)."""

    stable_pieces = True

    def __init__(self, data: bytes, step: int = 1 << 20, cut_at: int | None = None) -> None:
        self.data, self.step, self.cut_at = data, step, cut_at
        self.asked: list[tuple[int, int]] = []
        self.sent = 0

    def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
        raise AssertionError("fetch_ranges is used")

    def fetch_ranges(self, url: str, ranges: Sequence[tuple[int, int]]
                     ) -> Iterator[tuple[int, memoryview]]:
        self.asked += list(ranges)
        for off, n in ranges:
            for i in range(off, off + n, self.step):
                piece = memoryview(bytearray(self.data[i:min(i + self.step, off + n)]))
                if self.cut_at is not None and self.sent + len(piece) > self.cut_at:
                    keep = self.cut_at - self.sent
                    if keep:
                        self.sent += keep
                        yield i, piece[:keep]
                    raise tuf_exc.DownloadError("the connection was cut (test)")
                self.sent += len(piece)
                yield i, piece


class _Reusing(_Stable):
    """A transport that refills one buffer for every piece (allowed: it does not claim
    ``stable_pieces``), scribbling over it as soon as the consumer asks for the next."""

    stable_pieces = False  # type: ignore[assignment]

    def fetch_ranges(self, url: str, ranges: Sequence[tuple[int, int]]
                     ) -> Iterator[tuple[int, memoryview]]:
        buf = bytearray(self.step)
        self.asked += list(ranges)
        for off, n in ranges:
            for i in range(off, off + n, self.step):
                k = min(self.step, off + n - i)
                buf[:k] = self.data[i:i + k]
                yield i, memoryview(buf)[:k]
                buf[:] = b"\xee" * len(buf)  # (the next read lands here)


def _assemble(tmp: Path, rel: Release, fake: object) -> _delta.DeltaStats:
    _, ix, tf = rel
    staging = tmp / "state" / "staging"
    staging.parent.mkdir(exist_ok=True)
    return _delta.assemble(ix, tf, "https://o/x.tar", fake, staging,  # type: ignore[arg-type]
                           staging / "incoming", [], Gate())[3]


def _chunks_on_disk(tmp: Path, ix: ChunkIndex) -> list[bool]:
    """For every chunk of the release, in bundle order: does incoming hold it."""
    out = []
    for f in ix.files:
        blob = (tmp / "state" / "staging" / "incoming" / f.path).read_bytes()
        for c in f.chunks:
            at = f.file_offset(c)
            out.append(hashlib.sha256(blob[at:at + c.length]).digest() == c.sha256)
    return out


def _bytes_of(tmp: Path, ix: ChunkIndex, k: int) -> bytes:
    """What incoming holds where chunk ``k`` (bundle order) goes."""
    for f in ix.files:
        for c in f.chunks:
            if k == 0:
                at = f.file_offset(c)
                blob = (tmp / "state" / "staging" / "incoming" / f.path).read_bytes()
                return blob[at:at + c.length]
            k -= 1
    raise IndexError(k)


def _chunk_list(ix: ChunkIndex) -> list[tuple[int, int]]:
    return [(c.offset, c.length) for f in ix.files for c in f.chunks]


@pytest.mark.parametrize("step", [1 << 20, 4096, 65_537, 3_000_000])
def test_a_full_install_in_any_split_of_stable_pieces_is_every_chunk(
        tmp_path: Path, release: Release, step: int) -> None:
    data, ix, _ = release
    stats = _assemble(tmp_path, release, _Stable(data, step))
    assert all(_chunks_on_disk(tmp_path, ix))
    assert stats.fetched_chunks == len({c.sha256 for f in ix.files for c in f.chunks})


def test_a_transport_that_reuses_its_buffer_is_copied_not_trusted(
        tmp_path: Path, release: Release) -> None:
    data, ix, _ = release
    _assemble(tmp_path, release, _Reusing(data, 40_000))
    assert all(_chunks_on_disk(tmp_path, ix))  # (a view kept past its piece: 0xee)


@pytest.mark.parametrize("stable", [True, False])
def test_a_chunk_altered_in_the_middle_of_one_coalesced_read_is_refused_and_not_written(
        tmp_path: Path, release: Release, stable: bool) -> None:
    data, ix, _ = release
    chunks = _chunk_list(ix)
    k = len(chunks) // 2
    off, n = chunks[k]
    bad = bytearray(data)
    bad[off + n // 2] ^= 1  # one bit in the middle of chunk k, inside one piece
    fake = _Stable(bytes(bad)) if stable else _Reusing(bytes(bad), 1 << 20)
    with pytest.raises(_delta.DeltaChunkError) as ei:
        _assemble(tmp_path, release, fake)
    assert len(fake.asked) == 1  # (one coalesced read: the whole bundle's chunks)
    on_disk = _chunks_on_disk(tmp_path, ix)
    assert not on_disk[k] and _bytes_of(tmp_path, ix, k) != bytes(bad[off:off + n])
    assert not any(on_disk[k:])  # (written in order: nothing after the refused chunk)
    assert ei.value.chunk == k - _first_of_file(ix, off)


def _first_of_file(ix: ChunkIndex, off: int) -> int:
    """The bundle-order index of the first chunk of the file holding offset ``off``."""
    k = 0
    for f in ix.files:
        if f.chunks and f.chunks[0].offset <= off < f.chunks[-1].offset + f.chunks[-1].length:
            return k
        k += len(f.chunks)
    raise ValueError(off)


@pytest.mark.parametrize("where", [0.3, 0.77])
def test_a_connection_cut_mid_chunk_writes_no_partial_chunk_and_resumes_with_the_rest(
        tmp_path: Path, release: Release, where: float) -> None:
    data, ix, _ = release
    chunks = _chunk_list(ix)
    off, n = chunks[int(len(chunks) * where)]
    cut = off + n // 3  # (inside a chunk: a third of it came)
    first = _Stable(data, 100_000, cut_at=cut - chunks[0][0])
    with pytest.raises(tuf_exc.DownloadError):
        _assemble(tmp_path, release, first)
    on_disk = _chunks_on_disk(tmp_path, ix)
    k = next(i for i, (o, ln) in enumerate(chunks) if o <= cut < o + ln)
    assert all(on_disk[:k]) and not any(on_disk[k:])  # (a prefix; the cut chunk not)
    assert _bytes_of(tmp_path, ix, k)[:n // 3] != data[off:off + n // 3]  # (nothing of it)
    again = _Stable(data)
    _assemble(tmp_path, release, again)
    assert all(_chunks_on_disk(tmp_path, ix))
    last = chunks[-1][0] + chunks[-1][1]
    assert again.asked == [(chunks[k][0], last - chunks[k][0])]  # one range: the rest


class _Buf(bytearray):
    """A piece's buffer that can be watched (weak references)."""


class _Watched(_Stable):
    """Stable pieces whose buffers are watched: how many are alive at once."""

    def __init__(self, data: bytes, step: int) -> None:
        super().__init__(data, step)
        self.refs: list[weakref.ref[_Buf]] = []
        self.peak = 0  # pieces alive at once, at most

    def live(self) -> int:
        return sum(r() is not None for r in self.refs)

    def fetch_ranges(self, url: str, ranges: Sequence[tuple[int, int]]
                     ) -> Iterator[tuple[int, memoryview]]:
        self.asked += list(ranges)
        for off, n in ranges:
            for i in range(off, off + n, self.step):
                buf = _Buf(self.data[i:min(i + self.step, off + n)])
                self.refs.append(weakref.ref(buf))
                self.peak = max(self.peak, self.live())
                yield i, memoryview(buf)
                del buf


@pytest.fixture(scope="module")
def bigger(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """A release with 8 MiB more of distinct bytes (many pieces of many chunks)."""
    import random

    from tests.integration._i16_delta import big_model

    tmp = tmp_path_factory.mktemp("big")
    blob = tmp / "blob.bin"
    blob.write_bytes(random.Random(16).randbytes(8 << 20))
    out = tmp / "classifier-1.0.0.tar"
    build_bundle(big_model(tmp / "m.onnx"), "classifier", "1.0.0", out,
                 extra=[(blob, "data/blob.bin")], options=BuildOptions())
    data = out.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    return data, build_index(out, sha), TargetFile(len(data), {"sha256": sha},
                                                   "classifier/classifier-1.0.0.tar")


def test_pieces_kept_alive_by_uncopied_chunks_stay_bounded(
        tmp_path: Path, bigger: Release, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk taken uncopied keeps its whole piece alive: the piece is charged to the
    bytes in flight (also when the piece begins with the end of a chunk begun in the one
    before, which is copied), so at most FETCH_INFLIGHT of pieces wait, plus a few."""
    release = bigger
    data, ix, _ = release
    step = 500_003  # (never on a chunk boundary: every piece begins mid-chunk)
    fake = _Watched(data, step)
    real = _delta._digest  # noqa: SLF001

    def digest(view: bytes | bytearray | memoryview) -> bytes:
        time.sleep(0.002)  # (slow hashing: the receiving side runs ahead up to the bound)
        return real(view)

    monkeypatch.setattr(_delta, "_digest", digest)
    monkeypatch.setattr(_delta, "FETCH_INFLIGHT", 2 * step)
    _assemble(tmp_path, release, fake)
    assert all(_chunks_on_disk(tmp_path, ix))
    assert len(fake.refs) > 12
    assert 0 < fake.peak <= 2 + 3  # (FETCH_INFLIGHT's pieces, the next, two being worked)


def test_only_the_fetchers_that_promise_it_claim_stable_pieces() -> None:
    """The delta hashes and writes uncopied views only of a transport that promises never
    to change a piece it handed on: HTTPS (a fresh buffer per piece) and MQTT (views of each
    message's own ``bytes``: tests/unit/test_i16_mqtt_spans.py checks it); the base class
    and the in-memory one do not claim it (their pieces are copied first)."""
    from modelward.updater.transport._fetcher import RangeFetcher, RequestsFetcher
    from modelward.updater.transport._mqtt import MqttFetcher

    # (the classes' attribute, as an instance of each reads it)
    assert _delta._stable(RequestsFetcher)  # type: ignore[arg-type]  # noqa: SLF001
    assert _delta._stable(MqttFetcher)  # type: ignore[arg-type]  # noqa: SLF001
    assert not _delta._stable(RangeFetcher)  # type: ignore[arg-type]  # noqa: SLF001


def test_chunks_that_follow_each_other_go_in_one_write_even_when_the_disk_takes_less(
        tmp_path: Path, release: Release, monkeypatch: pytest.MonkeyPatch) -> None:
    """The matched chunks of a piece that follow each other in a file are written by one
    ``pwritev``; a disk that takes only a few KiB per call (a short write, as POSIX
    allows) still gets every byte, each at its place."""
    import os

    data, ix, _ = release
    real = os.pwrite
    calls: list[int] = []

    def short(fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> int:
        calls.append(len(buffers))
        return real(fd, b"".join(bytes(b) for b in buffers)[:5000], offset)

    def short1(fd: int, buffer: bytes | memoryview, offset: int) -> int:
        calls.append(1)
        return real(fd, bytes(buffer)[:5000], offset)

    monkeypatch.setattr(os, "pwritev", short)
    monkeypatch.setattr(os, "pwrite", short1)
    stats = _assemble(tmp_path, release, _Stable(data, 1 << 20))
    monkeypatch.undo()
    assert all(_chunks_on_disk(tmp_path, ix))
    assert stats.fetched_chunks == len({c.sha256 for f in ix.files for c in f.chunks})
    assert max(calls) > 1  # (several chunks in one call)
    assert sum(calls) > len(calls)
