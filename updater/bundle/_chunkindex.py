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
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from modelward.trust._bounded import UntrustedJsonError, loads_bounded
from modelward.trust._fingerprint import FileEntry, MerkleHasher, slot_fingerprint
from modelward.updater.bundle._bundle import MANIFEST, Manifest, parse_manifest
from modelward.updater.bundle._tarstream import check_member_path
from modelward.updater.errors import BundleFormatError, ChunkIndexError

FORMAT = "modelward-chunk-index/1"
ALGORITHM = "fastcdc-2020"
#: Chunk sizes the publisher cuts with (FastCDC's average is ``avg + min``, ~80 KiB).
MIN_CHUNK, AVG_CHUNK, MAX_CHUNK = 16 * 1024, 64 * 1024, 256 * 1024
#: Bounds that hold before anything else is looked at: an 8 GiB bundle at the smallest
#: chunk size would need 512 Ki chunks, ~50 MiB of JSON; a device refuses more.
MAX_INDEX_BYTES = 64 << 20
MAX_CHUNKS = 1 << 20
MAX_CHUNK_BYTES = 16 << 20  # any chunk: FastCDC's own upper limit
MAX_BUNDLE_BYTES = 1 << 40
_SUFFIX = ".chunks.json"


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


@dataclass(frozen=True)
class IndexedFile:
    """A file of the release: the manifest's entry and its chunks, in order."""

    path: str
    size: int
    sha256: str
    merkle_root: str
    data_offset: int  # where the file's data begins in the bundle
    chunks: tuple[Chunk, ...]

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
        """The canonical serialisation (what the publisher signs)."""
        return _dumps(_to_json(self))


def _to_json(ix: ChunkIndex) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "bundle": {"length": ix.bundle_length, "sha256": ix.bundle_sha256},
        "chunking": ix.chunking,
        "manifest": {"offset": ix.manifest_offset,
                     "bytes": base64.b64encode(ix.manifest_bytes).decode()},
        "files": [
            {"path": f.path, "size": f.size, "sha256": f.sha256,
             "merkle_root": f.merkle_root, "offset": f.data_offset,
             "chunks": [[c.offset, c.length, c.sha256.hex()] for c in f.chunks]}
            for f in ix.files
        ],
    }


def _dumps(d: dict[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode() + b"\n"


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


def parse_index(data: bytes, what: str, *, max_bytes: int = MAX_INDEX_BYTES) -> ChunkIndex:
    """Parse and validate a chunk index, bounded before anything is believed.

    Checks: the format; every number in range; digests lowercase hex; each file's chunks
    are contiguous, start at its data offset, are 1 to :data:`MAX_CHUNK_BYTES` long and
    add up to its size; no more than :data:`MAX_CHUNKS` chunks; files (and the manifest)
    lie inside the bundle, in order, without overlapping; paths are safe and unique; the
    embedded manifest is a valid v1 manifest whose files are exactly the index's files
    (path, size, sha256, Merkle root), in the same order; and the bytes are the
    canonical serialisation (:meth:`ChunkIndex.to_bytes`) of what was parsed.

    Raises:
        ChunkIndexError: any of the above fails (the message names the field at fault).
    """
    try:
        d = _obj(loads_bounded(data, max_bytes=max_bytes, what=f"{what}: chunk index",
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
        files: list[IndexedFile] = []
        end = m_off + len(m_bytes)  # (the manifest is the first member)
        total = 0
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
            chunks_raw = f["chunks"]
            if not isinstance(chunks_raw, list):
                raise ValueError(f"{path}: chunks is not a list")
            total += len(chunks_raw)
            if total > MAX_CHUNKS:
                raise ValueError(f"more than {MAX_CHUNKS} chunks")
            chunks: list[Chunk] = []
            pos = off
            for j, c in enumerate(chunks_raw):
                if not isinstance(c, list) or len(c) != 3:
                    raise ValueError(f"{path}: chunk {j} is not [offset, length, sha256]")
                c_off = _int(c[0], f"{path}: chunk {j} offset")
                c_len = _int(c[1], f"{path}: chunk {j} length", 1, MAX_CHUNK_BYTES)
                if c_off != pos:
                    raise ValueError(f"{path}: chunk {j} is at {c_off}, not {pos} "
                                     "(chunks must be contiguous)")
                chunks.append(Chunk(c_off, c_len, bytes.fromhex(_hex(c[2],
                                                                     f"{path}: chunk {j}"))))
                pos += c_len
            if pos != off + size:
                raise ValueError(f"{path}: its chunks cover {pos - off} bytes, not {size}")
            files.append(IndexedFile(path, size, fsha, root, off, tuple(chunks)))
            end = off + size
    except (ValueError, KeyError, TypeError, UntrustedJsonError, binascii.Error,
            BundleFormatError) as e:  # (BundleFormatError: of the embedded manifest)
        raise ChunkIndexError(f"{what}: invalid chunk index: {str(e)[:300]}",
                              index=what) from e
    ix = ChunkIndex(length, sha, chunking, m_off, m_bytes, manifest, tuple(files))
    if ix.to_bytes() != data:  # one encoding per index: no unknown nested field, no slack
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

