"""Issue 16: the delta plan's memory does not grow by objects per chunk (flat peak RSS from
128 MiB to 2 GiB), and sha256s that share a prefix are still told apart."""

from __future__ import annotations

import hashlib
import tracemalloc
from array import array

from modelward.updater.bundle._chunkindex import ChunkIndex, ChunkList, IndexedFile
from modelward.updater.install._delta import Base, Place, plan_needs


def _index(hashes: list[bytes], chunk: int = 80 * 1024, start: int = 1024) -> ChunkIndex:
    ends, off = array("Q"), start
    for _ in hashes:
        off += chunk
        ends.append(off)
    f = IndexedFile("model.onnx", off - start, "0" * 64, "0" * 64, start,
                    ChunkList(start, ends, b"".join(hashes)))
    return ChunkIndex(off + 1024, "0" * 64, {}, 0, b"{}", None, (f,))  # type: ignore[arg-type]


def _h(seed: int, i: int) -> bytes:
    return hashlib.sha256(b"%d-%d" % (seed, i)).digest()


def test_a_2_gib_plan_holds_a_few_bytes_a_chunk() -> None:
    n = 26_000  # 2 GiB in chunks of ~80 KiB (FastCDC's average)
    old = _index([_h(0, i) for i in range(n)])
    new = _index([_h(1 if i >= n - n // 10 else 0, i) for i in range(n)])
    tracemalloc.start()
    try:
        plan = plan_needs(new, {}, [Base("active", {"model.onnx": 1 << 40}, old)])
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(plan) == n
    # (objects for each chunk, their places and sources, were ~1 KiB a chunk at the peak)
    assert held <= 24 * n, held
    assert peak <= 96 * n, peak
    assert plan[0].sources == (Place("active", "model.onnx", 0),)
    assert plan[n - 1].sources == ()  # (changed: in no base)


def test_sha256s_with_one_prefix_are_told_apart_and_repeats_grouped() -> None:
    a, b = b"\x01" * 8 + b"\x02" * 24, b"\x01" * 8 + b"\x03" * 24  # (equal first 8 bytes)
    new = _index([a, b, a, b, a], chunk=10, start=0)
    plan = plan_needs(new, {}, [Base("active", {"model.onnx": 50}, _index([b, a], 10, 0))])
    assert [n.sha256 for n in plan] == [a, b]
    assert [p.offset for p in plan[0].dests] == [0, 20, 40]
    assert [p.offset for p in plan[1].dests] == [10, 30]
    assert plan[0].sources == (Place("active", "model.onnx", 10),)
    assert plan[1].sources == (Place("active", "model.onnx", 0),)
