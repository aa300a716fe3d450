"""The signed chunk index of a release (design.md "Chunk index and delta updates"): format.

Each release publishes, next to its bundle, an index as its own TUF target (length and
hashes signed by the targets role, like the bundle). It holds:

- which bundle it indexes (the bundle target's length and sha256);
- how the files were cut (content-defined chunking, FastCDC 2020, and its sizes);
- the manifest's bytes and where they lie in the bundle;
- every file's size, sha256 and Merkle root (so the slot fingerprint is derived from it)
  and its chunks: ``(offset in the bundle, length, sha256)``, contiguous, covering the
  file's data exactly.

The device needs nothing else of the bundle: its tar headers and padding are never used
(the files are assembled from chunks at the manifest's paths), so when the index is read
the chunks are the verification of every byte the device uses.

This module is the format only: a bounded, validating parser (:func:`parse_index`), a
canonical serialiser and pure helpers. Nothing here is trusted by itself: a parsed index
is used only after TUF verified its bytes as a target, and only for the bundle whose
signed hash it names (:meth:`ChunkIndex.check_bundle`).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from modelward.trust._bounded import UntrustedJsonError, loads_bounded
from modelward.trust._fingerprint import FileEntry, MerkleHasher, slot_fingerprint
from modelward.updater.bundle._bundle import MANIFEST, MAX_FILES, Manifest, parse_manifest
from modelward.updater.bundle._tarstream import check_member_path
from modelward.updater.errors import BundleFormatError, ChunkIndexError

FORMAT = "modelward-chunk-index/1"
ALGORITHM = "fastcdc-2020"
#: Chunk sizes the publisher cuts with (FastCDC's average is ``avg + min``, ~80 KiB).
MIN_CHUNK, AVG_CHUNK, MAX_CHUNK = 16 * 1024, 64 * 1024, 256 * 1024
#: What a device accepts of any chunk: at most ``MAX_CHUNK_BYTES`` long and, but for the
#: last of its file (FastCDC's short tail), at least ``MIN_CHUNK_BYTES``. So a file of
#: ``n`` bytes has at most ``n // MIN_CHUNK_BYTES + 1`` chunks, and an index's cost is
#: bounded by the bundle it indexes: see :func:`index_budget`.
MIN_CHUNK_BYTES = MIN_CHUNK
MAX_CHUNK_BYTES = 1 << 20
#: Bounds that hold whatever the index claims: an 8 GiB bundle (``Config.max_bundle_bytes``)
#: cut at the smallest chunks has 512 Ki chunks, ~50 MiB of JSON; a device refuses more.
MAX_INDEX_BYTES = 64 << 20
MAX_CHUNKS = 1 << 19
MAX_BUNDLE_BYTES = 1 << 40
#: Of an index, what is not its chunk lists: the manifest's bytes in base64 (at most
#: ~1.4 MiB), each file's path (at most the manifest's, escaped) and fields.
_FIXED_BYTES = 6 << 20
_SUFFIX = ".chunks.json"


def max_chunks(bundle_length: int, files: int = MAX_FILES) -> int:
    """The most chunks a device accepts in the index of a bundle of ``bundle_length``
    bytes with ``files`` files (each file's chunks but its last are ``MIN_CHUNK_BYTES``
    or longer)."""
    return min(MAX_CHUNKS, files + bundle_length // MIN_CHUNK_BYTES)


def index_budget(bundle_length: int) -> int:
    """The most bytes a device accepts of the index of a bundle of ``bundle_length``
    bytes: its fixed part, then per chunk ``[offset,length,"<64 hex>"],``."""
    per_chunk = 71 + len(str(bundle_length)) + len(str(MAX_CHUNK_BYTES))
    return _FIXED_BYTES + per_chunk * max_chunks(bundle_length)


def index_path(bundle_target: str) -> str:
    """The TUF target path of a bundle's chunk index (in the bundle's namespace)."""
    return bundle_target + _SUFFIX


def is_index_path(target_path: str) -> bool:
    """Whether a target path names a chunk index (not a release)."""
    return target_path.endswith(_SUFFIX)


@dataclass(frozen=True)
class Chunk:
    """One chunk of a file: where it lies in the bundle, its length and sha256 (32 bytes)."""

    offset: int
    length: int
    sha256: bytes


class ChunkList(Sequence[Chunk]):
    """A file's chunks as a parsed index holds them: 40 bytes a chunk (its offset, and its
    sha256 in one blob), a :class:`Chunk` made only when asked for. Compares equal to any
    sequence of the same chunks (a tuple of :class:`Chunk`, as the publisher builds)."""

    __slots__ = ("_ends", "_hashes", "_start")

    def __init__(self, start: int, ends: array[int], hashes: bytes | bytearray) -> None:
        if len(hashes) != 32 * len(ends):
            raise ValueError("a sha256 per chunk")
        self._start, self._ends, self._hashes = start, ends, hashes

    def __len__(self) -> int:
        return len(self._ends)

    def _at(self, i: int) -> Chunk:
        off = self._ends[i - 1] if i else self._start
        return Chunk(off, self._ends[i] - off, bytes(self._hashes[32 * i:32 * i + 32]))

    @overload
    def __getitem__(self, i: int) -> Chunk: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[Chunk, ...]: ...
    def __getitem__(self, i: int | slice) -> Chunk | tuple[Chunk, ...]:
        n = len(self._ends)
        if isinstance(i, slice):
            return tuple(self._at(j) for j in range(*i.indices(n)))
        if not -n <= i < n:
            raise IndexError("chunk index out of range")
        return self._at(i % n)

    def __iter__(self) -> Iterator[Chunk]:
        off, hashes = self._start, self._hashes
        for i, end in enumerate(self._ends):
            yield Chunk(off, end - off, bytes(hashes[32 * i:32 * i + 32]))
            off = end

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChunkList):
            return (self._start, self._ends, self._hashes) == (other._start, other._ends,
                                                               other._hashes)
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"ChunkList({len(self)} chunks from {self._start})"


@dataclass(frozen=True)
class IndexedFile:
    """A file of the release: the manifest's entry and its chunks, in order."""

    path: str
    size: int
    sha256: str
    merkle_root: str
    data_offset: int  # where the file's data begins in the bundle
    chunks: Sequence[Chunk]  # (a ChunkList when parsed; any sequence when built)

    def file_offset(self, chunk: Chunk) -> int:
        """Where ``chunk`` lies in this file."""
        return chunk.offset - self.data_offset


