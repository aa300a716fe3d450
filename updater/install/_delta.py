"""Delta install: assemble a release from the chunks the device holds and those it fetches.

design.md "Chunk index and delta updates". The signed chunk index of the release (a TUF
target of its own, verified by length and hash, bound to the bundle by its signed length,
sha256 and fingerprint) lists every file's chunks. The device:

1. plans, over facts it reads now (:func:`plan_needs`, pure): for every distinct chunk,
   where it may already lie: at its own place in ``staging/incoming`` (an interrupted
   attempt), in the active or previous slot (located by the *hint*, the index of that
   slot's release stored after its commit under ``state_dir/chunks/<fingerprint>.json``,
   or, without one, at the same path and file offset);
2. reads each such candidate, hashes it and writes it into ``staging/incoming`` only when
   its sha256 is the index's (a chunk repeated within the release is written at each of
   its places, fetched once);
3. fetches what is left as coalesced byte ranges of the bundle (:func:`coalesce`, pure;
   merged further until they take no more requests than the whole bundle,
   :func:`cap_requests`), hashes every chunk as it arrives (a thread pool: hashlib
   releases the GIL) and writes it only when it matches; a mismatch is a
   :class:`DeltaChunkError` naming the file and the chunk, and nothing of that chunk is
   written.

Each received byte is hashed once (the chunk's sha256): no whole-bundle sha256, no
per-file sha256, no Merkle tree while receiving. The anchor is the installer's next step,
unchanged: the slot fingerprint re-derived from the files on disk (sealed copies of the
health check's inputs) must be the signed one before the health check, and again before
the commit. That is also why reading a held chunk and then writing it is no TOCTOU hole:
a base slot or a stage file rewritten after its chunk was hashed changes the bytes on
disk, and the fingerprint derived from disk after assembly no longer matches (the stage
is discarded, nothing trusted moves, and the installer takes the whole bundle once). A
held chunk is read once, hashed, and the very bytes hashed are written: not
``copy_file_range`` after the hash, which would copy what the disk holds by then, and
would save little for chunks of at most 256 KiB that were read anyway.

Nothing the disk holds is trusted: hints are read bounded and without following a link,
used only when their fingerprint is the slot's recorded one, and every chunk they locate
is hashed before use; files in ``incoming`` are continued only as plain files with one
link, opened without following links (:mod:`updater.install._statedir`).

An interrupted attempt leaves what it wrote in ``staging/incoming``; the next one hashes
it again and fetches only what is still missing.

A delta refused for good (its index lied, the origin refused, garbled or altered its
ranges, or its transfers broke off before any chunk :data:`MAX_DELTA_STALLS` times in a
row) is remembered for the release in the TPM-MACed rejections file (not as a rejection:
:mod:`updater.install._rejections`), and later attempts take the whole bundle directly;
so does an attempt that finds the whole bundle's download of that release begun. A
refused delta costs its bytes once per release, not at every poll.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import hashlib
import itertools
import logging
import os
import queue
import shutil
import stat
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, overload

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile

from modelward.trust._fingerprint import (
    MAX_ENTRIES,
    FileEntry,
    MerkleHasher,
    hash_workers,
    slot_fingerprint,
)
from modelward.updater.bundle._bundle import MANIFEST, Manifest
from modelward.updater.bundle._chunkindex import (
    MAX_INDEX_BYTES,
    Chunk,
    ChunkIndex,
    IndexedFile,
    parse_index,
)
from modelward.updater.bundle._encryption import ContentKey
from modelward.updater.errors import ChunkIndexError, StagingError, TargetHashError
from modelward.updater.idle import Gate
from modelward.updater.install._stage import WRITE_BEHIND, Stage, _write_behind
from modelward.updater.install._statedir import (
    FILE_MODE,
    is_plain_dir,
    make_dirs_at,
    mkdir_exact_at,
    open_at,
    open_dir,
    open_root,
    plain_dir,
    plain_stats_at,
    read_at,
    remove_at,
    write_at,
)
from modelward.updater.transport._ranges import RangeAnswerError

logger = logging.getLogger(__name__)

#: A gap of at most this many bytes between two fetched chunks is fetched too, so that
#: both come in one range (a tar header and padding between two files is 512-1023).
MAX_GAP = 4096
#: Candidate places read for one chunk at most (each is read and hashed).
MAX_SOURCES = 4
#: Bytes of held chunks read and hashed in one batch (on every core), and of fetched
#: chunks hashed at once: bounds memory whatever the index says (and keeps the peak RSS
#: flat from small to large bundles: tests/integration/test_memory.py).
BATCH_BYTES = 2 << 20  # (24+ chunks: enough to keep every core hashing)
HINTS = "chunks"  # state_dir/chunks/<fingerprint>.json
#: Attempts in a row whose delta failed in transfer before any chunk came, after which
#: the release's whole bundle is taken (an origin or broker that breaks off only ranges).
MAX_DELTA_STALLS = 3
#: Bytes of one request (the MQTT block, ``MqttConfig.block_size``): a delta takes no more
#: requests of this size than the whole bundle (:func:`cap_requests`).
REQUEST_BYTES = 1 << 20
#: Bytes of fetched chunks that wait for their hash and write at a time (the receiving
#: thread goes on meanwhile; bounds memory with the transport's pieces).
FETCH_INFLIGHT = 8 << 20
_IOV_MAX = 1024  # buffers in one pwritev at most (Linux's UIO_MAXIOV)


class DeltaChunkError(TargetHashError):
    """A fetched chunk is not the one the signed index names (altered on the origin or in
    transit). Nothing of it was written."""

    def __init__(self, message: str, *, target: str, file: str, chunk: int) -> None:
        super().__init__(message, target=target)
        self.file, self.chunk = file, chunk


class DeltaUnavailable(Exception):  # noqa: N818 - a reason, not an error the user sees
    """The delta path cannot be used for this release: the caller takes the whole bundle."""


def index_fingerprint(ix: ChunkIndex) -> str:
    """The slot fingerprint the release's files make: the manifest and every file.

    (``ChunkIndex.fingerprint`` leaves out ``manifest.json``, which a slot holds and the
    signed fingerprint covers.)
    """
    return slot_fingerprint(entries_of(ix))


def entries_of(ix: ChunkIndex) -> list[FileEntry]:
    """The fingerprint entries of the release the index describes (manifest first)."""
    m = MerkleHasher()
    m.update(ix.manifest_bytes)
    return [FileEntry(MANIFEST, len(ix.manifest_bytes), m.hexdigest()),
            *(FileEntry(f.path, f.size, f.merkle_root) for f in ix.files)]


def check_usable(ix: ChunkIndex, target: TargetFile, fingerprint: str, name: str,
                 version: str) -> None:
    """The verified index describes this release (pure).

    Raises:
        ChunkIndexError: it indexes another bundle, another fingerprint or another
            name/version.
    """
    ix.check_bundle(target.length, dict(target.hashes), target.path)
    fp = index_fingerprint(ix)
    if fp != fingerprint:
        raise ChunkIndexError(f"{target.path}: the chunk index makes fingerprint {fp}, the "
                              f"signed one is {fingerprint}", index=target.path)
    if (ix.manifest.name, ix.manifest.version) != (name, version):
        raise ChunkIndexError(f"{target.path}: the chunk index's manifest says "
                              f"{ix.manifest.name} {ix.manifest.version}, the target "
                              f"{name} {version}", index=target.path)


# -- planning (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Place:
    """A chunk-sized span of a file: in ``root`` ("incoming" or a base's name)."""

    root: str
    path: str
    offset: int  # in the file


@dataclass(frozen=True, slots=True)
class Need:
    """One distinct chunk of the new release."""

    sha256: bytes
    length: int
    bundle_offset: int  # of its first occurrence: what is fetched
    file: str  # (for messages) the first file it is in, and its index there
    number: int
    dests: tuple[Place, ...]  # every place in incoming it goes to
    sources: tuple[Place, ...]  # where it may already be held, best first


@dataclass(frozen=True)
class Base:
    """A slot that may hold chunks: the sizes of its plain files, its hint if usable."""

    name: str
    sizes: Mapping[str, int]
    hint: ChunkIndex | None = None


_NONE = 0xFFFFFFFF  # (in Plan's arrays: no further place)


def _bits(n: int) -> int:
    return max(1, n.bit_length())


def _prefix(sha: bytes, bits: int) -> int:
    """The first ``bits`` (at most 64) bits of ``sha``."""
    return int.from_bytes(sha[:8], "big") >> (64 - bits)


class _Chunks:
    """The chunks of an index's files numbered in order, each made only when asked for."""

    def __init__(self, ix: ChunkIndex) -> None:
        self.files = ix.files
        self.starts = [0]
        for f in ix.files:
            self.starts.append(self.starts[-1] + len(f.chunks))
        self.count = self.starts[-1]
        self.gbits = _bits(self.count)

    def at(self, g: int) -> tuple[IndexedFile, int, Chunk]:
        fi = bisect.bisect_right(self.starts, g) - 1
        f = self.files[fi]
        j = g - self.starts[fi]
        return f, j, f.chunks[j]

    def keys(self) -> list[int]:
        """Each chunk's sha256 prefix and number in one int, sorted (a transient list: an
        int a chunk, no object kept)."""
        pbits = 64 - self.gbits
        out = [(_prefix(c.sha256, pbits) << self.gbits) | g for g, c in
               enumerate(itertools.chain.from_iterable(f.chunks for f in self.files))]
        out.sort()
        return out


#: Entries of a hint with the same sha256 prefix looked at for one chunk at most (a hint
#: is untrusted: one crafted with many equal prefixes costs no more than this a chunk).
_HINT_SCAN = 64


class _HintLookup:
    """Where a base's hint has a sha256: sorted keys (8 bytes a chunk, :meth:`_Chunks.keys`),
    looked up by bisection, each candidate's full sha256 compared."""

    def __init__(self, base: Base, hint: ChunkIndex) -> None:
        self.name, self.chunks = base.name, _Chunks(hint)
        self.keys = array("Q", self.chunks.keys())

    def places(self, sha: bytes, length: int) -> list[Place]:
        """At most two places of ``sha`` (a chunk ``length`` bytes long) in the hint, first
        first. Looks at :data:`_HINT_SCAN` keys at most, by index from the bisection's
        answer (never walking the keys before it)."""
        gbits = self.chunks.gbits
        p = _prefix(sha, 64 - gbits)
        keys = self.keys
        k = bisect.bisect_left(keys, p << gbits)
        out: list[Place] = []
        for i in range(k, min(k + _HINT_SCAN, len(keys))):
            key = keys[i]
            if key >> gbits != p:
                break
            f, _, c = self.chunks.at(key & ((1 << gbits) - 1))
            if c.sha256 == sha and c.length == length:
                out.append(Place(self.name, f.path, f.file_offset(c)))
                if len(out) == 2:
                    break
        return out


class Plan(Sequence[Need]):
    """:func:`plan_needs`' answer: one :class:`Need` per distinct sha256 (and length: an
    index claiming one sha256 at two lengths gets two needs) of the release, in
    the order of first occurrence, each made only when asked for. Held as arrays (8 bytes
    a chunk, and 8 a chunk of each base's hint), not as objects: a 2 GiB release has some
    26,000 chunks, and objects for each (their places, sources) made the agent's peak RSS
    grow with the bundle (~1 KiB a chunk)."""

    def __init__(self, new: ChunkIndex, incoming: Mapping[str, int],
                 bases: Sequence[Base]) -> None:
        self._chunks = ch = _Chunks(new)
        self._incoming, self._bases = dict(incoming), list(bases)
        self._hints = [None if b.hint is None else _HintLookup(b, b.hint) for b in bases]
        n, gbits = ch.count, ch.gbits
        #: the next place of the same sha256 (in incoming), or _NONE
        self._next = array("I", [_NONE]) * n
        first = bytearray(n)
        keys = ch.keys()
        i = 0
        while i < n:
            j, p = i + 1, keys[i] >> gbits
            while j < n and keys[j] >> gbits == p:
                j += 1
            if j == i + 1:
                first[keys[i] & ((1 << gbits) - 1)] = 1
            else:  # (equal prefixes: grouped by the whole sha256 and the length, in
                # order of number: one sha256 at two lengths - no honest index has it - is
                # two needs, each written only at places of its own length)
                last: dict[tuple[bytes, int], int] = {}
                for key in keys[i:j]:
                    g = key & ((1 << gbits) - 1)
                    c = ch.at(g)[2]
                    same = (c.sha256, c.length)
                    if same in last:
                        self._next[last[same]] = g
                    else:
                        first[g] = 1
                    last[same] = g
            i = j
        del keys
        self._reps = array("I", itertools.compress(range(n), first))
        #: whether first occurrences come in bundle order (a parsed index's always do)
        self.in_order = all(a.bundle_offset < b.bundle_offset for a, b in
                            itertools.pairwise(self.iter_needs(sources=False)))

    def __len__(self) -> int:
        return len(self._reps)

    @overload
    def __getitem__(self, i: int) -> Need: ...
    @overload
    def __getitem__(self, i: slice) -> list[Need]: ...
    def __getitem__(self, i: int | slice) -> Need | list[Need]:
        if isinstance(i, slice):
            return [self._need(self._reps[k], True) for k in range(*i.indices(len(self)))]
        return self._need(self._reps[i], True)

    def __iter__(self) -> Iterator[Need]:
        return self.iter_needs()

    def iter_needs(self, skip: bytes | bytearray | None = None, *,
                   sources: bool = True) -> Iterator[Need]:
        """The needs in order, but those whose position is set in ``skip``; without their
        sources when ``sources`` is false (what is fetched needs none)."""
        for k, g in enumerate(self._reps):
            if skip is None or not skip[k]:
                yield self._need(g, sources)

    def _need(self, g: int, with_sources: bool) -> Need:
        ch = self._chunks
        f, j, c = ch.at(g)
        places: list[Place] = []
        h = g
        while h != _NONE:
            fh, _, ck = ch.at(h)
            places.append(Place("incoming", fh.path, fh.file_offset(ck)))
            h = self._next[h]
        srcs: tuple[Place, ...] = ()
        if with_sources:
            length = c.length
            found = [p for p in places if self._incoming.get(p.path, -1) >= p.offset + length]
            for b, hint in zip(self._bases, self._hints, strict=True):
                cands = hint.places(c.sha256, length) if hint is not None else \
                    [Place(b.name, p.path, p.offset) for p in places]
                found += [p for p in cands if b.sizes.get(p.path, -1) >= p.offset + length]
            srcs = tuple(list(dict.fromkeys(found))[:MAX_SOURCES])
        return Need(c.sha256, c.length, c.offset, f.path, j, tuple(places), srcs)


def plan_needs(new: ChunkIndex, incoming: Mapping[str, int],
               bases: Sequence[Base]) -> Plan:
    """Every distinct chunk of ``new`` with the places it may be held (pure).

    Args:
        new: the verified index of the release.
        incoming: sizes of the plain files in ``staging/incoming``.
        bases: the active and previous slots.

    Returns:
        One :class:`Need` per distinct sha256 and length, in the order of first occurrence (a
        :class:`Plan`: made as they are asked for). Sources, best first: the chunk's own
        place in ``incoming`` (nothing to write), another of its places there, then each
        base: where its hint has that sha256 (its first two places) or, without a hint,
        the same path at the same file offset. At most :data:`MAX_SOURCES`; only places
        inside the file as measured.
    """
    return Plan(new, incoming, bases)


@dataclass(frozen=True, slots=True)
class Range:
    """A byte range of the bundle to fetch, and how many of its bytes are gaps."""

    offset: int
    length: int
    gap_bytes: int = 0


def coalesce(spans: Iterable[tuple[int, int]], max_gap: int = MAX_GAP, *,
             presorted: bool = False) -> list[Range]:
    """Merge ``(offset, length)`` spans of the bundle into ranges (pure): adjacent ones,
    and ones apart by at most ``max_gap`` bytes (counted as gap bytes: fetched, unused).
    ``presorted``: the spans come in order (not sorted first: not held all at once); one
    out of order raises ValueError as an overlap does."""
    out: list[Range] = []
    for off, n in (spans if presorted else sorted(spans)):
        if out:
            last = out[-1]
            end = last.offset + last.length
            if off < end:
                raise ValueError(f"spans overlap at {off}")
            if off - end <= max_gap:
                out[-1] = Range(last.offset, off + n - last.offset,
                                last.gap_bytes + off - end)
                continue
        out.append(Range(off, n))
    return out


def cap_requests(ranges: Sequence[Range], bundle_length: int,
                 unit: int = REQUEST_BYTES) -> list[Range]:
    """``ranges`` merged across their smallest gaps until they take no more requests of at
    most ``unit`` bytes than the whole bundle does (pure).

    The whole bundle takes ``ceil(bundle_length / unit)`` requests (MQTT blocks; HTTPS
    asks for several ranges at once, so fewer there). An index may scatter its changed
    chunks (a fine-tune of every other tensor, or a team key holder's index of legal
    chunk sizes apart by a little more than :data:`MAX_GAP`): one request per chunk would
    then cost more time than the whole bundle (MQTT paces range requests). Merging keeps
    the largest gaps out, so the bytes added are the fewest for that count; the result
    never asks for more bytes than the bundle has (all merged: one range, inside it).
    """
    def cost(n: int) -> int:
        return -(-n // unit)

    limit = max(1, cost(bundle_length))
    total = sum(cost(r.length) for r in ranges)
    if total <= limit:
        return list(ranges)
    k = len(ranges)
    hi = list(range(k))  # at a group's first range: its last
    lo = list(range(k))  # at a group's last range: its first

    def span(a: int, b: int) -> int:
        return ranges[b].offset + ranges[b].length - ranges[a].offset

    gaps = sorted(range(k - 1), key=lambda i: (ranges[i + 1].offset - ranges[i].offset
                                               - ranges[i].length, i))
    for i in gaps:  # (the gap between ranges i and i + 1, smallest first)
        if total <= limit:
            break
        a, b = lo[i], hi[i + 1]
        total += cost(span(a, b)) - cost(span(a, i)) - cost(span(i + 1, b))
        hi[a], lo[b] = b, a
    out: list[Range] = []
    a = 0
    while a < k:
        b = hi[a]
        payload = sum(r.length - r.gap_bytes for r in ranges[a:b + 1])
        out.append(Range(ranges[a].offset, span(a, b), span(a, b) - payload))
        a = b + 1
    return out


@dataclass
class DeltaStats:
    """What a delta install did (for the log, the journal and tests)."""

    held_bytes: int = 0  # chunk bytes taken from the device
    in_place_bytes: int = 0  # of those, already at their place in incoming
    fetched_bytes: int = 0  # chunk bytes fetched (each distinct chunk once)
    gap_bytes: int = 0  # bytes fetched between chunks to save requests
    requests: int = 0  # ranges asked for (a fetcher may put several in one request)
    fetched_chunks: int = 0
    held_chunks: int = 0
    ranges: list[Range] = field(default_factory=list)

    def line(self) -> str:
        return (f"delta: {self.held_bytes} bytes held, {self.fetched_bytes} fetched "
                f"(+{self.gap_bytes} gap bytes) in {self.requests} requests")


# -- observing the disk --------------------------------------------------------------------


def plain_sizes(root: Path) -> dict[str, int]:
    """Size of every plain file (regular, one link) below ``root``, reached without
    following a link; empty if ``root`` is not a plain directory or has more entries than
    a release (:data:`~modelward.trust._fingerprint.MAX_ENTRIES`: not walked further)."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        return _sizes(plain_stats_at(fd, MAX_ENTRIES))
    finally:
        os.close(fd)


def _sizes(stats: Mapping[str, os.stat_result] | None) -> dict[str, int]:
    return {p: st.st_size for p, st in (stats or {}).items()}


def hint_path(state_dir: Path, fingerprint: str) -> Path:
    """Where the hint of the release with ``fingerprint`` is kept."""
    return state_dir / HINTS / f"{fingerprint}.json"


def read_hint(state_dir: Path, fingerprint: str) -> ChunkIndex | None:
    """The stored index of the release with ``fingerprint``, if it is a plain file, at
    most :data:`MAX_INDEX_BYTES`, valid and of that fingerprint; else None (logged).

    Untrusted: it only says where to look; what it locates is hashed before use.
    """
    if not _HEX64(fingerprint):
        return None
    path = hint_path(state_dir, fingerprint)
    try:  # (through an fd of chunks/ walked from state_dir: a swapped chunks/ is refused)
        fd = open_dir(state_dir, HINTS)
    except StagingError:
        return None
    try:
        data = read_at(fd, path.name, MAX_INDEX_BYTES)
        if data is None:
            return None
        ix = parse_index(data, str(path))
    except (OSError, ChunkIndexError) as e:
        logger.info("ignoring the chunk hint %s: %s", path, e)
        return None
    finally:
        os.close(fd)
    if index_fingerprint(ix) != fingerprint:
        logger.info("ignoring the chunk hint %s: it is of another release", path)
        return None
    return ix


def _HEX64(s: str) -> bool:  # noqa: N802
    return len(s) == 64 and not s.strip("0123456789abcdef")


def write_hint(state_dir: Path, ix: ChunkIndex, keep: Iterable[str]) -> None:
    """Store ``ix`` as the hint of its release and remove every other hint than those of
    the fingerprints ``keep`` (the active and previous slots). Best effort: a failure is
    logged (the next delta then looks at the same offsets instead)."""
    fp = index_fingerprint(ix)
    wanted = {fp, *keep}
    try:  # (written, listed and pruned through one fd of chunks/ walked from state_dir)
        d = open_dir(state_dir, HINTS, create=True)
    except StagingError as e:  # (StateDirError: a link or a file at chunks/)
        logger.warning("cannot store the chunk hint of %s: %s", fp, e)
        return
    try:
        write_at(d, f"{fp}.json", ix.iter_bytes(), FILE_MODE)  # (not all at once)
        with os.scandir(d) as it:
            names = [e.name for e in it]
        for name in names:
            if name.removesuffix(".json") not in wanted or not name.endswith(".json"):
                remove_at(d, name)
    except OSError as e:
        logger.warning("cannot store the chunk hint of %s: %s", fp, e)
    finally:
        os.close(d)


# -- assembling ----------------------------------------------------------------------------


class RangeSource(Protocol):
    """What the delta path needs of a transport (``RangeFetcher``)."""

    def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes | memoryview], int]:
        ...


def iter_ranges(fetcher: RangeSource, url: str, ranges: Sequence[tuple[int, int]]
                ) -> Iterator[tuple[int, memoryview | bytes]]:
    """``fetcher.fetch_ranges`` where the transport has it; else each range by
    ``fetch_from`` from its offset, stopped after its length.

    Yields ``(offset, data)`` pieces covering each range exactly, in order.

    Raises:
        DeltaUnavailable: the origin ignored a Range (sent the file from its start).
        tuf.api.exceptions.DownloadError: the transfer failed.
    """
    native: Callable[..., Iterator[tuple[int, memoryview | bytes]]] | None = \
        getattr(fetcher, "fetch_ranges", None)
    if native is not None:
        yield from native(url, ranges)
        return
    for off, n in ranges:
        chunks, start = fetcher.fetch_from(url, off)
        try:
            if start != off:
                raise DeltaUnavailable(f"the origin ignored the range at {off} of {url}")
            pos = off
            for piece in chunks:
                take = min(len(piece), off + n - pos)
                if take > 0:
                    yield pos, memoryview(piece)[:take]
                    pos += take
                if pos >= off + n:
                    break
            if pos < off + n:
                raise tuf_exc.DownloadError(f"{url} ended at {pos}, inside the range "
                                            f"{off}+{n}")
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()


class _Files:
    """The files being assembled in ``incoming``, and the base files read from.

    Everything is opened through directory fds taken once (``incoming``'s and each
    base's, walked from the state directory by :func:`open_root`): a directory of the
    state directory swapped for a link afterwards redirects no write and no read.
    """

    def __init__(self, incoming: Path, incoming_fd: int, roots: Mapping[str, int | None],
                 seal: Callable[[str, bytes], bytes] | None = None) -> None:
        self.incoming, self.incoming_fd, self.roots = incoming, incoming_fd, roots
        #: an encrypted release: a base's plaintext chunk of a file, as the release's
        #: ciphertext of it (its hash is then the index's, if the chunk is unchanged)
        self.seal = seal
        self.out: dict[str, int] = {}
        self.size: dict[str, int] = {}  # each output file's signed size (nothing past it)
        self._in: dict[tuple[str, str], int | None] = {}
        self._lock = threading.Lock()  # (reads run on the hash threads)
        self._synced: dict[str, int] = {}  # where each file's next write-behind window starts
        self._wlock = threading.Lock()  # (writes run on the hash threads too)
        self._behind: tuple[queue.SimpleQueue[tuple[int, int] | None],
                            threading.Thread] | None = None

    def open_out(self, path: str, size: int) -> None:
        """Open (create) the file ``path`` in incoming for writing, ``size`` bytes long."""
        parent = path.rpartition("/")[0]
        if parent:
            make_dirs_at(self.incoming_fd, parent, self.incoming)
        flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK
        what = self.incoming / path
        try:
            fd = open_at(self.incoming_fd, path, flags, what=what)
        except OSError:  # (a link or something else planted since it was measured)
            pfd = open_at(self.incoming_fd, parent, os.O_RDONLY | os.O_DIRECTORY) \
                if parent else os.dup(self.incoming_fd)
            try:
                remove_at(pfd, path.rpartition("/")[2])
            finally:
                os.close(pfd)
            fd = open_at(self.incoming_fd, path, flags | os.O_EXCL, what=what)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.out[path] = fd
        self.size[path] = size

    def read(self, p: Place, n: int) -> bytes | None:
        """``n`` bytes at ``p``, or None (missing, not a plain file, short)."""
        if p.root == "incoming":
            fd: int | None = self.out.get(p.path)
        else:
            key = (p.root, p.path)
            with self._lock:
                if key not in self._in:
                    self._in[key] = _open_plain_at(self.roots[p.root], p.path)
                fd = self._in[key]
        if fd is None:
            return None
        try:
            data = os.pread(fd, n, p.offset)
        except OSError:
            return None
        if len(data) != n:
            return None
        if self.seal is not None and p.root != "incoming":  # (incoming: ciphertext already)
            return self.seal(p.path, data)
        return data

    def write(self, p: Place, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``p`` (in incoming)."""
        self.write_run(p, [data])

    def write_run(self, p: Place, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write ``parts`` one after the other from ``p`` (in incoming): one ``pwritev``
        for chunks that follow each other in a file, not one ``pwrite`` each (a chunk
        ends mid-page: two writes into the same page cache page, a third less CPU for the
        writes of a full install).

        Raises:
            StagingError: the run would end past the file's size as opened (whatever an
                index says, nothing is written there; nothing of the run is written), or
                the disk took no byte of a write (as ENOSPC: never retried forever).
        """
        fd = self.out[p.path]
        views = [v for v in (memoryview(d).cast("B") for d in parts) if v.nbytes]
        pos = p.offset
        end = pos + sum(v.nbytes for v in views)
        size = self.size[p.path]
        if pos < 0 or end > size:
            raise StagingError(f"{self.incoming / p.path}: a write of bytes {pos}-{end - 1} "
                               f"goes past its size ({size} bytes); nothing of it written")
        for i in range(0, len(views), _IOV_MAX):
            group = views[i:i + _IOV_MAX]
            while group:
                w = os.pwritev(fd, group, pos) if len(group) > 1 else \
                    os.pwrite(fd, group[0], pos)
                if w <= 0:  # (no errno, no byte: the disk refused as ENOSPC does)
                    raise StagingError(f"{self.incoming / p.path}: the disk took no byte "
                                       f"of a write at {pos} ({end - pos} bytes left to "
                                       "write)")
                pos += w
                while group and w >= len(group[0]):  # (a short write: the rest again)
                    w -= len(group[0])
                    group.pop(0)
                if group and w:
                    group[0] = group[0][w:]
        # Written behind, as the whole-bundle path does (updater.install._stage.MemberSink):
        # chunks mostly come in file order, so few dirty pages wait for the commit's fsync.
        # By a thread of its own: the wait for the window before (disk I/O) holds up
        # neither the hash threads nor, through them, the receiving one.
        with self._wlock:
            synced = self._synced.get(p.path, 0)
            while pos - synced >= WRITE_BEHIND:
                self._behind_queue().put((fd, synced))
                synced += WRITE_BEHIND
            self._synced[p.path] = synced

    def write_all(self, items: Iterable[tuple[Place, bytes | bytearray | memoryview]]
                  ) -> None:
        """Write each ``(place, data)`` in order: those that follow each other in a file
        in one :meth:`write_run`."""
        run: list[bytes | bytearray | memoryview] = []
        start: Place | None = None
        end = 0
        for p, data in items:
            if start is not None and (p.path != start.path or p.offset != end):
                self.write_run(start, run)
                start = None
            if start is None:
                start, run, end = p, [], p.offset
            run.append(data)
            end += len(data)
        if start is not None:
            self.write_run(start, run)

    def _behind_queue(self) -> queue.SimpleQueue[tuple[int, int] | None]:
        """The write-behind thread's queue (started at the first full window)."""
        if self._behind is None:
            q: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
            t = threading.Thread(target=_behind_loop, args=(q,), name="delta-write-behind",
                                 daemon=True)
            t.start()
            self._behind = (q, t)
        return self._behind[0]

    def drain(self) -> None:
        """Wait for the write-behind thread to finish what it was given (before the fds
        it uses are closed)."""
        if self._behind is not None:
            q, t = self._behind
            q.put(None)
            t.join()
            self._behind = None

    def close(self) -> None:
        self.drain()
        for fd in [*self.out.values(), *self._in.values(), *self.roots.values(),
                   self.incoming_fd]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.out.clear()
        self._in.clear()
        self.roots, self.incoming_fd = {}, None  # type: ignore[assignment]


def _behind_loop(q: queue.SimpleQueue[tuple[int, int] | None]) -> None:
    """Write behind each ``(fd, start)`` window until None (best effort: a failure only
    leaves more dirty pages for the commit's fsync)."""
    while (job := q.get()) is not None:
        with contextlib.suppress(OSError):
            _write_behind(*job)


def _open_plain_at(root: int | None, rel: str) -> int | None:
    if root is None:
        return None
    try:
        fd = open_at(root, rel, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _prepare(staging: Path, incoming: Path, key: str, paths: set[str]) -> Stage:
    """``staging`` with nothing but ``incoming`` (a plain directory with nothing but plain
    files at the release's paths, and the directories on the way)."""
    plain_dir(staging.parent, staging.name, create=True)
    # (listed, cleared and made through the fd of staging walked from state_dir: a
    # staging swapped for a link since the check is refused, nothing touched there)
    sfd = open_root(staging.parent, incoming.parent)
    try:
        for name in os.listdir(sfd):
            if name != incoming.name:
                remove_at(sfd, name)
        try:
            st: os.stat_result | None = os.lstat(incoming.name, dir_fd=sfd)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            remove_at(sfd, incoming.name)
            st = None
        if st is None:
            mkdir_exact_at(sfd, incoming.name)
    finally:
        os.close(sfd)
    stage = Stage(staging, incoming, key)
    stray = stage.drop_strays(paths)  # (links, hard links, FIFOs: removed, not followed)
    if stray:
        logger.info("removed %d file(s) from %s that the release has not: %s", len(stray),
                    incoming, ", ".join(stray[:5]))
    return stage


def assemble(
    ix: ChunkIndex,
    target: TargetFile,
    url: str,
    fetcher: RangeSource,
    staging: Path,
    incoming: Path,
    bases: Sequence[tuple[Base, Path]],
    gate: Gate,
    *,
    max_gap: int = MAX_GAP,
    progress: DeltaStats | None = None,
    content_key: ContentKey | None = None,
) -> tuple[Stage, Manifest, list[FileEntry], DeltaStats]:
    """Assemble the release ``ix`` describes in ``incoming`` (see the module docstring).

    Returns:
        The stage (to discard or forget as the installer does), the manifest, the
        fingerprint entries (the index's: the installer re-derives them from disk) and
        what was held and fetched.

    Raises:
        DeltaChunkError: a fetched chunk is not the signed one (nothing of it written),
            also when the transfer failed after it.
        DeltaUnavailable: the transport cannot fetch ranges of this bundle.
        tuf.api.exceptions.DownloadError: the transfer failed (what is written stays, for
            the next attempt to verify again).
        StagingError: the disk refused.
        StateDirError: a directory on the way is not a plain directory.

    ``progress``, if given, is the stats filled in (what came before a failure, too).
    ``content_key``: the content key of an encrypted release (``updater.install._decrypt``): the
    files are assembled as ciphertext, and the bases' chunks re-encrypted to be found.
    """
    key = target.hashes.get("sha256") or next(iter(target.hashes.values()))
    paths = {MANIFEST, *(f.path for f in ix.files)}
    stage = _prepare(staging, incoming, key, paths)
    state_dir = staging.parent
    inc_fd = open_root(state_dir, incoming)  # (everything below goes through fds)
    roots: dict[str, int | None] = {}
    try:
        held_stats = plain_stats_at(inc_fd, MAX_ENTRIES) or {}
        for b, root in bases:
            try:
                roots[b.name] = open_root(state_dir, root)
            except (OSError, StagingError) as e:  # (swapped since it was measured)
                logger.info("not reading chunks from %s: %s", root, e)
                roots[b.name] = None
    except BaseException:
        for fd in [inc_fd, *roots.values()]:
            if fd is not None:
                os.close(fd)
        raise
    seal = None
    if content_key is not None and ix.manifest.encryption is not None:
        encrypted, ck = set(ix.manifest.encryption.files), content_key

        def seal(path: str, data: bytes) -> bytes:
            return ck.seal(data)[1] if path in encrypted else data
    files = _Files(incoming, inc_fd, roots, seal)
    have = _sizes(held_stats)
    needs = plan_needs(ix, have, [b for b, _ in bases])
    stats = DeltaStats() if progress is None else progress
    # Room: what is held counts by the blocks it has (a sparse file, as an interrupted
    # attempt's ftruncate-d ones, holds no bytes where nothing was written yet).
    held_room = {p: st.st_blocks * 512 for p, st in held_stats.items()}
    need_room = sum(f.size for f in ix.files) + len(ix.manifest_bytes) - sum(
        min(held_room.get(p, 0), s) for p, s in
        [(MANIFEST, len(ix.manifest_bytes)), *((f.path, f.size) for f in ix.files)])
    free = shutil.disk_usage(staging).free
    if free < need_room:
        files.close()
        raise StagingError(f"not enough space for {target.path}: {free} bytes free in "
                           f"{staging}, {need_room} needed")
    try:
        try:
            files.open_out(MANIFEST, len(ix.manifest_bytes))
            files.write(Place("incoming", MANIFEST, 0), ix.manifest_bytes)
            for f in ix.files:
                files.open_out(f.path, f.size)
        except OSError as e:
            raise StagingError(f"cannot write {target.path} into {incoming}: {e}") from e
        pool = ThreadPoolExecutor(hash_workers(), thread_name_prefix="delta-hash")
        try:
            held = _take_held(needs, files, pool, gate, stats)
            todo = _todo(needs, held)
            stats.ranges = cap_requests(coalesce(((n.bundle_offset, n.length) for n in todo()),
                                                 max_gap, presorted=True), ix.bundle_length)
            stats.requests = len(stats.ranges)
            stats.gap_bytes = sum(r.gap_bytes for r in stats.ranges)
            _fetch(todo, stats, files, pool, gate, fetcher, url, target)
        finally:
            # (no hash thread reads a file any more once they are closed, even when the
            # wait is interrupted again)
            late = _finish(lambda: pool.shutdown(wait=True, cancel_futures=True))
        if late is not None:
            raise late
    except OSError as e:
        if isinstance(e, StagingError):
            raise
        raise StagingError(f"cannot assemble {target.path} in {incoming}: {e}") from e
    finally:
        late = _finish(files.drain)  # (the write-behind thread ended before the close)
        files.close()
    if late is not None:
        raise late
    return stage, ix.manifest, entries_of(ix), stats


def _todo(needs: Plan, held: bytearray) -> Callable[[], Iterator[Need]]:
    """The chunks to fetch, in bundle order, made again each time they are gone through
    (not kept: an object each)."""
    if needs.in_order:  # (a parsed index's always are)
        return lambda: needs.iter_needs(held, sources=False)
    kept = sorted(needs.iter_needs(held, sources=False), key=lambda n: n.bundle_offset)
    return kept.__iter__


def _take_held(needs: Sequence[Need], files: _Files, pool: ThreadPoolExecutor, gate: Gate,
               stats: DeltaStats) -> bytearray:
    """Read, hash and write the chunks the device holds; which were found (a byte per
    need, 1 where found: not a set of their sha256s, ~100 bytes each)."""

    def look(n: Need) -> tuple[Place, bytes] | None:
        for src in n.sources:
            data = files.read(src, n.length)
            if data is not None and hashlib.sha256(data).digest() == n.sha256:
                return src, data
        return None

    held = bytearray(len(needs))
    pending: collections.deque[tuple[int, Need, Future[tuple[Place, bytes] | None]]] = \
        collections.deque()
    inflight = since = 0

    def take(limit: int) -> None:
        nonlocal inflight, since
        while pending and inflight > limit:
            k, n, fut = pending.popleft()
            inflight -= n.length
            got = fut.result()
            if got is not None:
                src, data = got
                for d in n.dests:
                    if d != src:
                        files.write(d, data)
                    else:
                        stats.in_place_bytes += n.length
                held[k] = 1
                stats.held_bytes += n.length
                stats.held_chunks += 1
            since += n.length
            if since >= BATCH_BYTES:
                gate.checkpoint("delta: local chunks")
                since = 0

    try:
        for k, n in enumerate(needs):
            if n.sources:  # (read and hashed on the pool while earlier ones are written)
                pending.append((k, n, pool.submit(look, n)))
                inflight += n.length
                take(BATCH_BYTES)
        take(0)
    finally:
        for _, _, fut in pending:
            fut.cancel()
    gate.checkpoint("delta: local chunks")
    return held


def _fetch(todo: Callable[[], Iterator[Need]], stats: DeltaStats, files: _Files,
           pool: ThreadPoolExecutor, gate: Gate, fetcher: RangeSource, url: str,
           target: TargetFile) -> None:
    """Fetch the chunks ``todo``: hash each as it arrives, write it only if it matches.

    The receiving thread only receives and cuts the pieces into chunks; the chunks each
    piece completes are hashed by one task of the pool and, in order and only those whose
    sha256 is the index's, written (``pwrite``) by a writer thread, so that TLS decryption,
    hashing and writing overlap on every core (hashlib and ``pwrite`` release the GIL).
    The bytes written are the very bytes hashed: a chunk is a private copy, or a view of
    a transport's piece that is never changed once handed on (:func:`_stable`).

    At most :data:`FETCH_INFLIGHT` bytes of received chunks wait for their hash at a time.
    When the transport fails or the attempt is interrupted, the chunks received and
    matched so far are written (the next attempt hashes them again in place and fetches
    the rest); a chunk cut short is dropped, never written. After the first failure of
    any kind (a chunk that does not match, a write or a hash task that raises, a wind-down
    interrupted again) nothing after it is written; a chunk that did not match, found
    while winding down, is raised instead of the transfer failure (the origin's lie, not
    the network's). The writer is joined before returning or raising, even when the wait
    is interrupted again (the interrupt is raised after).
    """
    chunks = todo()  # (in bundle order, one at a time: no object kept for each)
    upcoming = next(chunks, None)
    if upcoming is None:
        return
    # One task per piece (not per chunk: a future each cost more than its hash): the
    # chunks that piece completes, and the bytes the task holds alive (their copies, and
    # the buffer under the piece when chunks are taken from it uncopied).
    Batch = list[tuple[Need, bytes | bytearray | memoryview]]
    pending: collections.deque[tuple[Batch, Future[tuple[int, Need | None]], int]] = \
        collections.deque()
    inflight = 0
    stable = _stable(fetcher)
    # Set at the first failure of any kind (a chunk that did not match, a write or a hash
    # task that raised, the wind-down after an interrupt given up): from then on nothing
    # more is written, so that what is on disk stays a prefix of what came and matched.
    stop = threading.Event()

    def hashed(batch: Batch) -> list[bool]:
        return [_digest(data) == n.sha256 for n, data in batch]

    def write(batch: Batch, ok: Future[list[bool]]) -> tuple[int, Need | None]:
        """Write the batch's chunks in order up to the first that did not match (which is
        returned, with how many were written before it): what is on disk stays a prefix
        of what came, so that a resume asks for one range where it can."""
        written = 0
        try:
            if stop.is_set():
                return 0, None  # (after a failure before: nothing more is written)
            bad = None
            for (n, _), good in zip(batch, ok.result(), strict=True):
                if not good:
                    bad = n
                    break
                written += 1
            if stop.is_set():
                return 0, None
            # (the matching chunks before the first that did not, in one pwritev per run
            # of them that follow each other in a file)
            files.write_all((d, data) for n, data in batch[:written] for d in n.dests)
            if bad is not None:
                stop.set()
                return written, bad
        except BaseException:
            stop.set()  # (a write or the hash failed: nothing after it is written)
            raise
        return written, None

    def settle(limit: int) -> None:
        nonlocal inflight
        while pending and inflight > limit:
            batch, fut, cost = pending[0]
            written, bad = fut.result()
            pending.popleft()
            inflight -= cost
            for n, _ in batch[:written]:
                stats.fetched_bytes += n.length
                stats.fetched_chunks += 1
            if bad is not None:
                raise DeltaChunkError(
                    f"{target.path}: chunk {bad.number} of {bad.file} (bytes "
                    f"{bad.bundle_offset}-{bad.bundle_offset + bad.length - 1} of the bundle) "
                    "does not match the signed chunk index (altered on the origin or in "
                    "transit); nothing of it was written", target=target.path,
                    file=bad.file, chunk=bad.number)

    def give_up() -> None:
        """Write nothing more: what waits is cancelled or, running, skips its writes."""
        stop.set()
        for _, fut, _ in pending:
            fut.cancel()
        pending.clear()

    cur: Need | None = None
    buf = bytearray()
    ranges = [(r.offset, r.length) for r in stats.ranges]
    track = _Cover(ranges, url)
    # (hashed on the pool, written in order by one thread; pwrite releases the GIL)
    writer = ThreadPoolExecutor(1, thread_name_prefix="delta-write")
    try:
        for off, piece in iter_ranges(fetcher, url, ranges):
            view = memoryview(piece).cast("B")
            track.piece(off, len(view))  # (in order, inside the ranges, or refused)
            if not stable:
                view = memoryview(bytes(view))  # (a private copy: the transport may reuse)
            batch: Batch = []
            cost, pinned = 0, _held_bytes(view)  # (the piece's buffer: charged once)
            pos, end = off, off + len(view)
            while pos < end:
                if cur is None:
                    if upcoming is not None and pos <= upcoming.bundle_offset < end:
                        pos = upcoming.bundle_offset  # (past a gap)
                        cur, upcoming = upcoming, next(chunks, None)
                        if pos + cur.length <= end:  # (whole in this piece: no copy)
                            cost += pinned
                            pinned = 0
                            batch.append((cur, view[pos - off:pos - off + cur.length]))
                            pos += cur.length
                            cur = None
                            continue
                        buf = bytearray()
                    else:
                        break  # all gap
                take = min(end - pos, cur.length - len(buf))
                buf += view[pos - off:pos - off + take]
                pos += take
                if len(buf) == cur.length:
                    batch.append((cur, buf))
                    cost += cur.length
                    cur = None
            if batch:
                pending.append((batch, writer.submit(write, batch, pool.submit(hashed, batch)),
                                cost))
                inflight += cost
                settle(FETCH_INFLIGHT)
            gate.checkpoint("delta: download")
    except BaseException as e:
        try:
            settle(-1)  # (what came and matched stays, for the next attempt to verify)
        except DeltaChunkError as bad:
            if isinstance(e, Exception) and not isinstance(e, DeltaChunkError):
                # (a chunk that did not match is the origin's lie, whatever came after it:
                # refused as altered, not resumed as a transfer failure)
                raise bad from e
        except BaseException:  # noqa: BLE001, S110 - the first failure is the one raised
            pass
        finally:
            give_up()
        raise
    finally:
        # (every write done or skipped before the files are closed, even when the wait is
        # interrupted again)
        late = _finish(lambda: writer.shutdown(wait=True))
    if late is not None:
        raise late
    settle(-1)
    track.done()
    if cur is not None or upcoming is not None:
        raise RangeAnswerError(f"{url}: the ranges ended before every chunk came")


def _finish(wait: Callable[[], object]) -> BaseException | None:
    """Run ``wait`` (a wait that may be begun again: a join, a shutdown) to its end, even
    when an interrupt (Ctrl-C pressed again, a signal handler's exception) comes while it
    waits; the first such interrupt is returned, for the caller to raise once nothing of
    the pipeline runs any more."""
    late: BaseException | None = None
    while True:
        try:
            wait()
        except Exception:
            raise
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt, SystemExit
            late = late or e
            continue
        return late


def _held_bytes(view: memoryview) -> int:
    """Bytes a view keeps alive: the whole object it is a view of."""
    base = view.obj
    return memoryview(base).nbytes if base is not None else view.nbytes


def _stable(fetcher: RangeSource) -> bool:
    """The transport promises that a piece it yields is never changed afterwards (a fresh
    buffer per piece, never written again), so a chunk may be hashed and written from a
    view of it; else every piece is copied first."""
    return getattr(fetcher, "stable_pieces", False) is True


class _Cover:
    """Checks that a transport's pieces cover the requested ranges exactly, in order."""

    def __init__(self, ranges: Sequence[tuple[int, int]], url: str) -> None:
        self._ranges, self._url = list(ranges), url
        self._i, self._pos = 0, ranges[0][0] if ranges else 0

    def piece(self, off: int, n: int) -> None:
        """Raises RangeAnswerError: the piece is not where the next bytes belong."""
        if n == 0:
            return
        if self._i < len(self._ranges):
            start, length = self._ranges[self._i]
            if self._pos == start + length and self._i + 1 < len(self._ranges):
                self._i += 1
                start, length = self._ranges[self._i]
                self._pos = start
            if off == self._pos and off + n <= start + length:
                self._pos += n
                return
        raise RangeAnswerError(f"{self._url}: the transport sent bytes {off}-"
                                    f"{off + n - 1}, not the next of the ranges asked for")

    def done(self) -> None:
        """Raises RangeAnswerError: a range did not come whole."""
        if self._ranges and (self._i != len(self._ranges) - 1 or
                             self._pos != sum(self._ranges[-1])):
            raise RangeAnswerError(f"{self._url}: the ranges asked for did not all "
                                        "come")


def _digest(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


# -- the installer's step ------------------------------------------------------------------


class IndexSource(Protocol):
    """What the delta path needs of the TUF session."""

    def find_target(self, model: str, path: str) -> tuple[TargetFile, str] | None: ...

    def fetch_target_bytes(self, target: TargetFile, max_bytes: int) -> bytes: ...

    def target_url(self, target: TargetFile) -> str: ...


@dataclass(frozen=True)
class Release:
    """The chosen release, as the installer knows it."""

    target: TargetFile
    name: str
    version: str
    fingerprint: str
    role: str


def verified_index(session: IndexSource, release: Release) -> ChunkIndex:
    """The release's chunk index: found by the same TUF search, signed by the release's own
    role, downloaded within its signed length (at most :data:`MAX_INDEX_BYTES`) and hash,
    parsed bounded, and describing exactly this release.

    Raises:
        DeltaUnavailable: no index is published for it, or another role signed it.
        ChunkIndexError: the index is invalid or describes another bundle or release.
        MetadataError: its bytes are not the signed target (forged or altered).
        DownloadFailedError: the origin did not deliver it.
    """
    from modelward.updater.bundle._chunkindex import index_budget, index_path

    path = index_path(release.target.path)
    found = session.find_target(release.name, path)
    if found is None:
        raise DeltaUnavailable(f"no chunk index {path} is published")
    target, role = found
    if role != release.role:
        raise DeltaUnavailable(f"the chunk index {path} is signed by role {role!r}, the "
                               f"release by {release.role!r}")
    # (bounded by the signed bundle it indexes, before a byte is fetched or parsed: not by
    # the length the index claims for itself)
    budget = min(MAX_INDEX_BYTES, index_budget(release.target.length))
    data = session.fetch_target_bytes(target, budget)
    ix = parse_index(data, path, bundle_length=release.target.length)
    check_usable(ix, release.target, release.fingerprint, release.name, release.version)
    return ix


Fetched = tuple[Stage, Manifest, list[FileEntry]]


class DeltaMemory(Protocol):
    """Where the refusal of a release's delta is remembered (``RejectionStore``: MACed by
    the TPM, per release, for a day)."""

    def delta_refused(self, target: TargetFile) -> object | None: ...

    def note_delta_refused(self, target: TargetFile, model: str, version: str,
                           why: str) -> None: ...

    def delta_stalls(self, target: TargetFile) -> int: ...

    def note_delta_stalls(self, target: TargetFile, model: str, version: str, n: int,
                          why: str) -> None: ...


def fetch_release(
    session: IndexSource,
    fetcher: RangeSource,
    release: Release,
    state_dir: Path,
    staging: Path,
    incoming: Path,
    bases: Sequence[tuple[Base, Path]],
    gate: Gate,
    whole: Callable[[], Fetched],
    *,
    memory: DeltaMemory | None = None,
    unlock: Callable[[Manifest], ContentKey | None] | None = None,
) -> tuple[Stage, Manifest, list[FileEntry], ChunkIndex | None, str]:
    """The release's files in ``incoming``: by delta when its signed index can be used,
    else (or when the delta fails for anything but the transport) by ``whole`` (the
    whole-bundle download). Returns the index used (for the slot's hint) and the delta's
    log line ("" on the whole-bundle path).

    The whole bundle comes directly, without the index, when an earlier attempt's whole
    download of this target can be continued (it was taken because the delta was
    refused; beginning the delta again would remove it), or when ``memory`` says this
    release's delta was refused (its index lied, or the origin refused or garbled its
    ranges): a refused delta is paid for once per release, not at every poll.

    A delta refused for good (an HTTP status that is no transfer failure, an answer that
    breaks the range protocol, a chunk that is not the signed one, an origin that ignores
    ranges) is noted in ``memory`` and the whole bundle is taken at once. A transfer
    failure (no answer, 408, 429, 5xx), of the index or of the ranges, is raised: the next
    attempt resumes the delta.

    Raises:
        What ``whole`` raises; a transfer failure of the index or of the delta
        (DownloadFailedError) and an interruption (what is written stays for a resume).
    """
    from modelward.updater.errors import DownloadFailedError, ModelwardError
    from modelward.updater.install._tuf import convert_tuf_error

    what = f"{release.name} {release.version}"
    if _whole_in_progress(staging, incoming, release.target):
        logger.info("%s: whole bundle (continuing its download)", what)
        return (*whole(), None, "")
    if memory is not None and (hit := memory.delta_refused(release.target)) is not None:
        logger.info("%s: whole bundle (its delta was refused: %s)", what,
                    getattr(hit, "detail", hit))
        return (*whole(), None, "")

    def refused(why: BaseException) -> None:
        logger.warning("%s: delta refused (%s): whole bundle", what, why)
        if memory is not None:
            memory.note_delta_refused(release.target, release.name, release.version,
                                      f"{type(why).__name__}: {why}")

    def given_up(err: BaseException, progressed: bool) -> bool:
        """Count a transfer failure of the delta that brought no chunk (``progressed``
        starts the count again); True at the MAX_DELTA_STALLS-th in a row (without a
        memory, never: the next attempt tries the delta again)."""
        if memory is None:
            return False
        had = memory.delta_stalls(release.target)
        n = 0 if progressed else had + 1
        if n >= MAX_DELTA_STALLS:
            return True
        if n != had:
            memory.note_delta_stalls(release.target, release.name, release.version, n,
                                     f"{err}")
        return False

    try:
        ix = verified_index(session, release)
    except DownloadFailedError as e:
        if not _transient(e.status):
            logger.info("%s: whole bundle (%s)", what, e)
            return (*whole(), None, "")
        if not given_up(e, False):
            raise  # (the index did not come: the next attempt tries the delta again)
        refused(DownloadFailedError(f"{e} ({MAX_DELTA_STALLS} attempts in a row)",
                                    url=e.url, status=e.status))
        return (*whole(), None, "")
    except (DeltaUnavailable, ModelwardError) as e:
        logger.info("%s: whole bundle (%s)", what, e)
        return (*whole(), None, "")
    url = session.target_url(release.target)
    # (an encrypted release: its key before any chunk is fetched; a device it is not for
    # is refused here, and the refusal is the release's, not the delta's)
    key = unlock(ix.manifest) if unlock is not None else None

    progress = DeltaStats()
    try:
        stage, manifest, entries, stats = assemble(ix, release.target, url, fetcher, staging,
                                                   incoming, bases, gate, progress=progress,
                                                   content_key=key)
    except (tuf_exc.DownloadError, tuf_exc.RepositoryError) as e:
        err = convert_tuf_error(e, f"download of {url}")
        if isinstance(err, DownloadFailedError) and _transient(err.status) and \
                not isinstance(e, RangeAnswerError):
            # (each attempt that brought no chunk counts; MAX_DELTA_STALLS in a row, and
            # the ranges are taken to be what fails, not the link: the whole bundle)
            if not given_up(err, progress.fetched_chunks > 0):
                raise err from e  # (the transfer: the next attempt resumes the delta)
            err = DownloadFailedError(f"{err} ({MAX_DELTA_STALLS} attempts of the delta in a "
                                      "row brought no chunk)", url=url, status=err.status)
        refused(err)  # (an answer that breaks the protocol is no network error)
        return (*whole(), ix, "")
    except (DeltaUnavailable, DeltaChunkError) as e:
        refused(e)
        return (*whole(), ix, "")
    if memory is not None and memory.delta_stalls(release.target):
        memory.note_delta_stalls(release.target, release.name, release.version, 0, "")
    line = stats.line()
    logger.info("%s: %s", what, line, extra={"model": release.name,
                                             "version": release.version})
    return stage, manifest, entries, ix, line


def _whole_in_progress(staging: Path, incoming: Path, target: TargetFile) -> bool:
    """An earlier attempt's whole-bundle download of ``target`` can be continued (its
    stage rebuilds some of the bundle; the delta never writes one)."""
    key = target.hashes.get("sha256") or next(iter(target.hashes.values()), "")
    if not key or not is_plain_dir(staging):
        return False
    try:
        return Stage(staging, incoming, key).resumable(target.length) > 0
    except (OSError, ValueError, StagingError):
        return False


def _transient(status: int | None) -> bool:
    """A transfer failure the next attempt may not meet (no answer, 408, 429, 5xx), not
    an origin that cannot serve ranges of this bundle (another 4xx)."""
    return status is None or status in (408, 429) or status >= 500


def slot_bases(state_dir: Path, slots_root: Path,
               refs: Iterable[tuple[str, str, str]]) -> list[tuple[Base, Path]]:
    """The bases a delta may take chunks from: ``(label, slot, fingerprint)`` of the
    active and previous slots that are plain directories, with their hints if usable."""
    out: list[tuple[Base, Path]] = []
    for label, slot, fp in refs:
        root = slots_root / slot
        try:
            fd = open_dir(slots_root.parent, f"{slots_root.name}/{slot}")
        except (OSError, StagingError):
            continue
        try:
            sizes = _sizes(plain_stats_at(fd, MAX_ENTRIES))
        finally:
            os.close(fd)
        out.append((Base(label, sizes, read_hint(state_dir, fp)), root))
    return out
