"""Attack (issue 16, a team key holder): an index that ``parse_index`` accepts but that
costs a device (~100 MiB in all) far more memory than it has.

The bounds are ``MAX_INDEX_BYTES`` (64 MiB of JSON) and ``MAX_CHUNKS`` (1 Mi chunks), and
a chunk may be 1 byte long: a team signs an index of its own model cut into 1-byte chunks.
Measured here at a small size (Python allocations, tracemalloc) and scaled to the largest
index the bounds let through (the cost is linear in the chunks): at 600,000 chunks
(45 MiB of JSON) the parse peaked at 442 MiB and kept 113 MiB, in 8 s of CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
import tracemalloc

import pytest

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.simulator._models import make_linear_model
from modelward.updater.bundle._bundle import parse_manifest
from modelward.updater.bundle._chunkindex import (
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MIN_CHUNK_BYTES,
    Chunk,
    ChunkIndex,
    index_budget,
    max_chunks,
    parse_index,
)
from modelward.updater.errors import ChunkIndexError

DEVICE_BUDGET = 100 << 20  # the whole agent's peak RSS goal (issue 16)
DEVICE_MAX_BUNDLE = 8 << 30  # Config.max_bundle_bytes


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> ChunkIndex:
    d = tmp_path_factory.mktemp("a16cost")
    blob = d / "blob.bin"
    blob.write_bytes(random.Random(1).randbytes(64 * 1024))
    out = d / "b.tar"
    build_bundle(make_linear_model(d / "m.onnx", 1), "classifier", "1.0.0", out,
                 extra=[(blob, "weights.bin")], options=BuildOptions())
    return build_index(out, hashlib.sha256(out.read_bytes()).hexdigest())


def _tiny_chunks(ix: ChunkIndex, n: int) -> bytes:
    """``ix`` with its biggest file cut into ``n`` chunks of (about) 1 byte: valid."""
    big = max(ix.files, key=lambda f: f.size)
    assert big.size >= n
    base, pos, chunks = big.size // n, big.data_offset, []
    for i in range(n):
        ln = base if i < n - 1 else big.size - base * (n - 1)
        chunks.append(Chunk(pos, ln, hashlib.sha256(i.to_bytes(4, "big")).digest()))
        pos += ln
    files = tuple(dataclasses.replace(f, chunks=tuple(chunks)) if f is big else f
                  for f in ix.files)
    return dataclasses.replace(ix, files=files).to_bytes()


def _resized(ix: ChunkIndex, lengths: list[int]) -> bytes:
    """``ix`` with its biggest file made ``sum(lengths)`` bytes, cut into chunks of
    ``lengths`` (the manifest and the later files follow): a valid-looking team index."""
    big = max(ix.files, key=lambda f: f.size)
    size = sum(lengths)
    delta = size - big.size
    m = json.loads(ix.manifest_bytes)
    for mf in m["files"]:
        if mf["path"] == big.path:
            mf["size"] = size
    m_bytes = json.dumps(m).encode()
    files = []
    for f in ix.files:
        if f is big:
            pos, chunks = f.data_offset, []
            for i, ln in enumerate(lengths):
                chunks.append(Chunk(pos, ln, hashlib.sha256(i.to_bytes(4, "big")).digest()))
                pos += ln
            files.append(dataclasses.replace(f, size=size, chunks=tuple(chunks)))
        elif f.data_offset > big.data_offset:
            files.append(dataclasses.replace(f, data_offset=f.data_offset + delta, chunks=tuple(
                Chunk(c.offset + delta, c.length, c.sha256) for c in f.chunks)))
        else:
            files.append(f)
    return dataclasses.replace(ix, bundle_length=ix.bundle_length + delta,
                               manifest_bytes=m_bytes,
                               manifest=parse_manifest(m_bytes, "m"),
                               files=tuple(files)).to_bytes()


def _parse_measured(data: bytes) -> tuple[ChunkIndex, int, float]:
    """The parse, its peak of Python allocations and its CPU (untraced: tracemalloc slows
    allocations many times)."""
    t0 = time.process_time()
    parse_index(data, "team index")
    cpu = time.process_time() - t0
    tracemalloc.start()
    try:
        ix = parse_index(data, "team index")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return ix, peak, cpu


def test_an_index_of_tiny_chunks_is_refused_before_it_costs(honest: ChunkIndex) -> None:
    """(The attacker's index: 1-byte chunks. It asserted the parse was cheap once
    accepted; a device now refuses it: chunks but a file's last are MIN_CHUNK_BYTES or
    longer, so their number is bounded by the bundle's length.)"""
    data = _tiny_chunks(honest, 12_000)
    tracemalloc.start()
    try:
        with pytest.raises(ChunkIndexError, match="than a device accepts"):
            parse_index(data, "team index")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # refused from its length, before any JSON was parsed


def test_the_largest_index_parse_index_accepts_fits_a_device(honest: ChunkIndex) -> None:
    """The worst index the bounds admit for a device's largest bundle (8 GiB, every chunk
    MIN_CHUNK_BYTES: 512 Ki chunks), measured at 20,000 chunks and scaled (the cost is
    linear in the chunks): its parse stays under DEVICE_BUDGET / 2, and its bytes under
    index_budget."""
    n = 20_000
    data = _resized(honest, [MIN_CHUNK_BYTES] * n)
    ix, peak, cpu = _parse_measured(data)
    assert ix.chunk_count >= n
    worst = max_chunks(DEVICE_MAX_BUNDLE)
    assert worst <= MAX_CHUNKS
    scaled = peak * worst / ix.chunk_count
    assert scaled <= DEVICE_BUDGET // 4, (
        f"{peak / 2**20:.1f} MiB for {ix.chunk_count} chunks ({len(data)} bytes): "
        f"{scaled / 2**20:.0f} MiB for the {worst} chunks the bounds accept")
    per_chunk = len(data) / ix.chunk_count
    assert per_chunk * worst <= index_budget(DEVICE_MAX_BUNDLE) <= 56 << 20
    assert cpu * worst / ix.chunk_count < 5.0  # (~1.5 s on the 2-core CI machine)
    assert parse_index(ix.to_bytes(), "again") == ix


