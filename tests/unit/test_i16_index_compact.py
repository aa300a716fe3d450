"""Fix of a16 (index cost): the chunk lists are read by a strict pattern, outside JSON.
What the same attacker tries next: a '"chunks":[' the scan takes for a file's list (in the
free ``chunking`` object, at the end of an escaped key), a non-canonical chunk list (spaces,
leading zeros, upper-case hex, a trailing comma, a list that never ends), a list of another
file's chunks. Each is refused (ChunkIndexError); the round trip is exact; the parsed
chunks behave as the tuple the publisher built."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.simulator._models import make_linear_model
from modelward.updater.bundle._chunkindex import ChunkIndex, ChunkList, parse_index
from modelward.updater.errors import ChunkIndexError


@pytest.fixture(scope="module")
def ix(tmp_path_factory: pytest.TempPathFactory) -> ChunkIndex:
    d = tmp_path_factory.mktemp("i16compact")
    blob = d / "blob.bin"
    blob.write_bytes(random.Random(2).randbytes(700 * 1024))
    out = d / "b.tar"
    build_bundle(make_linear_model(d / "m.onnx", 1), "classifier", "1.0.0", out,
                 extra=[(blob, "weights.bin")], options=BuildOptions())
    return build_index(Path(out), hashlib.sha256(out.read_bytes()).hexdigest())


def _enc(d: dict[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _refused(data: bytes) -> None:
    with pytest.raises(ChunkIndexError, match="invalid chunk index"):
        parse_index(data, "hostile")


def test_parsed_chunks_are_compact_and_equal_the_built_ones(ix: ChunkIndex) -> None:
    p = parse_index(ix.to_bytes(), "ix")
    assert p == ix and p.to_bytes() == ix.to_bytes()
    for a, b in zip(p.files, ix.files, strict=True):
        assert isinstance(a.chunks, ChunkList)
        assert list(a.chunks) == list(b.chunks) and len(a.chunks) == len(b.chunks)
        assert a.chunks[-1] == b.chunks[-1] and a.chunks[1:3] == tuple(b.chunks[1:3])
        assert all(isinstance(c.sha256, bytes) and len(c.sha256) == 32 for c in a.chunks)
    with pytest.raises(IndexError):
        p.files[0].chunks[len(p.files[0].chunks)]


def test_a_chunk_list_in_the_chunking_object_is_refused(ix: ChunkIndex) -> None:
    d = json.loads(ix.to_bytes())
    big = max(d["files"], key=lambda f: len(f["chunks"]))
    d["chunking"]["chunks"] = big["chunks"][:1]
    _refused(_enc(d))


def test_a_key_ending_in_an_escaped_chunks_is_refused(ix: ChunkIndex) -> None:
    d = json.loads(ix.to_bytes())
    d["chunking"]['x"chunks'] = []
    _refused(_enc(d))


def test_another_file_s_chunk_list_is_refused(ix: ChunkIndex) -> None:
    d = json.loads(ix.to_bytes())
    d["files"][0]["chunks"], d["files"][-1]["chunks"] = (d["files"][-1]["chunks"],
                                                         d["files"][0]["chunks"])
    _refused(_enc(d))


@pytest.mark.parametrize("edit", [
    lambda s: s.replace(b'"chunks":[[', b'"chunks":[ [', 1),
    lambda s: s.replace(b'],[', b'], [', 1),
    lambda s: s.replace(b'"chunks":[[', b'"chunks":[[0', 1),
    lambda s: s.replace(b'"]]', b'",]]', 1).replace(b'",]]', b'"],]', 1),
    lambda s: s.replace(b'"]]', b'"]', 1),
    lambda s: s.replace(b'"]]', b'"] ]', 1),
    lambda s: s[:s.index(b'"chunks":[[') + 40],
    lambda s: s.replace(b'"chunks":[[', b'"chunks":[[-', 1),
], ids=["space before", "space between", "leading zero", "trailing comma", "unclosed",
        "space after", "cut short", "negative"])
def test_a_non_canonical_chunk_list_is_refused(ix: ChunkIndex, edit: Any) -> None:
    data = ix.to_bytes()
    bad = edit(data)
    assert bad != data
    _refused(bad)


def test_upper_case_hex_in_a_chunk_is_refused(ix: ChunkIndex) -> None:
    data = ix.to_bytes()
    c = ix.files[-1].chunks[0].sha256.hex().encode()
    _refused(data.replace(c, c.upper(), 1))


def test_an_index_given_as_a_bytearray_or_memoryview_parses(ix: ChunkIndex) -> None:
    data = ix.to_bytes()
    assert parse_index(bytearray(data), "ba") == parse_index(memoryview(data), "mv") == ix  # type: ignore[arg-type]


def test_an_index_claiming_another_bundle_length_is_refused_before_it_is_parsed(
        ix: ChunkIndex) -> None:
    """A team index that claims a larger bundle (a larger budget) than the signed one."""
    data = ix.to_bytes()
    assert parse_index(data, "ix", bundle_length=ix.bundle_length) == ix
    with pytest.raises(ChunkIndexError, match="not this one"):
        parse_index(data, "ix", bundle_length=ix.bundle_length - 1)