@dataclass(frozen=True)
class ChunkIndex:
    """A parsed, validated chunk index."""

    bundle_length: int
    bundle_sha256: str
    chunking: dict[str, Any]
    manifest_offset: int
    manifest_bytes: bytes
    manifest: Manifest
    files: tuple[IndexedFile, ...]

    @property
    def fingerprint(self) -> str:
        """The slot fingerprint the index's files make (compare with the signed one).

        The slot holds ``manifest.json`` too, so its entry is in the fingerprint, as in
        ``extract_bundle``'s entries (the manifest's own Merkle root, from its bytes).
        """
        m = MerkleHasher()
        m.update(self.manifest_bytes)
        return slot_fingerprint([FileEntry(MANIFEST, len(self.manifest_bytes), m.hexdigest()),
                                 *(FileEntry(f.path, f.size, f.merkle_root) for f in self.files)])

    @property
    def chunk_count(self) -> int:
        """How many chunks the files have in all."""
        return sum(len(f.chunks) for f in self.files)

    @property
    def data_bytes(self) -> int:
        """Bytes of file data (what a device with nothing would fetch, the index aside)."""
        return sum(f.size for f in self.files)

    def check_bundle(self, length: int, hashes: dict[str, str], what: str) -> None:
        """The index was made for the bundle target with this signed length and hashes.

        Raises:
            ChunkIndexError: it indexes another bundle.
        """
        if length != self.bundle_length or hashes.get("sha256") != self.bundle_sha256:
            raise ChunkIndexError(
                f"{what}: the chunk index is for a {self.bundle_length}-byte bundle with "
                f"sha256 {self.bundle_sha256}, not this one ({length} bytes, sha256 "
                f"{hashes.get('sha256')})", index=what)

    def to_bytes(self) -> bytes:
        """The canonical serialisation (what the publisher signs): ``json.dumps`` of the
        index with sorted keys and no spaces, then a newline."""
        return b"".join(self.iter_bytes())

    def iter_bytes(self) -> Iterator[bytes]:
        """:meth:`to_bytes` in pieces of at most :data:`_PIECE_CHUNKS` chunks (a device
        writes its hint so: the whole serialisation at once, ~100 bytes a chunk, and its
        parts were its peak RSS's largest growth with the bundle)."""
        return _pieces(self, _chunk_json_parts)


_PIECE_CHUNKS = 1024


