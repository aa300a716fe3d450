"""The on-disk stage of one bundle download, written once and resumable.

A bundle's bytes are written to disk once: the member files go straight into
``staging/incoming`` as they arrive, and every other byte of the tar (headers, pax
records, padding, the end blocks) goes to the *skeleton* ``staging/<sha256>.part`` at its
own offset, leaving holes where member data lies. ``staging/<sha256>.index`` lists
``(path, data offset, size)`` of every member, each line written before any byte of that
member reaches the disk. Skeleton, index and files rebuild the bundle's first bytes
exactly, so an interrupted download continues from there (HTTPS Range, MQTT offset):
those bytes are hashed again (a sha256 state cannot be saved) but neither fetched nor
written again.

Nothing here is trusted: a rebuilt prefix goes through the same TUF hash and the same
per-file checks as fresh bytes, and any mismatch discards the stage.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from updater._tarstream import Member, check_member_path

_READ = 1 << 20


@dataclass(frozen=True)
class IndexEntry:
    """Where one member's data lies in the bundle."""

    path: str
    offset: int
    size: int


class StageWriter:
    """Writes an extraction into ``dest``, plus the skeleton and index when staging.

    With ``resume_at`` > 0 the bytes below that offset are already on disk (they are being
    re-hashed, not re-written): skeleton bytes there are skipped, and so is the data of the
    ``kept`` members (path -> data offset), whose files the prefix was rebuilt from; the
    file that was cut short is continued where it ends. Any other member is written whole.
    """

    def __init__(self, dest: Path, skeleton: Path | None = None, index: Path | None = None,
                 resume_at: int = 0, kept: dict[str, int] | None = None) -> None:
        self.dest = dest
        self.resume_at = resume_at
        self._kept = kept or {}
        self._skel = -1
        self._index = -1
        if skeleton is not None and index is not None:
            self._skel = os.open(skeleton, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            self._index = os.open(
                index, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)

    def skeleton(self, pos: int, data: memoryview) -> None:
        """Write non-member bytes at their bundle offset (those below ``resume_at`` are there)."""
        if self._skel < 0 or pos + len(data) <= self.resume_at:
            return
        cut = max(0, self.resume_at - pos)
        _pwrite_all(self._skel, data[cut:], pos + cut)

    def open(self, member: Member) -> MemberSink:
        """The sink for ``member``'s data (indexed first, so a crash cannot orphan it).

        Raises:
            OSError: the file cannot be created (it exists, or the disk refused).
        """
        path = self.dest / member.name
        skip = self.resume_at - member.data_offset
        if skip <= 0 or self._kept.get(member.name) != member.data_offset:
            if self._index >= 0:
                os.write(self._index,
                         _index_line(member.name, member.data_offset, member.size))
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            return MemberSink(fd, 0)
        # Resumed inside or after this member: its file holds exactly the bytes rebuilt.
        have = min(skip, member.size)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        if os.fstat(fd).st_size != have:  # (an unneeded truncate would still touch mtime)
            os.ftruncate(fd, have)
        os.lseek(fd, have, os.SEEK_SET)
        return MemberSink(fd, have)

    def close(self) -> None:
        """Close the skeleton and index (not fsync'd: a stage is re-verified before use)."""
        for fd in (self._skel, self._index):
            if fd >= 0:
                os.close(fd)
        self._skel = self._index = -1


class MemberSink:
    """A member file being written; the first ``skip`` bytes it is given are on disk already.

    Written behind: once a window of :data:`WRITE_BEHIND` bytes is full, its writeback
    starts, and the window before it is waited for and dropped from the page cache. A
    download then keeps at most two windows of dirty pages instead of the whole model
    (the device's memory belongs to the inference app), the kernel recycles the same
    pages instead of faulting in new ones (half the system time of a 512 MiB install on
    the benchmark machine), and the fsync before the commit finds little left to do.
    """

    def __init__(self, fd: int, skip: int) -> None:
        self._fd, self._skip = fd, skip
        self._pos = 0  # file offset of the next byte given
        self._synced = skip - skip % WRITE_BEHIND  # where the next window starts

    def write(self, data: memoryview) -> None:
        if self._skip:
            cut = min(self._skip, len(data))
            self._skip -= cut
            self._pos += cut
            data = data[cut:]
        while data:
            n = os.write(self._fd, data)
            data = data[n:]
            self._pos += n
        while self._pos - self._synced >= WRITE_BEHIND:
            _write_behind(self._fd, self._synced)
            self._synced += WRITE_BEHIND

    def close(self) -> None:
        os.close(self._fd)


WRITE_BEHIND = 8 << 20
_SYNC_WRITE, _SYNC_WAIT = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE|WRITE|WAIT_AFTER


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not glibc/Linux: plain buffered writes
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_sync_file_range = _load_sync_file_range()


def _write_behind(fd: int, start: int) -> None:
    """Start writeback of ``[start, start + WRITE_BEHIND)``; finish and drop the window before."""
    if _sync_file_range is None:
        return
    _sync_file_range(fd, start, WRITE_BEHIND, _SYNC_WRITE)
    if start >= WRITE_BEHIND:
        prev = start - WRITE_BEHIND
        if _sync_file_range(fd, prev, WRITE_BEHIND, _SYNC_WAIT) == 0:
            os.posix_fadvise(fd, prev, WRITE_BEHIND, os.POSIX_FADV_DONTNEED)


def _index_line(path: str, offset: int, size: int) -> bytes:
    """One line of the stage index."""
    return json.dumps({"path": path, "offset": offset, "size": size},
                      separators=(",", ":")).encode() + b"\n"


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while data:
        n = os.pwrite(fd, data, pos)
        data, pos = data[n:], pos + n


class Stage:
    """The staged download of the target whose sha256 is ``key``.

    Files: ``<key>.part`` (skeleton while downloading), ``<key>.bundle`` (the same once
    the whole bundle verified), ``<key>.index``, and the member files in ``incoming``.
    """

    def __init__(self, staging: Path, incoming: Path, key: str) -> None:
        self.staging, self.incoming, self.key = staging, incoming, key
        self.part = staging / f"{key}.part"
        self.done = staging / f"{key}.bundle"
        self.index = staging / f"{key}.index"

    @property
    def skeleton(self) -> Path:
        """The skeleton file, whichever name it has now."""
        return self.done if self.done.exists() else self.part

    def exists(self) -> bool:
        """Whether a download of this target was staged (partly or whole)."""
        return self.done.exists() or self.part.exists()

    def clear_others(self) -> None:
        """Remove the stages of other targets: one download is staged at a time."""
        if not self.staging.is_dir():
            return
        mine = {self.part.name, self.done.name, self.index.name, self.incoming.name}
        for p in self.staging.iterdir():
            if p.name not in mine:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        if not self.exists():
            self.index.unlink(missing_ok=True)
            shutil.rmtree(self.incoming, ignore_errors=True)

    def entries(self) -> list[IndexEntry]:
        """The index, up to its first unreadable line (a torn last line is normal)."""
        out: list[IndexEntry] = []
        try:
            raw = self.index.read_bytes()
        except OSError:
            return out
        end = 0
        for line in raw.split(b"\n")[:-1]:
            try:
                d = json.loads(line)
                e = IndexEntry(check_member_path(str(d["path"])), int(d["offset"]),
                               int(d["size"]))
            except (ValueError, KeyError, TypeError):
                break
            if e.offset < end or e.size < 0:
                break
            out.append(e)
            end = e.offset + e.size
        return out

    def resumable(self, length: int) -> int:
        """How many leading bytes of the bundle the stage can rebuild (sizes only, no reads)."""
        if not self.exists():
            return 0
        skel_size = self.skeleton.stat().st_size
        pos = 0
        for e in self.entries():
            if skel_size < e.offset:  # the header before this member is not all there
                return min(skel_size, length)
            have = _file_size(self.incoming / e.path)
            if have < e.size:
                return min(e.offset + have, length)
            pos = e.offset + e.size
        return min(max(pos, skel_size), length)

    def prefix(self, upto: int) -> Iterator[memoryview]:
        """The bundle's bytes ``[0, upto)`` rebuilt from skeleton, index and files.

        Raises:
            OSError: a file shrank or vanished since :meth:`resumable` measured it.
        """
        entries = iter(self.entries())
        pos = 0
        with open(self.skeleton, "rb", buffering=0) as skel:
            while pos < upto:
                e = next(entries, None)
                gap_end = min(upto, e.offset if e is not None else upto)
                skel.seek(pos)
                yield from _read_range(skel, gap_end - pos, self.skeleton)
                pos = gap_end
                if e is None or pos >= upto:
                    break
                n = min(e.size, upto - pos)
                fd = os.open(self.incoming / e.path, os.O_RDONLY | os.O_NOFOLLOW)
                with open(fd, "rb", buffering=0) as f:
                    yield from _read_range(f, n, self.incoming / e.path)
                pos += n

    def writer(self, resume_at: int) -> StageWriter:
        """Open the stage for writing, continuing at ``resume_at`` (0: start afresh).

        What lies beyond ``resume_at`` goes: the skeleton is cut there, index lines of
        later members are dropped, and files of no kept member are removed.
        """
        if resume_at == 0:
            self.discard()
            self.staging.mkdir(parents=True, exist_ok=True)
            self.incoming.mkdir(parents=True)
            return StageWriter(self.incoming, self.part, self.index)
        if self.done.exists():
            os.replace(self.done, self.part)
        kept = [e for e in self.entries() if e.offset < resume_at]
        tmp = self.index.with_suffix(".tmp")
        tmp.write_bytes(b"".join(_index_line(e.path, e.offset, e.size) for e in kept))
        os.replace(tmp, self.index)
        os.truncate(self.part, resume_at)
        _prune(self.incoming, {e.path for e in kept})
        return StageWriter(self.incoming, self.part, self.index, resume_at,
                           {e.path: e.offset for e in kept})

    def mark_done(self) -> None:
        """The whole bundle verified: rename the skeleton."""
        os.replace(self.part, self.done)

    def discard(self) -> None:
        """Remove skeleton, index and the extracted files."""
        for p in (self.part, self.done, self.index):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.incoming, ignore_errors=True)

    def forget(self) -> None:
        """Remove skeleton and index only (the files moved on into a slot, or are discarded
        by the caller)."""
        for p in (self.part, self.done, self.index):
            p.unlink(missing_ok=True)


def _file_size(path: Path) -> int:
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_size if os.path.isfile(path) and not os.path.islink(path) else 0


def _read_range(f: object, n: int, path: Path) -> Iterator[memoryview]:
    read = f.read  # type: ignore[attr-defined]
    while n > 0:
        chunk = read(min(n, _READ))
        if not chunk:
            raise OSError(f"{path} ended early while rebuilding the staged bundle")
        n -= len(chunk)
        yield memoryview(chunk)


def _prune(root: Path, keep: set[str]) -> None:
    """Remove from ``root`` everything that is not a kept regular file or a directory on the
    way to one (a resumed extraction creates the rest afresh, O_EXCL)."""
    root.mkdir(parents=True, exist_ok=True)
    dirs = {str(Path(k).parent) for k in keep} | {"."}
    dirs |= {str(p) for k in keep for p in Path(k).parents}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            p = os.path.normpath(os.path.join(rel, name))
            full = os.path.join(dirpath, name)
            if p not in keep or os.path.islink(full):
                os.unlink(full)
        for name in list(dirnames):
            p = os.path.normpath(os.path.join(rel, name))
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                os.unlink(full)
                dirnames.remove(name)
            elif p not in dirs:
                shutil.rmtree(full)
                dirnames.remove(name)
