"""Cutting a bundle into the chunks of its signed index (publisher side).

Each file's data is cut with content-defined chunking (FastCDC 2020, ``pyfastcdc``): a
boundary depends only on the bytes around it, so a tensor inserted in the middle of a
model moves later bytes without changing their chunks, and a fine-tune that rewrites
the last layers leaves every earlier chunk as it was. Fixed-size chunks (the 4 MiB
Merkle leaves) would change every chunk after an insertion.

The bundle is read once, in order, with ordinary reads (never ``mmap``: a file the operator
rewrites or truncates meanwhile would kill the process with SIGBUS): its tar headers are
parsed, every byte goes into the whole-bundle sha256, and each file's data is cut a window
at a time. A chunk is kept only once the bytes after its start reach ``MAX_CHUNK`` (or the
file's end), so the cut is the one FastCDC makes over the whole file. The chunks are hashed
on every core (hashlib releases the GIL). The index describes exactly the bytes hashed:
when they are not the bytes verified, the cut is refused.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from modelward.publisher.errors import OperatorInputError
from modelward.trust._fingerprint import hash_workers
from modelward.updater.bundle._bundle import MANIFEST, MAX_MANIFEST_BYTES, parse_manifest
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
from modelward.updater.bundle._encryption import (
    Chunks,
    EncryptionFormatError,
    parse_table,
    table_budget,
)
from modelward.updater.bundle._tarstream import Member, Readable, TarFormatError, TarStream
from modelward.updater.errors import BundleFormatError

#: Bytes of a file's data cut at once (at least ``MAX_CHUNK``); what the cut holds.
WINDOW = 16 << 20


class _HashingReader:
    """``read`` from a file, hashing (and counting) every byte handed out."""

    def __init__(self, source: Readable) -> None:
        self._source = source
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1, /) -> bytes | memoryview:
        data = self._source.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data

    def finish(self) -> None:
        """Read (and hash) to the end of the file."""
        while self.read(1 << 20):
            pass


def cut(view: memoryview, base: int, pool: ThreadPoolExecutor) -> list[Chunk]:
    """FastCDC chunks of ``view`` (a file's whole data at bundle offset ``base``), hashed."""
    chunks, used = _cut_window(view, base, True, pool)
    assert used == len(view)
    return chunks


def _cut_window(view: memoryview, base: int, final: bool, pool: ThreadPoolExecutor
                ) -> tuple[list[Chunk], int]:
    """The chunks of ``view`` (bundle offset ``base``) that the rest of the file cannot
    change (all of them when ``final``: the file ends there), hashed; and the bytes used."""
    from pyfastcdc import FastCDC  # (operator extra; a device never cuts)

    cdc = FastCDC(AVG_CHUNK, min_size=MIN_CHUNK, max_size=MAX_CHUNK)
    spans: list[tuple[int, int]] = []
    if len(view):
        for c in cdc.cut_buf(view):
            if not final and len(view) - c.offset < MAX_CHUNK:
                break  # (its end may depend on bytes not read yet)
            spans.append((c.offset, c.length))
        del c  # (it holds a slice of view)
    digests = pool.map(lambda s: hashlib.sha256(view[s[0]:s[0] + s[1]]).digest(), spans)
    chunks = [Chunk(base + off, n, d) for (off, n), d in zip(spans, digests, strict=True)]
    return chunks, sum(n for _, n in spans)


def _cut_member(stream: TarStream, member: Member, pool: ThreadPoolExecutor) -> list[Chunk]:
    """The chunks of the pending member's data, read from ``stream`` a window at a time."""
    out: list[Chunk] = []
    buf, base, left = bytearray(), member.data_offset, member.size
    for piece in stream.data():
        buf += piece
        left -= len(piece)
        if len(buf) < max(WINDOW, MAX_CHUNK) and left:
            continue
        view = memoryview(buf)
        try:
            chunks, used = _cut_window(view, base, not left, pool)
            rest = bytearray(view[used:])
        finally:
            view.release()
        out += chunks
        buf, base = rest, base + used
    return out


def _cut_at(stream: TarStream, member: Member, lengths: list[int],
            pool: ThreadPoolExecutor) -> list[Chunk]:
    """The pending member's data cut at ``lengths`` (which cover it), hashed."""
    out: list[Chunk] = []
    buf, base, i = bytearray(), member.data_offset, 0
    pending: list[tuple[int, bytes]] = []

    def flush() -> None:
        digests = pool.map(lambda p: hashlib.sha256(p[1]).digest(), pending)
        out.extend(Chunk(off, len(data), d) for (off, data), d in
                   zip(pending, digests, strict=True))
        pending.clear()

    at = 0  # (of buf: what is not cut yet starts there)
    for piece in stream.data():
        buf += piece
        while i < len(lengths) and len(buf) - at >= lengths[i]:
            n = lengths[i]
            pending.append((base, bytes(buf[at:at + n])))
            at, base, i = at + n, base + n, i + 1
        del buf[:at]
        at = 0
        if len(pending) >= 64:
            flush()
    flush()
    if buf or i != len(lengths):  # (the bundle changed since it was verified)
        raise OperatorInputError(f"{member.name}: its data is not the table's chunks")
    return out


def build_index(bundle: Path, sha256: str) -> ChunkIndex:
    """The chunk index of a bundle that ``extract_bundle`` has verified (sha256 given).

    Raises:
        OperatorInputError: the bundle changed since it was verified (its bytes do not hash
            to ``sha256``), or is not laid out as ``bundle build`` writes it (the manifest
            first, then its files in order).
    """
    what = str(bundle)
    with open(bundle, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise OperatorInputError(f"{bundle} is empty")
        return _index(f, size, sha256, what)


def _index(source: Readable, size: int, sha256: str, what: str) -> ChunkIndex:
    reader = _HashingReader(source)

    def changed() -> OperatorInputError:
        return OperatorInputError(f"{what} changed while it was being published")

    def layout(message: str) -> OperatorInputError:
        reader.finish()  # (a file that changed is reported as changed, not as mislaid)
        return changed() if reader.sha.hexdigest() != sha256 else OperatorInputError(message)

    stream = TarStream(reader)
    try:
        first = stream.next()
        if first is None or first.name != MANIFEST or first.size > MAX_MANIFEST_BYTES:
            raise layout(f"{what}: {MANIFEST} is not the first member")
        manifest_offset = first.data_offset
        manifest_bytes = b"".join(bytes(v) for v in stream.data())
        try:
            manifest = parse_manifest(manifest_bytes, what)
        except BundleFormatError as e:
            raise layout(f"{what}: {MANIFEST} is not a valid manifest ({e})") from e
        order = f"{what}: the members are not the manifest's files in order"
        files: list[IndexedFile] = []
        enc = manifest.encryption
        table: dict[str, Chunks] | None = None
        with ThreadPoolExecutor(hash_workers()) as pool:
            for mf in manifest.files:
                m = stream.next()
                if m is None or m.name != mf.path:
                    raise layout(order)
                if enc is not None and mf.path == enc.table:
                    budget = table_budget({f.path: f.size for f in manifest.files}, enc)
                    if m.size > budget:  # (before a byte of it is read)
                        raise layout(f"{what}: the table {mf.path} is {m.size} bytes, over "
                                     f"the {budget} its files can need")
                    data = b"".join(bytes(v) for v in stream.data())
                    chunks = cut(memoryview(data), m.data_offset, pool) if data else []
                    try:
                        table = parse_table(data, enc, {f.path: f.size for f in
                                                        manifest.files})
                    except EncryptionFormatError as e:
                        raise layout(f"{what}: {e}") from e
                elif enc is not None and mf.path in enc.ciphertext_sha256:
                    if table is None:
                        raise layout(f"{what}: {mf.path} is encrypted and comes before the "
                                     f"table {enc.table}")
                    # (cut where it was encrypted: an unchanged chunk of the plaintext is
                    # the same ciphertext chunk, so the index finds it in the next release)
                    chunks = _cut_at(stream, m, [n for n, _ in table[mf.path]], pool)
                else:
                    chunks = _cut_member(stream, m, pool)
                files.append(IndexedFile(mf.path, mf.size, mf.sha256, mf.merkle_root,
                                         m.data_offset, tuple(chunks)))
        if stream.next() is not None:
            raise layout(order)
        stream.drain()
    except TarFormatError as e:  # (it was verified: a tar error now means it changed)
        raise changed() from e
    reader.finish()
    if reader.count != size or reader.sha.hexdigest() != sha256:
        raise changed()
    return make_index(size, sha256, manifest_offset, manifest_bytes, files,
                      {"algorithm": ALGORITHM, "min": MIN_CHUNK, "avg": AVG_CHUNK,
                       "max": MAX_CHUNK}, what=what)