def _chunk_json(i: int, f: IndexedFile) -> bytes:
    return ",".join(f'[{c.offset},{c.length},"{c.sha256.hex()}"]' for c in f.chunks).encode()


def _chunk_json_parts(i: int, f: IndexedFile) -> Iterator[bytes]:
    chunks = iter(f.chunks)
    sep = ""
    while group := list(itertools.islice(chunks, _PIECE_CHUNKS)):
        yield (sep + ",".join(f'[{c.offset},{c.length},"{c.sha256.hex()}"]'
                              for c in group)).encode()
        sep = ","


def _pieces(ix: ChunkIndex, body: Callable[[int, IndexedFile], bytes | Iterable[bytes]]
            ) -> Iterator[bytes]:
    """The canonical serialisation in pieces, with ``body(i, file)`` as the inside of
    file ``i``'s chunk list (the keys sort as written here)."""
    yield b'{"bundle":' + _dumps({"length": ix.bundle_length, "sha256": ix.bundle_sha256})
    yield b',"chunking":' + _dumps(ix.chunking) + b',"files":['
    for i, f in enumerate(ix.files):
        rest = _dumps({"merkle_root": f.merkle_root, "offset": f.data_offset,
                       "path": f.path, "sha256": f.sha256, "size": f.size})
        yield (b',' if i else b'') + b'{"chunks":['
        inside = body(i, f)
        if isinstance(inside, bytes):
            yield inside
        else:
            yield from inside
        yield b'],' + rest[1:]
    yield b'],"format":' + _dumps(FORMAT) + b',"manifest":' + _dumps(
        {"bytes": base64.b64encode(ix.manifest_bytes).decode(), "offset": ix.manifest_offset})
    yield b"}\n"


def _dumps(d: Any) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def make_index(bundle_length: int, bundle_sha256: str, manifest_offset: int,
               manifest_bytes: bytes, files: Iterable[IndexedFile],
               chunking: dict[str, Any] | None = None, *, what: str = "index") -> ChunkIndex:
    """Build an index from its parts and validate it as a device would (publisher side).

    Raises:
        ChunkIndexError: the parts do not make a valid index.
    """
    ix = ChunkIndex(bundle_length, bundle_sha256,
                    chunking or {"algorithm": ALGORITHM, "min": MIN_CHUNK, "avg": AVG_CHUNK,
                                 "max": MAX_CHUNK},
                    manifest_offset, manifest_bytes,
                    parse_manifest(manifest_bytes, what), tuple(files))
    return parse_index(ix.to_bytes(), what)


def _int(v: Any, what: str, low: int = 0, high: int = MAX_BUNDLE_BYTES) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise ValueError(f"{what} is not an integer in [{low}, {high}]")
    return v


def _hex(v: Any, what: str) -> str:
    if not isinstance(v, str) or len(v) != 64 or v.strip("0123456789abcdef"):
        raise ValueError(f"{what} is not a lowercase hex sha256")
    return v


def _obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError(f"{what} is not an object")
    return v


_HEAD = re.compile(rb'\{"bundle":\{"length":([1-9][0-9]{0,15}),"sha256":"[0-9a-f]{64}"\},'
                   rb'"chunking":')
_CHUNKS_KEY = b'"chunks":['
#: One chunk of a list, then ``,`` before the next or the list's ``]`` (not consumed).
_ENTRY = re.compile(rb'\[(0|[1-9][0-9]{0,15}),([1-9][0-9]{0,7}),"([0-9a-f]{64})"\]'
                    rb'(?:,(?=\[)|(?=\]))')


