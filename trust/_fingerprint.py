"""The modelward fingerprint (design.md "Fingerprint"), defined once for both sides.

A file's fingerprint is the RFC 6962 Merkle tree hash over fixed 4 MiB leaves
(``leaf = sha256(0x00 || chunk)``, ``node = sha256(0x01 || left || right)``); an
empty file has ``sha256(b"")``. A slot's fingerprint is the sha256 of the canonical
JSON list of ``[path, size, merkle_root]`` of its files, sorted by path.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from modelward.trust._plain import Frozen

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

LEAF_SIZE = 4 * 1024 * 1024  # bytes per Merkle leaf; fixed by the format


def leaf_hash(chunk: bytes | memoryview) -> bytes:
    """Hash one leaf with RFC 6962 domain separation (no copy of the chunk)."""
    h = hashlib.sha256(b"\x00")
    h.update(chunk)
    return h.digest()


def tree_hash(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash (MTH) of already hashed leaves."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = 1 << ((n - 1).bit_length() - 1)  # largest power of two below n
    return hashlib.sha256(b"\x01" + tree_hash(leaves[:k]) + tree_hash(leaves[k:])).digest()


class MerkleHasher:
    """Incremental Merkle root over a stream of any chunk sizes.

    Nothing is buffered: the current leaf is a running sha256, so memory is 32 bytes
    per 4 MiB seen and no byte is copied.
    """

    def __init__(self) -> None:
        self._leaf = hashlib.sha256(b"\x00")
        self._in_leaf = 0
        self._leaves: list[bytes] = []
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        """Add ``data`` to the stream."""
        view = memoryview(data).cast("B")
        self.size += len(view)
        while view:
            take = min(len(view), LEAF_SIZE - self._in_leaf)
            self._leaf.update(view[:take])
            self._in_leaf += take
            view = view[take:]
            if self._in_leaf == LEAF_SIZE:
                self._leaves.append(self._leaf.digest())
                self._leaf, self._in_leaf = hashlib.sha256(b"\x00"), 0

    def hexdigest(self) -> str:
        """Merkle root of everything seen so far, as hex."""
        leaves = list(self._leaves)
        if self._in_leaf:
            leaves.append(self._leaf.digest())
        return tree_hash(leaves).hex()


def hash_workers() -> int:
    """Threads that hash leaves: one per core this process may run on (hashlib releases
    the GIL while it hashes, so each of them keeps a core busy)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # (not Linux)
        return os.cpu_count() or 1


class FileChangedError(OSError):
    """A file's size changed while its leaves were read."""


#: Bytes read at a time into a hashing task's buffer: small enough to stay in the core's
#: cache between the copy from the page cache and the hash (cheaper than hashing straight
#: from a 4 MiB mapping: less CPU, no page faults, no TLB shootdowns at unmap).
READ_SIZE = 256 * 1024


def _read_leaf(fd: int, offset: int, length: int, buf: bytearray) -> bytes:
    """Hash the leaf of ``length`` bytes at ``offset`` of ``fd``, read with ``preadv``
    into ``buf`` piece by piece (so a file truncated meanwhile is a short read, never a
    fault as a mapping of it would be).

    Raises:
        FileChangedError: the file ends before ``offset + length``.
        OSError: it cannot be read.
    """
    h = hashlib.sha256(b"\x00")
    end = offset + length
    with memoryview(buf) as view:
        while offset < end:
            n = os.preadv(fd, [view[:min(len(view), end - offset)]], offset)
            if n == 0:
                raise FileChangedError(f"file ended at {offset} bytes, before {end}")
            h.update(view[:n])
            offset += n
    return h.digest()


def file_merkle_root(path: Path, pool: ThreadPoolExecutor | None = None) -> tuple[int, str]:
    """Size and Merkle root of a file, hashing leaves on a thread pool.

    Raises:
        OSError: the file cannot be read, or shrank while it was read.
    """
    with open(path, "rb") as f:
        return fd_merkle_root(f.fileno(), pool)