def test_more_chunks_than_the_bundle_admits_are_refused(honest: ChunkIndex) -> None:
    """The count bound holds against the bundle's length, not only MAX_CHUNKS: chunks of
    exactly MIN_CHUNK_BYTES are admitted; a list that is longer than its bytes admit
    (a chunk under MIN_CHUNK_BYTES that is not the file's last) is refused."""
    ok = _resized(honest, [MIN_CHUNK_BYTES] * 50 + [1])
    parse_index(ok, "min chunks and a 1-byte tail")
    bad = _resized(honest, [MIN_CHUNK_BYTES] * 25 + [MIN_CHUNK_BYTES - 1] + [MIN_CHUNK_BYTES] * 25)
    with pytest.raises(ChunkIndexError, match="under"):
        parse_index(bad, "a short chunk in the middle")
    big = _resized(honest, [MAX_CHUNK_BYTES + 1, MIN_CHUNK_BYTES])
    with pytest.raises(ChunkIndexError, match="at most"):
        parse_index(big, "a chunk over the device's maximum")


def test_an_index_padded_past_its_bundle_s_budget_is_refused(honest: ChunkIndex) -> None:
    """Bytes over what the bundle it names admits are refused before JSON is parsed (a
    huge chunking, a long path), whatever they hold."""
    data = honest.to_bytes()
    pad = index_budget(honest.bundle_length) - len(data) + 1
    d = json.loads(data)
    d["chunking"]["x"] = "y" * pad
    forged = json.dumps(d, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    with pytest.raises(ChunkIndexError, match="more than a device accepts of the index"):
        parse_index(forged, "padded")


def test_an_honest_index_of_a_2_gib_bundle_parses_fast_and_small(honest: ChunkIndex) -> None:
    rnd = random.Random(5)
    lengths, left = [], 2 << 30
    while left > 0:
        ln = min(left, rnd.randint(MIN_CHUNK_BYTES, 144 * 1024))  # (~80 KiB on average)
        lengths.append(ln)
        left -= ln
    data = _resized(honest, lengths)
    best = min(_parse_measured(data)[2] for _ in range(3))
    ix, peak, _ = _parse_measured(data)
    assert ix.chunk_count > 25_000
    assert peak < 30 << 20, f"{peak / 2**20:.1f} MiB"
    assert best < 0.3, f"{best:.3f} s of CPU"  # (~50 ms when the machine is idle)
    assert ix.to_bytes() == data