def _chunk_list(data: bytes, p: int, budget: int, what: str
                ) -> tuple[int, array[int], bytearray, int]:
    """The chunk list whose inside begins at ``data[p]`` (canonical, contiguous, each
    chunk 1 to ``MAX_CHUNK_BYTES`` long and all but the last ``MIN_CHUNK_BYTES`` or
    longer, at most ``budget`` of them): its first offset, the chunks' ends, their
    sha256s and where the list's ``]`` is."""
    # (no ']' inside a chunk: a list ends at its first '"]]', or at once when empty)
    close = p if data[p:p + 1] == b"]" else data.find(b'"]]', p) + 2
    if close < p:
        raise ValueError(f"{what} does not end")
    count = data.count(b'"]', p, close)
    if count > budget:
        raise ValueError(f"more chunks than a device accepts for this bundle ({budget})")
    ends: array[int] = array("Q")
    hashes = bytearray()  # (grown 32 bytes at a time: never twice the list's size)
    first = pos = -1
    last, at = 0, p
    append, unhexlify = ends.append, binascii.unhexlify
    for m in _ENTRY.finditer(data, p, close + 1):
        if m.start() != at:
            break
        off, n = int(m[1]), int(m[2])
        if pos < 0:
            first = pos = off
        elif off != pos:
            raise ValueError(f"{what}: chunk {len(ends)} is at {off}, not {pos} (chunks "
                             "must be contiguous)")
        elif last < MIN_CHUNK_BYTES:
            raise ValueError(f"{what}: chunk {len(ends) - 1} is {last} bytes, under "
                             f"{MIN_CHUNK_BYTES} and not its file's last")
        if n > MAX_CHUNK_BYTES:
            raise ValueError(f"{what}: chunk {len(ends)} is {n} bytes (at most "
                             f"{MAX_CHUNK_BYTES})")
        pos += n
        last = n
        append(pos)
        hashes += unhexlify(m[3])
        at = m.end()
    if at != close:
        raise ValueError(f"{what}: chunk {len(ends)} is not [offset, length, sha256]")
    return first, ends, hashes, close