def fd_merkle_root(fd: int, pool: ThreadPoolExecutor | None = None,
                   max_bytes: int | None = None) -> tuple[int, str]:
    """:func:`file_merkle_root` of the open file ``fd`` (its size as of now).

    A file of one leaf is hashed in this thread. A longer one is hashed by
    :func:`hash_workers` tasks on ``pool`` (or on a pool of its own): task ``k`` reads
    leaves ``k, k + n, k + 2n, ...`` with ``preadv`` into one buffer of its own
    (:data:`READ_SIZE`) and hashes them without the GIL, so every core hashes, and the
    memory is one buffer per task whatever the file's size. It returns only when no task
    touches ``fd`` any more, also after an error (one that cannot start a thread too).

    Raises:
        OSError: the file cannot be read, or changed size while it was read
            (:class:`FileChangedError`), is larger than ``max_bytes``, or no hashing
            thread could be started.
    """
    size = os.fstat(fd).st_size
    if max_bytes is not None and size > max_bytes:  # (grew since the caller checked)
        raise FileChangedError(f"file of {size} bytes, more than {max_bytes}")
    if size <= LEAF_SIZE:
        leaves = [_read_leaf(fd, 0, size, bytearray(min(size, READ_SIZE)))] if size else []
    else:
        leaves = _striped_leaves(fd, size, pool)
    if os.fstat(fd).st_size != size:  # (grew meanwhile: what was hashed is not the file)
        raise FileChangedError(f"file changed size from {size} bytes while it was hashed")
    return size, tree_hash(leaves).hex()


