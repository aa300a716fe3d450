"""Cutting a bundle into the chunks of its signed index (publisher side).

Each file's data is cut with content-defined chunking (FastCDC 2020, ``pyfastcdc``): a
boundary depends only on the bytes around it, so a tensor inserted in the middle of a
model moves later bytes without changing their chunks, and a fine-tune that rewrites
the last layers leaves every earlier chunk as it was. Fixed-size chunks (the 4 MiB
Merkle leaves) would change every chunk after an insertion.

The bundle is read through ``mmap`` and cut and hashed in place: nothing is copied, and
the chunks are hashed on every core (hashlib releases the GIL).
"""

from __future__ import annotations

import hashlib
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from modelward.publisher.errors import OperatorInputError
from modelward.trust._fingerprint import hash_workers
from modelward.updater.bundle._bundle import MANIFEST, parse_manifest
from modelward.updater.bundle._chunkindex import (
    ALGORITHM,
    AVG_CHUNK,
    MAX_CHUNK,
    MIN_CHUNK,
    Chunk,
    ChunkIndex,
    IndexedFile,
    make_index,
)
from modelward.updater.bundle._tarstream import Member, TarStream


class _MapReader:
    """A ``read`` over a memory map, handing out uncopied slices."""

    def __init__(self, view: memoryview) -> None:
        self._view, self._pos = view, 0

    def read(self, n: int = -1, /) -> memoryview:
        n = len(self._view) - self._pos if n < 0 else n
        out = self._view[self._pos:self._pos + n]
        self._pos += len(out)
        return out


def _members(view: memoryview) -> list[Member]:
    stream = TarStream(_MapReader(view))
    out: list[Member] = []
    while (m := stream.next()) is not None:
        out.append(m)  # (next() passes by the member's data)
    return out


def cut(view: memoryview, base: int, pool: ThreadPoolExecutor) -> list[Chunk]:
    """FastCDC chunks of ``view`` (a file's data at bundle offset ``base``), hashed."""
    from pyfastcdc import FastCDC  # (operator extra; a device never cuts)

    cdc = FastCDC(AVG_CHUNK, min_size=MIN_CHUNK, max_size=MAX_CHUNK)
    spans = [(c.offset, c.length) for c in cdc.cut_buf(view)] if len(view) else []
    digests = pool.map(lambda s: hashlib.sha256(view[s[0]:s[0] + s[1]]).digest(), spans)
    return [Chunk(base + off, n, d) for (off, n), d in zip(spans, digests, strict=True)]


def build_index(bundle: Path, sha256: str) -> ChunkIndex:
    """The chunk index of a bundle that ``extract_bundle`` has verified (sha256 given).

    Raises:
        OperatorInputError: the bundle changed since it was verified, or is not laid out
            as ``bundle build`` writes it (the manifest first, then its files in order).
    """
    what = str(bundle)
    with open(bundle, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise OperatorInputError(f"{bundle} is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return _index(view, size, sha256, what)
            finally:
                view.release()


def _index(view: memoryview, size: int, sha256: str, what: str) -> ChunkIndex:
    members = _members(view)
    if not members or members[0].name != MANIFEST:
        raise OperatorInputError(f"{what}: {MANIFEST} is not the first member")
    first = members[0]
    manifest_bytes = bytes(view[first.data_offset:first.data_offset + first.size])
    manifest = parse_manifest(manifest_bytes, what)
    by_name = {m.name: m for m in members[1:]}
    if [m.name for m in members[1:]] != [f.path for f in manifest.files]:
        raise OperatorInputError(f"{what}: the members are not the manifest's files in order")
    whole = hashlib.sha256(view).hexdigest()
    if whole != sha256:
        raise OperatorInputError(f"{what} changed while it was being published")
    files: list[IndexedFile] = []
    with ThreadPoolExecutor(hash_workers()) as pool:
        for mf in manifest.files:
            m = by_name[mf.path]
            data = view[m.data_offset:m.data_offset + m.size]
            try:
                files.append(IndexedFile(mf.path, mf.size, mf.sha256, mf.merkle_root,
                                         m.data_offset, tuple(cut(data, m.data_offset, pool))))
            finally:
                data.release()
    return make_index(size, sha256, first.data_offset, manifest_bytes, files,
                      {"algorithm": ALGORITHM, "min": MIN_CHUNK, "avg": AVG_CHUNK,
                       "max": MAX_CHUNK}, what=what)