def parse_index(data: bytes, what: str, *, max_bytes: int = MAX_INDEX_BYTES,
                bundle_length: int | None = None) -> ChunkIndex:
    """Parse and validate a chunk index, bounded before anything is believed.

    Checks, before any JSON is parsed: the canonical head, then the length against what
    the bundle it names admits (:func:`index_budget`). Then: the format; every number in
    range; digests lowercase hex; each file's chunks are contiguous, start at its data
    offset, are 1 to :data:`MAX_CHUNK_BYTES` long, all but the last at least
    :data:`MIN_CHUNK_BYTES`, and add up to its size; no more than :func:`max_chunks`
    chunks; files (and the manifest) lie inside the bundle, in order, without
    overlapping; paths are safe and unique; the embedded manifest is a valid v1 manifest
    whose files are exactly the index's files (path, size, sha256, Merkle root), in the
    same order; and the bytes are the canonical serialisation
    (:meth:`ChunkIndex.to_bytes`) of what was parsed.

    ``bundle_length``: the signed length of the bundle target the index is for, when the
    caller knows it: an index of any other length is refused before its budget is
    computed (so the budget is the signed bundle's, not one the index claims).

    The chunk lists are read with a strict pattern into compact arrays (40 bytes a chunk)
    and never become JSON objects; ``json`` parses only the rest (the skeleton).

    Raises:
        ChunkIndexError: any of the above fails (the message names the field at fault).
    """
    if not isinstance(data, bytes):  # (bytearray, memoryview: read as bytes)
        data = bytes(data)
    try:
        if len(data) > max_bytes:
            raise ValueError(f"the index is over {max_bytes} bytes")
        head = _HEAD.match(data)
        if head is None:
            raise ValueError("it does not begin as the publisher writes an index "
                             '({"bundle":{"length":...,"sha256":...},"chunking":...)')
        claimed = _int(int(head[1]), "bundle.length", 1)
        if bundle_length is not None and claimed != bundle_length:
            raise ValueError(f"it indexes a {claimed}-byte bundle, not this one "
                             f"({bundle_length} bytes)")
        if len(data) > index_budget(claimed):
            raise ValueError(f"{len(data)} bytes is more than a device accepts of the index "
                             f"of a {claimed}-byte bundle ({index_budget(claimed)})")
        budget = max_chunks(claimed)
        # The chunk lists, each replaced by its number in the skeleton: every '"chunks":['
        # of the document must open one (in a JSON string '"' is escaped).
        lists: list[tuple[int, array[int], bytearray]] = []
        skeleton: list[bytes] = []
        at = 0
        while (k := data.find(_CHUNKS_KEY, at)) >= 0:
            p = k + len(_CHUNKS_KEY)
            first, ends, hashes, close = _chunk_list(data, p, budget, f"chunk list {len(lists)}")
            budget -= len(ends)
            skeleton += [data[at:p], str(len(lists)).encode()]
            lists.append((first, ends, hashes))
            at = close
        skeleton.append(data[at:])
        skel = b"".join(skeleton)
        d = _obj(loads_bounded(skel, max_bytes=_FIXED_BYTES, what=f"{what}: chunk index",
                               max_depth=6), "the index")
        if d.get("format") != FORMAT:
            raise ValueError(f"format {str(d.get('format'))[:40]!r} is not {FORMAT!r}")
        extra = set(d) - {"format", "bundle", "chunking", "manifest", "files"}
        if extra:
            raise ValueError(f"unknown fields {sorted(extra)[:5]}")
        b = _obj(d["bundle"], "bundle")
        length = _int(b["length"], "bundle.length", 1)
        sha = _hex(b["sha256"], "bundle.sha256")
        chunking = _obj(d["chunking"], "chunking")
        if len(json.dumps(chunking)) > 512:
            raise ValueError("chunking is over 512 bytes")
        m = _obj(d["manifest"], "manifest")
        m_off = _int(m["offset"], "manifest.offset")
        raw = m["bytes"]
        if not isinstance(raw, str) or len(raw) > (1 << 22):
            raise ValueError("manifest.bytes is not a string of at most 4 MiB")
        m_bytes = base64.b64decode(raw, validate=True)
        if m_off + len(m_bytes) > length:
            raise ValueError("the manifest lies beyond the bundle's end")
        manifest = parse_manifest(m_bytes, what)
        files_raw = d["files"]
        if not isinstance(files_raw, list) or len(files_raw) != len(manifest.files):
            raise ValueError("files does not list exactly the manifest's files")
        if len(lists) != len(files_raw):
            raise ValueError(f"{len(lists)} chunk lists for {len(files_raw)} files")
        files: list[IndexedFile] = []
        end = m_off + len(m_bytes)  # (the manifest is the first member)
        for i, (fr, mf) in enumerate(zip(files_raw, manifest.files, strict=True)):
            f = _obj(fr, f"files[{i}]")
            path = check_member_path(f["path"]) if isinstance(f["path"], str) else ""
            size = _int(f["size"], f"files[{i}].size")
            fsha = _hex(f["sha256"], f"files[{i}].sha256")
            root = _hex(f["merkle_root"], f"files[{i}].merkle_root")
            if (path, size, fsha, root) != (mf.path, mf.size, mf.sha256, mf.merkle_root):
                raise ValueError(f"files[{i}] ({path!r}) is not the manifest's entry "
                                 f"{mf.path!r}")
            off = _int(f["offset"], f"files[{i}].offset")
            if off < end:
                raise ValueError(f"{path}: its data overlaps the member before it")
            if off + size > length:
                raise ValueError(f"{path}: its data lies beyond the bundle's end")
            marker = f["chunks"]
            if not (type(marker) is list and len(marker) == 1 and marker[0] == i
                    and type(marker[0]) is int):
                raise ValueError(f"{path}: chunks is not its list of chunks")
            first, ends, hashes = lists[i]
            if ends and first != off:
                raise ValueError(f"{path}: chunk 0 is at {first}, not {off} (chunks must "
                                 "be contiguous)")
            covered = ends[-1] - off if ends else 0
            if covered != size:
                raise ValueError(f"{path}: its chunks cover {covered} bytes, not {size}")
            files.append(IndexedFile(path, size, fsha, root, off,
                                     ChunkList(off, ends, hashes)))
            end = off + size
    except (ValueError, KeyError, TypeError, UntrustedJsonError, binascii.Error,
            BundleFormatError) as e:  # (BundleFormatError: of the embedded manifest)
        raise ChunkIndexError(f"{what}: invalid chunk index: {str(e)[:300]}",
                              index=what) from e
    ix = ChunkIndex(length, sha, chunking, m_off, m_bytes, manifest, tuple(files))
    # One encoding per index (no unknown nested field, no slack): the skeleton is the
    # canonical one and the chunk lists were read in their only form.
    if b"".join(_pieces(ix, lambda i, f: str(i).encode())) != skel:
        raise ChunkIndexError(f"{what}: invalid chunk index: not in its canonical form "
                              "(as the publisher writes it)", index=what)
    return ix


def fetch_bytes(new: ChunkIndex, held: Iterable[bytes]) -> int:
    """Bytes of ``new``'s file data a device holding chunks ``held`` (sha256s) fetches.

    The index itself and the transport's framing are not counted. The device verifies
    what it holds when it installs, so this is what it fetches when its slot is intact.
    """
    have = set(held)
    seen: set[bytes] = set()
    n = 0
    for f in new.files:
        for c in f.chunks:
            if c.sha256 in have or c.sha256 in seen:
                continue  # (a chunk repeated within the release is fetched once)
            seen.add(c.sha256)
            n += c.length
    return n


def chunk_hashes(ix: ChunkIndex) -> set[bytes]:
    """Every chunk's sha256 in ``ix``."""
    return {c.sha256 for f in ix.files for c in f.chunks}

