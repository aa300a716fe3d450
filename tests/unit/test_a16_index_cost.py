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
import random
import tracemalloc

import pytest

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.simulator._models import make_linear_model
from modelward.updater.bundle._chunkindex import (
    MAX_CHUNKS,
    MAX_INDEX_BYTES,
    Chunk,
    ChunkIndex,
    parse_index,
)

DEVICE_BUDGET = 100 << 20  # the whole agent's peak RSS goal (issue 16)


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


@pytest.mark.xfail(strict=True, reason="parse_index accepts a 64 MiB index of 1-byte "
                   "chunks (~800,000), whose parse needs ~12x its size in memory (~800 MiB)"
                   ": the bounds let a team's index exhaust a device's ~100 MiB")
def test_the_largest_index_parse_index_accepts_fits_a_device(honest: ChunkIndex) -> None:
    n = 12_000
    data = _tiny_chunks(honest, n)
    tracemalloc.start()
    try:
        ix = parse_index(data, "team index")  # accepted: a valid, canonical index
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ix.chunk_count >= n
    per_chunk_json = len(data) / ix.chunk_count
    accepted = min(MAX_CHUNKS, int(MAX_INDEX_BYTES / per_chunk_json))  # chunks let through
    scaled = peak * accepted / ix.chunk_count
    assert scaled <= DEVICE_BUDGET // 2, (
        f"{peak / 2**20:.1f} MiB for {ix.chunk_count} chunks ({len(data)} bytes): "
        f"{scaled / 2**20:.0f} MiB for the {accepted} chunks the bounds accept")
