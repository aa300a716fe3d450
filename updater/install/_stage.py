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
per-file checks as fresh bytes, and any mismatch discards the stage. What is *kept* on
disk is exactly what was hashed: the resume is planned (:func:`plan_resume`, a pure
function) over what was observed without following a link (plain regular files with one
link, sizes from ``lstat``), only the files the plan reads the prefix from survive
(everything else in ``incoming`` goes), and a kept file is continued only when its index
line agrees with the member's tar header in path, offset *and* size; any other member
is written whole from the verified stream. The installer re-derives the slot fingerprint
from ``incoming`` before the health check and the commit on top of this.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from modelward.trust._bounded import loads_bounded, read_bounded
from modelward.updater.bundle._tarstream import Member, check_member_path
from modelward.updater.errors import StagingError
from modelward.updater.install._statedir import (
    is_plain_dir,
    make_dirs_at,
    mkdir_exact_at,
    open_at,
    open_root,
    plain_dir,
    remove_at,
    remove_entry,
    walk_at,
)

_READ = 1 << 20
#: An index longer than this is read only this far (a bundle has at most 257 members).
MAX_INDEX_BYTES = 1 << 20


@dataclass(frozen=True)
class IndexEntry:
    """Where one member's data lies in the bundle."""

    path: str
    offset: int
    size: int


@dataclass(frozen=True)
class ResumePlan:
    """Where a download continues, and the members whose files the prefix is read from."""

    offset: int
    kept: tuple[IndexEntry, ...]


def plan_resume(skeleton: int | None, entries: Sequence[IndexEntry],
                files: Mapping[str, int], length: int) -> ResumePlan:
    """How many leading bytes of a ``length``-byte bundle the stage can rebuild.

    Args:
        skeleton: size of the skeleton, None when there is none (or it is not a plain
            file).
        entries: the index, in order.
        files: size of every plain file in ``incoming`` (regular, one link, reached
            without a symlink), by path; a file absent here has no bytes.
        length: the signed length.

    Returns:
        The offset, and the index entries below it whose files hold the member bytes
        of the prefix (the member cut short included).
    """
    if skeleton is None:
        return ResumePlan(0, ())
    kept: list[IndexEntry] = []
    end = skeleton
    for e in entries:
        if skeleton < e.offset:  # the header before this member is not all there
            end = skeleton
            break
        kept.append(e)
        have = files.get(e.path, 0)
        if have < e.size:
            end = e.offset + have
            break
        end = max(e.offset + e.size, skeleton)
    offset = min(end, length)
    return ResumePlan(offset, tuple(e for e in kept if e.offset < offset))


