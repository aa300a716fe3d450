"""Issue 16: ``parse_index`` against hostile indexes; build -> bytes -> parse round trips.

Every variant is a signed-looking index a hostile origin, a stolen targets key or a buggy
publisher could hand a device: each must raise ChunkIndexError, quickly and in bounded
memory, never another exception.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.simulator._models import make_linear_model
from modelward.updater.bundle import _chunkindex
from modelward.updater.bundle._chunkindex import (
    MAX_CHUNK_BYTES,
    ChunkIndex,
    chunk_hashes,
    fetch_bytes,
    parse_index,
)
from modelward.updater.errors import ChunkIndexError

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChunkIndex, bytes]:
    """A real bundle (a model and 600 KiB of extra data: several chunks) and its index."""
    import hashlib

    d = tmp_path_factory.mktemp("i16ix")
    blob = d / "blob.bin"
    blob.write_bytes(random.Random(1).randbytes(600 * 1024))
    out = d / "b.tar"
    build_bundle(make_linear_model(d / "m.onnx", 1), "classifier", "1.0.0", out,
                 extra=[(blob, "weights.bin")], options=BuildOptions())
    ix = build_index(out, hashlib.sha256(out.read_bytes()).hexdigest())
    assert ix.chunk_count >= 5
    return ix, ix.to_bytes()


def _doc(data: bytes) -> Doc:
    d: Doc = json.loads(data)
    return d


def _enc(d: Doc) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _big(d: Doc) -> Doc:
    """The file with the most chunks."""
    f: Doc = max(d["files"], key=lambda f: len(f["chunks"]))
    return f


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    def go(d: Doc) -> None:
        keys: list[Any] = [int(k) if k.lstrip("-").isdigit() else k for k in path.split(".")]
        obj: Any = d
        for k in keys[:-1]:
            obj = max(obj, key=lambda f: len(f["chunks"])) if k == "BIG" else obj[k]
        obj[keys[-1]] = value
    return go


def _chunks(edit: Callable[[list[list[Any]]], None]) -> Callable[[Doc], None]:
    return lambda d: edit(_big(d)["chunks"])


def _manifest(edit: Callable[[Doc], None]) -> Callable[[Doc], None]:
    def go(d: Doc) -> None:
        m = json.loads(base64.b64decode(d["manifest"]["bytes"]))
        edit(m)
        d["manifest"]["bytes"] = base64.b64encode(json.dumps(m).encode()).decode()
    return go


def _shift(c: list[list[Any]]) -> None:  # overlapping: a chunk starts inside the one before
    c[1][0] -= 1
    c[1][1] += 1


def _gap(c: list[list[Any]]) -> None:  # non-contiguous
    c[1][0] += 1
    c[1][1] -= 1


def _zero(c: list[list[Any]]) -> None:  # a zero-length chunk in the middle
    c.insert(1, [c[1][0], 0, c[1][2]])


def _split_too_long(c: list[list[Any]]) -> None:  # merged past the largest chunk length
    c[0][1] += c[1][1]
    del c[1]
    c[0][1] = MAX_CHUNK_BYTES + 1


MUTATIONS: dict[str, Callable[[Doc], None]] = {
    "format": _set("format", "modelward-chunk-index/2"),
    "unknown top-level field": _set("extra", 1),
    "unknown field in a file": _set("files.BIG.mode", 420),
    "unknown field in bundle": _set("bundle.md5", "00"),
    "bundle length bool": _set("bundle.length", True),
    "bundle length zero": _set("bundle.length", 0),
    "bundle length negative": _set("bundle.length", -1),
    "bundle length huge": _set("bundle.length", 1 << 70),
    "bundle length float": _set("bundle.length", 1e6),
    "bundle sha non-hex": _set("bundle.sha256", "g" * 64),
    "bundle sha uppercase": _set("bundle.sha256", "A" * 64),
    "bundle sha short": _set("bundle.sha256", "a" * 63),
    "bundle sha int": _set("bundle.sha256", 7),
    "bundle missing": lambda d: d.pop("bundle"),
    "bundle a list": _set("bundle", [1, 2]),
    "chunking huge": _set("chunking", {"x": "y" * 600}),
    "manifest offset bool": _set("manifest.offset", False),
    "manifest offset beyond": _set("manifest.offset", 1 << 39),
    "manifest not base64": _set("manifest.bytes", "!!!!"),
    "manifest bytes int": _set("manifest.bytes", 5),
    "manifest not json": _set("manifest.bytes", base64.b64encode(b"{").decode()),
    "files not a list": _set("files", {}),
    "files empty": _set("files", []),
    "one file dropped": lambda d: d["files"].pop(),
    "files swapped": lambda d: d["files"].reverse(),
    "file duplicated": lambda d: d["files"].append(copy.deepcopy(d["files"][-1])),
    "file path unsafe": _set("files.BIG.path", "../etc/passwd"),
    "file path absolute": _set("files.BIG.path", "/weights.bin"),
    "file path renamed": _set("files.BIG.path", "other.bin"),
    "file path int": _set("files.BIG.path", 3),
    "file size off by one": _set("files.BIG.size", 1),
    "file size bool": _set("files.BIG.size", True),
    "file sha not the manifest's": _set("files.BIG.sha256", "0" * 64),
    "file merkle not the manifest's": _set("files.BIG.merkle_root", "1" * 64),
    "file offset negative": _set("files.BIG.offset", -5),
    "file beyond the bundle": _set("files.BIG.offset", 1 << 38),
    "file overlaps the manifest": _set("files.0.offset", 0),
    "chunks not a list": _set("files.BIG.chunks", "x"),
    "chunks empty": _set("files.BIG.chunks", []),
    "chunk not a triple": _chunks(lambda c: c[0].append(1)),
    "chunk a dict": _chunks(lambda c: c.__setitem__(0, {"o": 1})),
    "chunk offset bool": _chunks(lambda c: c[0].__setitem__(0, True)),
    "chunk length bool": _chunks(lambda c: c[0].__setitem__(1, True)),
    "chunk length negative": _chunks(lambda c: c[0].__setitem__(1, -1)),
    "chunk length huge": _chunks(lambda c: c[0].__setitem__(1, 1 << 62)),
    "chunk hash non-hex": _chunks(lambda c: c[0].__setitem__(2, "z" * 64)),
    "chunk hash uppercase": _chunks(lambda c: c[0].__setitem__(2, c[0][2].upper())),
    "chunk hash bytes-ish": _chunks(lambda c: c[0].__setitem__(2, [1] * 32)),
    "chunks overlapping": _chunks(_shift),
    "chunks non-contiguous": _chunks(_gap),
    "zero-length chunk": _chunks(_zero),
    "chunk over the maximum": _chunks(_split_too_long),
    "chunk dropped": _chunks(lambda c: c.pop()),
    "chunk repeated": _chunks(lambda c: c.append(list(c[-1]))),
    "manifest lists another size": _manifest(
        lambda m: m["files"][-1].__setitem__("size", m["files"][-1]["size"] + 1)),
    "manifest duplicate paths": _manifest(lambda m: m["files"].append(m["files"][0])),
    "manifest unsafe path": _manifest(lambda m: m["files"][0].__setitem__("path", "a/../b")),
    "manifest extra file": _manifest(lambda m: m["files"].append(
        {"path": "z", "size": 0, "sha256": "0" * 64, "merkle_root": "0" * 64})),
}


def _bounded(call: Callable[[], object]) -> None:
    """``call`` raises ChunkIndexError within 2 s and 64 MiB of Python allocations."""
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(ChunkIndexError):
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 2.0
    assert peak < 64 << 20, peak


def test_the_built_index_parses(built: tuple[ChunkIndex, bytes]) -> None:
    ix, data = built
    assert parse_index(data, "ix") == ix


def test_the_index_fingerprint_is_the_signed_one(tmp_path: Path) -> None:
    """What publish signs (``slot_fingerprint`` of extract_bundle's entries, manifest.json
    included) is what a device derives from the index; else no index is ever used."""
    import hashlib

    from modelward.trust._fingerprint import slot_fingerprint
    from modelward.updater.bundle._bundle import extract_bundle

    out = tmp_path / "b.tar"
    build_bundle(make_linear_model(tmp_path / "m.onnx", 2), "classifier", "1.0.0", out,
                 options=BuildOptions())
    with open(out, "rb") as f:
        _, entries = extract_bundle(f, None, "b")
    ix = build_index(out, hashlib.sha256(out.read_bytes()).hexdigest())
    assert ix.fingerprint == slot_fingerprint(entries)
    # (a device on the same release fetches nothing; a device with nothing, every byte once)
    assert fetch_bytes(ix, chunk_hashes(ix)) == 0
    assert fetch_bytes(ix, ()) <= ix.data_bytes


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_hostile_index_is_refused(built: tuple[ChunkIndex, bytes], name: str) -> None:
    d = _doc(built[1])
    MUTATIONS[name](d)
    _bounded(lambda: parse_index(_enc(d), "ix"))


@pytest.mark.parametrize("cut", [0, 1, 10, 100, -2, -1])
def test_a_truncated_index_is_refused(built: tuple[ChunkIndex, bytes], cut: int) -> None:
    data = built[1]
    _bounded(lambda: parse_index(data[:cut], "ix"))


def test_an_oversized_index_is_refused_before_it_is_parsed(built: tuple[ChunkIndex, bytes]
                                                           ) -> None:
    data = built[1]
    _bounded(lambda: parse_index(data, "ix", max_bytes=len(data) - 1))
    _bounded(lambda: parse_index(b"[" * (8 << 20), "ix"))  # 8 MiB of nesting


@pytest.mark.parametrize("doc", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"format":"modelward-chunk-index/1","chunking":' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    b"1" * 100_000,
    b'"' + b"\\u0000" * 100_000 + b'"',
    b"\xff\xfe{}",
    b"",
    b"null",
])
def test_hostile_json_is_refused(doc: bytes) -> None:
    _bounded(lambda: parse_index(doc, "ix"))


def test_not_canonical_is_refused(built: tuple[ChunkIndex, bytes]) -> None:
    data = built[1]
    for variant in (data.rstrip(b"\n"), data + b" ", b" " + data,
                    json.dumps(_doc(data), indent=1).encode()):
        _bounded(lambda v=variant: parse_index(v, "ix"))  # type: ignore[misc]
    d = _doc(data)  # duplicate key: the last one wins in JSON, so it must not parse
    text = _enc(d).replace(b'{"bundle":', b'{"bundle":{"length":1},"bundle":', 1)
    _bounded(lambda: parse_index(text, "ix"))


def test_more_chunks_than_a_device_accepts(built: tuple[ChunkIndex, bytes],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ix, data = built
    monkeypatch.setattr(_chunkindex, "MAX_CHUNKS", ix.chunk_count - 1)
    _bounded(lambda: parse_index(data, "ix"))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(draw=st.data(), value=st.integers(min_value=0, max_value=255)
       | st.sampled_from(list(b' \t\r\n"0123456789abcdef,:[]{}')))
def test_any_single_byte_change_fails_or_is_another_index(
        built: tuple[ChunkIndex, bytes], draw: st.DataObject, value: int) -> None:
    ix, data = built
    again = parse_index(data, "ix")  # round trip: build -> bytes -> parse
    assert again == ix and again.to_bytes() == data
    n = len(data) - 1  # (both ends too: a JSON document's slack is there)
    i = draw.draw(st.integers(min_value=0, max_value=n) | st.sampled_from([0, 1, n - 1, n]))
    if data[i] == value:
        return
    mutated = data[:i] + bytes([value]) + data[i + 1:]
    try:
        other = parse_index(mutated, "ix")
    except ChunkIndexError:
        return
    assert other != ix


def test_fetch_bytes_counts_a_repeated_chunk_once(built: tuple[ChunkIndex, bytes],
                                                  tmp_path: Path) -> None:
    ix, _ = built
    first = ix.files[-1].chunks[0]
    held = chunk_hashes(ix) - {first.sha256}
    assert fetch_bytes(ix, held) == first.length