def _striped_leaves(fd: int, size: int, pool: ThreadPoolExecutor | None) -> list[bytes]:
    from concurrent.futures import ThreadPoolExecutor, wait

    count = -(-size // LEAF_SIZE)
    leaves: list[bytes] = [b""] * count
    tasks = min(hash_workers(), count)
    failed = threading.Event()

    def hash_stripe(first: int) -> None:
        buf = bytearray(READ_SIZE)
        for i in range(first, count, tasks):
            if failed.is_set():
                return
            offset = i * LEAF_SIZE
            try:
                leaves[i] = _read_leaf(fd, offset, min(LEAF_SIZE, size - offset), buf)
            except BaseException:
                failed.set()
                raise

    ex = pool or ThreadPoolExecutor(max_workers=tasks, thread_name_prefix="merkle")
    futures = []
    try:
        try:
            for k in range(tasks):
                futures.append(ex.submit(hash_stripe, k))
        except RuntimeError as e:  # (no thread could be started: interpreter or OS limit)
            failed.set()
            raise OSError(f"cannot start a hashing thread: {e}") from e
        finally:
            wait(futures)  # (no task touches fd once this returns, also after an error)
        for fut in futures:
            fut.result()  # (the first error, if any)
    finally:
        if pool is None:
            ex.shutdown()
    return leaves


class FileEntry(Frozen):
    """One file of a slot or bundle: relative path, size in bytes, Merkle root (hex)."""

    __slots__ = ("path", "size", "merkle_root")
    path: str
    size: int
    merkle_root: str

    def __init__(self, path: str, size: int, merkle_root: str) -> None:
        self._set(path, size, merkle_root)


def slot_fingerprint(entries: Iterable[FileEntry]) -> str:
    """The slot fingerprint: sha256 of the canonical JSON list of its files."""
    rows = sorted([e.path, e.size, e.merkle_root] for e in entries)
    canonical = json.dumps(rows, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


#: Directories deeper than this below a slot are not walked (and never match): no bundle
#: needs them, and a planted chain of thousands would otherwise exhaust the stack.
MAX_DEPTH = 64

#: A bundle has at most this many members (its manifest and ``updater.bundle._bundle.MAX_FILES``
#: files): a tree with more entries never matches, and is not walked past one more.
MAX_ENTRIES = 257

#: The modes a slot's files and directories may have: at most ``0644`` / ``2755`` (no
#: write for group or others, no set-id, sticky or executable file bits) and at least
#: readable (and, for a directory, searchable) by the owner and the group, through which
#: the inference app reads ``current/`` (systemd/). The agent creates them ``0640`` /
#: ``0750`` exactly (``updater.install._statedir``); anything else was set by someone else: a
#: world-writable model could be rewritten after boot-check by any local user, a set-id
#: file is no model, and a file the group cannot read is one the app cannot load.
FILE_MODES = (0o440, 0o644)  # (required bits, allowed bits)
DIR_MODES = (0o750, 0o2755)  # (set-gid: made so under a set-gid state_dir, harmless)


def mode_ok(mode: int, *, top: bool = False) -> bool:
    """Whether a slot's file or directory with ``st_mode`` ``mode`` has acceptable bits
    (for the slot directory itself, ``top``: only that nobody else may write it)."""
    need, allowed = DIR_MODES if stat.S_ISDIR(mode) else FILE_MODES
    bits = stat.S_IMODE(mode)
    return bits & ~allowed == 0 and (top or bits & need == need)


def walk_tree(root: Path, max_depth: int = MAX_DEPTH,
              on_error: Callable[[str], None] | None = None,
              max_names: int | None = None,
              ) -> Iterator[tuple[str, list[str], list[str], int]]:
    """Walk ``root`` without following any link and without recursion.

    Yields ``(rel, dirs, others, dirfd)`` top-down for every directory: ``rel`` relative
    to ``root`` (``"."`` first), the names of its real sub-directories (the caller may
    remove names to skip them, as with ``os.walk``), the names of everything else (a
    symlink to a directory included, and a directory deeper than ``max_depth``), and an
    fd of the directory valid until the next step. Each directory is opened component by
    component from ``root`` with ``O_NOFOLLOW``, so one swapped for a link is not entered.
    A sub-directory that cannot be opened (vanished, swapped for a link, or not readable
    by this uid) is not yielded; ``on_error(rel)`` is called for it. With ``max_names``,
    at most that many names of one directory are read (which ones is unspecified).

    Raises:
        OSError: ``root`` is not a directory that can be opened.
    """
    stack = ["."]
    while stack:
        rel = stack.pop()
        try:
            fd = _open_dir(root, rel)
        except OSError:
            if rel == ".":
                raise
            if on_error is not None:
                on_error(rel)
            continue
        try:
            depth = 0 if rel == "." else rel.count("/") + 1
            dirs: list[str] = []
            others: list[str] = []
            with os.scandir(fd) as it:
                names = sorted(itertools.islice((e.name for e in it), max_names))
            for name in names:
                try:
                    st = os.lstat(name, dir_fd=fd)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode) and depth < max_depth:
                    dirs.append(name)
                else:
                    others.append(name)
            yield rel, dirs, others, fd
        finally:
            os.close(fd)
        stack.extend(name if rel == "." else f"{rel}/{name}" for name in reversed(dirs))


def _open_dir(root: Path, rel: str) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    fd = os.open(root, flags)
    if rel == ".":
        return fd
    try:
        for part in rel.split("/"):
            nxt = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


#: A file larger than this never matches and is not read: no bundle holds one (a bundle is
#: at most ``updater._config.Config.max_bundle_bytes``, 8 GiB), and hashing a planted sparse
#: terabyte would hold the boot check for hours.
MAX_FILE_BYTES = 8 << 30

#: The files of one slot together are not read past this many bytes: a bundle holds them
#: all (at most ``Config.max_bundle_bytes``, 8 GiB), so a slot with more never matches,
#: and a file that would take the total over it is not read (:data:`MAX_ENTRIES` planted
#: sparse files of :data:`MAX_FILE_BYTES` each would otherwise hold the boot check for
#: hours).
MAX_SLOT_BYTES = MAX_FILE_BYTES


#: ``directory_entries``'s ``hook``: given a plain file's path, its open fd and ``fstat``,
#: the fd whose bytes are to be hashed instead (a sealed copy), or None (never matches).
FileHook = Callable[[str, int, os.stat_result], "int | None"]


def directory_entries(root: Path, hook: FileHook | None = None) -> list[FileEntry]:
    """Entries for every file below ``root``; anything but plain files is an entry too.

    Nothing is followed: the tree is walked through directory fds (``os.fwalk``) and each
    file is opened ``O_NOFOLLOW`` and checked with ``fstat`` to be the regular file that
    was listed. A symlink, device, fifo, socket or a regular file with another hard link
    (whose bytes could change through that other name after they were checked) gets a
    size of -1 and an empty root, so that it can never match a fingerprint computed from
    a bundle (which has only plain files). A ``root`` that is itself a symlink or not a
    directory gives the single entry ``[".", -1, ""]``; a missing one, no entries. A
    directory deeper than :data:`MAX_DEPTH` is an entry of its own, never walked.

    Also never matching (a bundle holds only plain files, created with known modes): a
    sub-directory that cannot be opened (its files would be hidden from the fingerprint
    while another uid reads them), an empty sub-directory, a file or directory (``root``
    included: writable only by its owner) whose mode fails :func:`mode_ok`, and a tree of more than
    :data:`MAX_ENTRIES` entries, whose walk stops there (one more, never-matching entry
    ends the list: planted millions cost no time or memory), and a file of more than
    :data:`MAX_FILE_BYTES` (not read: a planted sparse terabyte costs no time either), and
    a file that would take the slot's total past :data:`MAX_SLOT_BYTES` (not read either:
    the bytes read for one slot are bounded, however many planted files it holds).

    With ``hook``, each plain file's entry is computed from the fd ``hook`` returns for it
    (``updater.install._sealed`` hands back a sealed in-memory copy of the bytes, so what was hashed
    is what is used); an exception from ``hook`` that is not an ``OSError`` propagates.
    """
    try:
        top = os.lstat(root)
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(top.st_mode):
        return [FileEntry(".", -1, "")]
    entries: list[FileEntry] = []
    if not mode_ok(top.st_mode, top=True):
        entries.append(FileEntry(".", -1, ""))

    def unopenable(rel: str) -> None:
        entries.append(FileEntry(rel, -1, ""))

    pool = _Pool()
    budget = [MAX_SLOT_BYTES]  # (bytes the rest of the slot may still hold)
    try:
        for rel, dirs, others, dirfd in walk_tree(root, on_error=unopenable,
                                                  max_names=MAX_ENTRIES + 1):
            if len(entries) > MAX_ENTRIES:
                entries.append(FileEntry(f"{rel}/", -1, ""))
                return entries  # (the walk stops: never a match)
            if rel != ".":
                try:
                    st = os.fstat(dirfd)
                except OSError:
                    st = None
                if st is None or not mode_ok(st.st_mode) or not (dirs or others):
                    entries.append(FileEntry(rel, -1, ""))
            for name in others:
                if len(entries) >= MAX_ENTRIES:
                    entries.append(FileEntry(f"{rel}/{name}", -1, ""))
                    return entries  # (the walk stops: never a match)
                path = name if rel == "." else f"{rel}/{name}"
                entries.append(_plain_entry(path, name, dirfd, pool, hook, budget))
    finally:
        pool.close()
    return entries


class _Pool:
    """The hashing threads of :func:`directory_entries`, started for the first file of more
    than one leaf (a slot of small files, as at most boots of small models, needs none)."""

    def __init__(self) -> None:
        self._ex: ThreadPoolExecutor | None = None

    def get(self) -> ThreadPoolExecutor:
        if self._ex is None:
            from concurrent.futures import ThreadPoolExecutor

            self._ex = ThreadPoolExecutor(max_workers=hash_workers(),
                                          thread_name_prefix="merkle")
        return self._ex

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown()


def _plain_entry(rel: str, name: str, dirfd: int, pool: _Pool,
                 hook: FileHook | None = None, budget: list[int] | None = None) -> FileEntry:
    """The entry of ``name`` in ``dirfd`` (anything but a plain file: size -1; so is a
    file larger than what is left of ``budget``, which is reduced by the size of each file
    read)."""
    bad = FileEntry(rel, -1, "")
    try:
        st = os.lstat(name, dir_fd=dirfd)
    except OSError:
        return bad
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or not mode_ok(st.st_mode) \
            or st.st_size > MAX_FILE_BYTES:
        return bad
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
    except OSError:
        return bad
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or now.st_nlink != 1 or not mode_ok(now.st_mode) \
                or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) \
                or now.st_size > MAX_FILE_BYTES:
            return bad
        if budget is not None:
            if now.st_size > budget[0]:
                return bad  # (the slot holds more than any bundle: not read)
            budget[0] -= now.st_size
        hashed = fd if hook is None else hook(rel, fd, now)
        if hashed is None:
            return bad
        size, root_hex = fd_merkle_root(hashed, pool.get() if now.st_size > LEAF_SIZE else None,
                                        MAX_FILE_BYTES)
    except OSError:
        return bad
    finally:
        os.close(fd)
    return FileEntry(rel, size, root_hex)