class StageWriter:
    """Writes an extraction into ``dest``, plus the skeleton and index when staging.

    With ``resume_at`` > 0 the bytes below that offset are already on disk (they are being
    re-hashed, not re-written): skeleton bytes there are skipped, and so is the data of the
    ``kept`` members (path -> data offset), whose files the prefix was rebuilt from; the
    file that was cut short is continued where it ends. Any other member is written whole.

    With ``base`` (the state directory), ``dest`` and the skeleton's directory are walked
    from ``base`` component by component (``updater.install._statedir.open_root``) and
    every member is created through the fd of ``dest`` taken once: a ``staging`` swapped
    for a link during the download redirects no write.
    """

    def __init__(self, dest: Path, skeleton: Path | None = None, index: Path | None = None,
                 resume_at: int = 0, kept: Mapping[str, IndexEntry] | None = None, *,
                 base: Path | None = None) -> None:
        self.dest = dest
        self.resume_at = resume_at
        self._kept = dict(kept or {})
        self._base = base
        self._dest_fd = -1
        self._skel = -1
        self._index = -1
        if skeleton is not None and index is not None:
            sfd = open_root(base, skeleton.parent)
            try:
                self._skel = open_at(sfd, skeleton.name, os.O_WRONLY | os.O_CREAT, 0o600)
                self._index = open_at(sfd, index.name,
                                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            except BaseException:
                self.close()
                raise
            finally:
                os.close(sfd)

    def skeleton(self, pos: int, data: memoryview) -> None:
        """Write non-member bytes at their bundle offset (those below ``resume_at`` are there)."""
        if self._skel < 0 or pos + len(data) <= self.resume_at:
            return
        cut = max(0, self.resume_at - pos)
        _pwrite_all(self._skel, data[cut:], pos + cut)

    def open(self, member: Member) -> MemberSink:
        """The sink for ``member``'s data (indexed first, so a crash cannot orphan it).

        A file is continued only when the prefix was rebuilt from it: its index entry has
        this member's path, data offset and size. Any other member is written whole from
        the stream (the verified bytes), replacing whatever lies at its path.

        Raises:
            OSError: the file cannot be created (the disk refused, or a link is in the way),
                or the index gave this member another offset or size and the prefix was
                read from its file (the stage is not one this agent wrote).
            StateDirError: a directory on the way is not a plain directory.
        """
        skip = self.resume_at - member.data_offset
        here = IndexEntry(member.name, member.data_offset, member.size)
        kept = self._kept.get(member.name)
        if skip > 0 and kept is not None and kept != here and kept.size > 0:
            # (the prefix reads that file while this thread would replace it)
            raise OSError(
                f"the stage index says {member.name} has {kept.size} bytes at offset "
                f"{kept.offset}, the bundle {member.size} at {member.data_offset}: the "
                "stage was not written by this agent")
        parent, _, name = member.name.rpartition("/")
        if self._dest_fd < 0:
            self._dest_fd = open_root(self._base, self.dest)
        if parent:
            make_dirs_at(self._dest_fd, parent, self.dest)
        what = self.dest / member.name
        if skip <= 0 or kept != here:
            if self._index >= 0:
                os.write(self._index, _index_line(here.path, here.offset, here.size))
            pfd = (open_at(self._dest_fd, parent, os.O_RDONLY | os.O_DIRECTORY) if parent
                   else self._dest_fd)
            try:
                remove_at(pfd, name)  # (through its parent's fd: no link followed)
                fd = open_at(pfd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, what=what)
            finally:
                if pfd != self._dest_fd:
                    os.close(pfd)
            return MemberSink(fd, 0)
        # Resumed inside or after this member: its file holds exactly the bytes rebuilt.
        have = min(skip, member.size)
        fd = open_at(self._dest_fd, member.name, os.O_WRONLY | os.O_CREAT, what=what)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise OSError(f"{self.dest / member.name} is not a plain file any more")
            if st.st_size != have:  # (an unneeded truncate would still touch mtime)
                os.ftruncate(fd, have)
            os.lseek(fd, have, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return MemberSink(fd, have)

    def close(self) -> None:
        """Close the skeleton and index (not fsync'd: a stage is re-verified before use)."""
        for fd in (self._skel, self._index, self._dest_fd):
            if fd >= 0:
                os.close(fd)
        self._skel = self._index = self._dest_fd = -1


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
    """Start writeback of ``[start, start + WRITE_BEHIND)``; wait for the window before.

    The pages stay in the page cache (no ``DONTNEED``): the seal reads every staged byte
    again right after the download, and a dropped window made it a read from the disk
    (seal 0.31-1.16 s against 0.28-0.35 s kept, 256 MiB, benchmarks/delta.py). Dirty
    pages stay bounded to two windows; clean ones are the kernel's to reclaim."""
    if _sync_file_range is None:
        return
    _sync_file_range(fd, start, WRITE_BEHIND, _SYNC_WRITE)
    if start >= WRITE_BEHIND:
        prev = start - WRITE_BEHIND
        _sync_file_range(fd, prev, WRITE_BEHIND, _SYNC_WAIT)


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
    ``staging`` must be a plain directory (checked by every method that touches it);
    ``incoming`` is scratch: anything there that is not a plain directory is removed.
    """

    def __init__(self, staging: Path, incoming: Path, key: str) -> None:
        if not key or "/" in key or key.startswith("."):  # (the installer allows hex only)
            raise ValueError(f"stage key {key!r} is not a plain file name")
        self.staging, self.incoming, self.key = staging, incoming, key
        self.part = staging / f"{key}.part"
        self.done = staging / f"{key}.bundle"
        self.index = staging / f"{key}.index"

    def _check(self) -> None:
        """Refuse a ``staging`` that is a symlink or not a directory (StateDirError)."""
        if os.path.lexists(self.staging):
            plain_dir(self.staging.parent, self.staging.name)

    @property
    def skeleton(self) -> Path:
        """The skeleton file, whichever name it has now."""
        return self.done if os.path.lexists(self.done) else self.part

    def exists(self) -> bool:
        """Whether a download of this target was staged (partly or whole)."""
        return os.path.lexists(self.done) or os.path.lexists(self.part)

    def clear_others(self) -> None:
        """Remove the stages of other targets, and anything else that is not this stage:
        one download is staged at a time. Links are removed, never followed.

        Raises:
            StateDirError: ``staging`` is a symlink or not a directory.
        """
        if not os.path.lexists(self.staging):
            return
        self._check()
        mine = {self.part.name, self.done.name, self.index.name, self.incoming.name}
        for name in os.listdir(self.staging):
            if name not in mine:
                remove_entry(self.staging / name)
        for p in (self.part, self.done, self.index):
            if os.path.lexists(p) and _plain_size(p) is None:
                self.discard()  # a link or a directory where a stage file belongs
                return
        if os.path.lexists(self.incoming) and not is_plain_dir(self.incoming):
            remove_entry(self.incoming)
        if not self.exists():
            self.discard()

    def entries(self) -> list[IndexEntry]:
        """The index, up to its first unreadable line (a torn last line is normal), or its
        first line that repeats a path or goes back."""
        out: list[IndexEntry] = []
        try:  # (a planted huge index is cut, like a torn one)
            raw = read_bounded(self.index, MAX_INDEX_BYTES, cut=True) or b""
        except OSError:  # UnsafeFileError: a link, a FIFO, ...
            return out
        end = 0
        seen: set[str] = set()
        for line in raw.split(b"\n")[:-1]:
            try:
                d = loads_bounded(line, max_bytes=MAX_INDEX_BYTES, max_depth=1,
                                  what=str(self.index))
                e = IndexEntry(check_member_path(str(d["path"])), int(d["offset"]),
                               int(d["size"]))
            except (ValueError, KeyError, TypeError):
                break
            if e.offset < end or e.size < 0 or e.path in seen:
                break
            out.append(e)
            seen.add(e.path)
            end = e.offset + e.size
        return out

    def _plan(self, length: int) -> ResumePlan:
        """Observe the stage without following links, then plan (pure) the resume."""
        self._check()
        return plan_resume(_plain_size(self.skeleton), self.entries(),
                           _plain_files(self.incoming, self.staging.parent), length)

    def resumable(self, length: int) -> int:
        """How many leading bytes of the bundle the stage can rebuild (sizes only, no reads).

        Raises:
            StateDirError: ``staging`` is a symlink or not a directory.
        """
        if not self.exists():
            return 0
        return self._plan(length).offset

    def prefix(self, upto: int) -> Iterator[memoryview]:
        """The bundle's bytes ``[0, upto)`` rebuilt from skeleton and the plain files that
        the resume plan keeps (the same plan :meth:`writer` kept them by).

        Raises:
            OSError: a file shrank, vanished or was replaced by a link since it was
                measured.
        """
        if upto <= 0:
            return
        plan = self._plan(upto)
        if plan.offset != upto:
            raise OSError(f"the stage in {self.staging} changed since it was measured")
        entries = iter(plan.kept)
        pos = 0
        skel = _open_plain(self.skeleton)
        inc = -1
        try:
            inc = open_root(self.staging.parent, self.incoming)
        except BaseException:
            os.close(skel)
            raise
        with open(skel, "rb", buffering=0) as sf, contextlib.closing(_Fd(inc)):
            while pos < upto:
                e = next(entries, None)
                gap_end = min(upto, e.offset if e is not None else upto)
                sf.seek(pos)
                yield from _read_range(sf, gap_end - pos, self.skeleton)
                pos = gap_end
                if e is None or pos >= upto:
                    break
                n = min(e.size, upto - pos)
                if n == 0:  # (its file is not read: it may be rewritten meanwhile)
                    continue
                fd = open_at(inc, e.path, os.O_RDONLY | os.O_NONBLOCK)
                with open(fd, "rb", buffering=0) as f:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                        raise OSError(f"{self.incoming / e.path} is not a plain file any more")
                    yield from _read_range(f, n, self.incoming / e.path)
                pos += n

    def writer(self, resume_at: int) -> StageWriter:
        """Open the stage for writing, continuing at ``resume_at`` (0: start afresh).

        What lies beyond ``resume_at`` goes: the skeleton is cut there, index lines of
        later members are dropped, and everything in ``incoming`` that is not a file the
        prefix is rebuilt from is removed (links are removed, never followed).

        Raises:
            OSError: the stage changed since :meth:`resumable` measured it, or the disk
                refused.
            StateDirError: ``staging`` is a symlink or not a directory.
        """
        if resume_at == 0:
            self.discard()
            plain_dir(self.staging.parent, self.staging.name, create=True)
            # (made through the fd of staging walked from state_dir, whatever the umask:
            # a staging swapped for a link since the check is refused, nothing made there)
            sfd = open_root(self.staging.parent, self.incoming.parent)
            try:
                mkdir_exact_at(sfd, self.incoming.name)
            finally:
                os.close(sfd)
            return StageWriter(self.incoming, self.part, self.index,
                               base=self.staging.parent)
        # (renamed, written and cut through the fd of staging walked from state_dir: a
        # staging swapped for a link meanwhile redirects none of it)
        sfd = open_root(self.staging.parent, self.staging)
        try:
            if os.path.lexists(self.done):
                os.replace(self.done.name, self.part.name, src_dir_fd=sfd, dst_dir_fd=sfd)
            plan = self._plan(resume_at)
            if plan.offset != resume_at:
                raise OSError(f"the stage in {self.staging} changed since it was measured")
            tmp = self.index.with_suffix(".tmp").name
            remove_at(sfd, tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                         dir_fd=sfd)
            with open(fd, "wb") as f:
                f.write(b"".join(_index_line(e.path, e.offset, e.size) for e in plan.kept))
            os.replace(tmp, self.index.name, src_dir_fd=sfd, dst_dir_fd=sfd)
            fd = _open_plain(self.part, os.O_WRONLY)
            try:
                os.ftruncate(fd, resume_at)
            finally:
                os.close(fd)
        finally:
            os.close(sfd)
        _prune(self.incoming, {e.path for e in plan.kept}, self.staging.parent)
        return StageWriter(self.incoming, self.part, self.index, resume_at,
                           {e.path: e for e in plan.kept}, base=self.staging.parent)

    def drop_strays(self, members: set[str]) -> list[str]:
        """After a verified extraction: remove from ``incoming`` what is not a member (a
        file an index listed but the bundle has not). Returns the paths removed."""
        stray = sorted(set(_plain_files(self.incoming, self.staging.parent)) - members)
        _prune(self.incoming, members, self.staging.parent)
        return stray

    def mark_done(self) -> None:
        """The whole bundle verified: rename the skeleton (within the fd of staging)."""
        sfd = open_root(self.staging.parent, self.staging)
        try:
            os.replace(self.part.name, self.done.name, src_dir_fd=sfd, dst_dir_fd=sfd)
        finally:
            os.close(sfd)

    def discard(self) -> None:
        """Remove skeleton, index and the extracted files (links removed, not followed).

        Raises:
            StateDirError: ``staging`` is a symlink or not a directory.
        """
        if not os.path.lexists(self.staging):
            return
        self._check()
        for p in (self.part, self.done, self.index, self.incoming):
            remove_entry(p)
        remove_entry(self.staging / DECRYPTED_MARK)  # (after the files it is about)

    def forget(self) -> None:
        """Remove skeleton and index only (the files moved on into a slot, or are discarded
        by the caller)."""
        self._check()
        for p in (self.part, self.done, self.index):
            remove_entry(p)
        remove_entry(self.staging / DECRYPTED_MARK)

    def mark_decrypted(self) -> None:
        """Note durably, before they are decrypted, that the files in ``incoming`` are
        (about to be) plaintext: an attempt interrupted from then on leaves them to
        :func:`drop_decrypted`, not to whichever later attempt reuses ``incoming``.

        Raises:
            StateDirError: ``staging`` is a symlink or not a directory.
            OSError: the mark cannot be written.
        """
        from modelward.trust._atomic import write_atomic

        self._check()
        write_atomic(self.staging / DECRYPTED_MARK, b"", mode=0o600)


#: In ``staging``: the files in ``incoming`` were decrypted in place (:meth:`Stage.mark_decrypted`).
DECRYPTED_MARK = "decrypted"


def drop_decrypted(staging: Path, incoming: Path) -> bool:
    """Remove ``incoming`` if an interrupted attempt decrypted it there (an encrypted
    release's plaintext, never installed: it is no slot's, and stays on the disk no
    longer than the attempt did). Run after a committed install was rolled forward. True
    if something was removed.

    Raises:
        StateDirError: ``staging`` is a symlink or not a directory.
    """
    mark = staging / DECRYPTED_MARK
    if not os.path.lexists(mark):
        return False
    plain_dir(staging.parent, staging.name)
    remove_entry(incoming)
    remove_entry(mark)  # (last: a crash in between removes the rest next time)
    return True


def _plain_size(path: Path) -> int | None:
    """Size of ``path`` if it is a regular file with one link (not followed), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else None


def _open_plain(path: Path, flags: int = os.O_RDONLY) -> int:
    """Open a stage file that must be a plain regular file (no link followed: neither the
    file nor its directory ``staging``, whose parent is the state directory)."""
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(path.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dfd)
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise OSError(f"{path} is not a plain file")
    return fd


def _plain_files(root: Path, base: Path | None = None) -> dict[str, int]:
    """Size of every plain file below ``root`` reached without following a link, by path
    (walked from ``base``, the state directory, when given: ``open_root``)."""
    out: dict[str, int] = {}
    if not is_plain_dir(root):
        return out
    try:
        top = open_root(base, root)
    except (OSError, StagingError):
        return out
    try:
        for rel, _dirs, others, dirfd in walk_at(top):
            for name in others:
                try:
                    st = os.lstat(name, dir_fd=dirfd)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    out[name if rel == "." else f"{rel}/{name}"] = st.st_size
    finally:
        os.close(top)
    return out


class _Fd:
    """Closes an fd (for ``contextlib.closing``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_range(f: object, n: int, path: Path) -> Iterator[memoryview]:
    read = f.read  # type: ignore[attr-defined]
    while n > 0:
        chunk = read(min(n, _READ))
        if not chunk:
            raise OSError(f"{path} ended early while rebuilding the staged bundle")
        n -= len(chunk)
        yield memoryview(chunk)


def _prune(root: Path, keep: set[str], base: Path | None = None) -> None:
    """Remove from ``root`` everything that is not a kept plain file or a directory on the
    way to one (a resumed extraction creates the rest afresh, O_EXCL). Walked through
    directory fds from ``base`` (the state directory) when given; a link is removed, never
    followed."""
    pfd = open_root(base, root.parent)  # (by fd: a parent swapped since is refused)
    try:
        try:
            is_dir = stat.S_ISDIR(os.lstat(root.name, dir_fd=pfd).st_mode)
        except FileNotFoundError:
            is_dir = False
        if not is_dir:
            remove_at(pfd, root.name)
            mkdir_exact_at(pfd, root.name)
    finally:
        os.close(pfd)
    dirs = {str(p) for k in keep for p in Path(k).parents} - {"."}
    top = open_root(base, root)
    try:
        for rel, subdirs, others, dirfd in walk_at(top):
            for name in others:
                p = name if rel == "." else f"{rel}/{name}"
                try:
                    st = os.lstat(name, dir_fd=dirfd)
                except FileNotFoundError:
                    continue
                if p not in keep or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    remove_at(dirfd, name)
            for name in list(subdirs):
                if (name if rel == "." else f"{rel}/{name}") not in dirs:
                    remove_at(dirfd, name)
                    subdirs.remove(name)
    finally:
        os.close(top)
