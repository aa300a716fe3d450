"""Attacker a16org, a team key holder (or just a fine-tune that changes every other chunk):
an index whose missing chunks are each apart by a little more than ``MAX_GAP`` (the bytes
between are a chunk repeated in the release, fetched once). Every chunk is of a legal
size (at least MIN_CHUNK); the device asks for one range per chunk, many more requests
than the whole bundle takes, and over MQTT at ``range_requests_per_s`` that is minutes
for a bundle the whole path fetches in a few blocks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from modelward.updater._config import MqttConfig
from modelward.updater.bundle._chunkindex import MIN_CHUNK, Chunk, ChunkIndex, IndexedFile
from modelward.updater.idle import Gate
from modelward.updater.install import _delta

N = 256  # unique chunks; the bundle is N * (2 * MIN_CHUNK + ...) = ~8 MiB


def _release() -> tuple[bytes, ChunkIndex, TargetFile]:
    gap = MIN_CHUNK + _delta.MAX_GAP  # (a repeated chunk: more than MAX_GAP apart)
    filler = b"\0" * gap
    start = 512
    data, chunks, pos = bytearray(b"\0" * start), [], start
    for i in range(N):
        u = hashlib.sha256(str(i).encode()).digest() * (MIN_CHUNK // 32)
        for part in (u, filler):
            chunks.append(Chunk(pos, len(part), hashlib.sha256(part).digest()))
            data += part
            pos += len(part)
    size = pos - start
    data += b"\0" * 1024
    f = IndexedFile("m", size, "0" * 64, "0" * 64, start, tuple(chunks))
    ix = ChunkIndex(len(data), hashlib.sha256(data).hexdigest(), {}, 0, b"{}", None,  # type: ignore[arg-type]
                    (f,))
    tf = TargetFile(len(data), {"sha256": ix.bundle_sha256}, "team/team-1.0.0.tar")
    return bytes(data), ix, tf


class _Counting:
    def __init__(self, data: bytes) -> None:
        self.data, self.ranges = data, 0

    def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
        raise AssertionError("not used")

    def fetch_ranges(self, url: str, ranges: Sequence[tuple[int, int]]
                     ) -> Iterator[tuple[int, bytes]]:
        self.ranges += len(ranges)
        for off, n in ranges:
            yield off, self.data[off:off + n]


def test_a_delta_never_asks_more_requests_than_the_whole_bundle(tmp_path: Path) -> None:
    data, ix, tf = _release()
    fake = _Counting(data)
    staging = tmp_path / "staging"
    block = MqttConfig.block_size
    whole_blocks = -(-len(data) // block)
    try:
        _, _, _, stats = _delta.assemble(ix, tf, "mqtt://b/x", fake, staging,  # type: ignore[arg-type]
                                         staging / "incoming", [], Gate())
    except _delta.DeltaUnavailable:
        return  # (the whole bundle instead: fine)
    assert stats.fetched_bytes <= ix.data_bytes
    assert fake.ranges <= whole_blocks, (fake.ranges, whole_blocks)


def test_the_many_ranges_never_ask_more_bytes_than_the_bundle(tmp_path: Path) -> None:
    """(Resisted: the ranges are disjoint chunks and gaps of the bundle.)"""
    data, ix, tf = _release()
    asked: list[tuple[int, int]] = []

    class _Asked(_Counting):
        def fetch_ranges(self, url, ranges):  # type: ignore[no-untyped-def]
            asked.extend(ranges)
            yield from super().fetch_ranges(url, ranges)

    staging = tmp_path / "staging"
    _, _, _, stats = _delta.assemble(ix, tf, "u", _Asked(data), staging,  # type: ignore[arg-type]
                                     staging / "incoming", [], Gate())
    assert sum(n for _, n in asked) <= len(data)
    assert stats.fetched_bytes == sum(
        c.length for c in {c.sha256: c for c in ix.files[0].chunks}.values())


def test_chunks_claimed_held_everywhere_read_the_disk_at_most_max_sources_times(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(Resisted: a team index whose every chunk "may be held" at many places, a stage
    and a base slot full of other bytes: each distinct chunk is read at most MAX_SOURCES
    times, then fetched.)"""
    data, ix, tf = _release()
    f = ix.files[0]
    staging = tmp_path / "staging"
    (staging / "incoming").mkdir(parents=True)
    (staging / "incoming" / "m").write_bytes(b"\1" * f.size)  # (an earlier attempt's)
    slot = tmp_path / "slot"
    slot.mkdir()
    (slot / "m").write_bytes(b"\2" * f.size)
    read: list[int] = []
    real = _delta._Files.read  # noqa: SLF001

    def counting(self, p, n):  # type: ignore[no-untyped-def]
        read.append(n)
        return real(self, p, n)

    monkeypatch.setattr(_delta._Files, "read", counting)  # noqa: SLF001
    base = _delta.Base("active", _delta.plain_sizes(slot), None)
    _, _, _, stats = _delta.assemble(ix, tf, "u", _Counting(data), staging,  # type: ignore[arg-type]
                                     staging / "incoming", [(base, slot)], Gate())
    assert stats.held_bytes == 0
    assert sum(read) <= _delta.MAX_SOURCES * f.size
