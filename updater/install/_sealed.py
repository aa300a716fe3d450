"""Sealed copies of staged files: what is verified is exactly what the health check loads.

A process that can write the disk can rewrite ``staging/incoming`` at any moment, also in
place (same inode), so neither a path nor an fd of the file on disk pins its bytes between
the fingerprint check and their use. :func:`seal_slot` walks the staged tree the way the
fingerprint does (``trust._fingerprint.directory_entries``: every directory and file opened
``O_NOFOLLOW``, checked to be plain, single-link and of a known mode) and, for the files the
health check needs, copies the bytes of that one open file into a memfd, seals it against
any change (``F_SEAL_WRITE``, ``SHRINK``, ``GROW``, ``SEAL``) and hashes the *sealed copy*.
The slot fingerprint computed that way is compared with the signed one; the health child
then receives the sealed fds and never opens a path (``modelward.updater.install._healthchild``).

Bounded: a file is copied only when its size is the one the verified stream gave it (a
file grown or swapped for a sparse giant is never read into memory), and never more than
that many bytes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from modelward.trust._fingerprint import directory_entries, slot_fingerprint
from modelward.updater.errors import StagedFilesChangedError, StagingError

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_CHUNK = 1 << 20

logger = logging.getLogger(__name__)


@dataclass
class SealedFiles:
    """Sealed in-memory copies of some files of a staged tree, and the tree's fingerprint
    as computed from those copies (and from the other files as they were read).

    Attributes:
        root: the tree they were read from (for messages only: never read again).
        fds: relative path -> sealed memfd (read-only by seal; close with :meth:`close`).
        fingerprint: the slot fingerprint of the tree, the copies' bytes included.
    """

    root: Path
    fds: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""

    def close(self) -> None:
        """Close every copy (idempotent)."""
        while self.fds:
            _, fd = self.fds.popitem()
            os.close(fd)

    def __enter__(self) -> SealedFiles:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def new_memfd(name: str) -> int:
    """An empty memfd that can be sealed, for the copy of the staged ``name``.

    Raises:
        StagingError: memfd refused.
    """
    try:
        return os.memfd_create(f"modelward:{name}"[:240], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as e:
        raise StagingError(f"cannot make an in-memory copy of the staged {name}: {e}") from e


def is_sealed(fd: int) -> bool:
    """Whether ``fd`` carries every one of :data:`SEALS`."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
    except OSError:
        return False


def copy_sealed(fd: int, size: int, name: str, into: int | None = None) -> int | None:
    """A sealed memfd holding the first ``size`` bytes of ``fd``, or None if ``fd`` has
    fewer (it shrank meanwhile: never matches).

    Args:
        into: the memfd to fill and seal (empty and unsealed: :func:`new_memfd`; a health
            child started ahead holds it too) instead of a new one. It stays the caller's
            (what is returned is a duplicate); after a failure it is never returned.

    Raises:
        StagingError: no memory for the copy (memfd refused), or ``into`` is not an empty,
            unsealed memfd.
    """
    if into is not None:
        try:
            used = os.fstat(into).st_size != 0 or fcntl.fcntl(into, fcntl.F_GET_SEALS) != 0
        except OSError as e:
            raise StagingError(f"cannot use the in-memory copy of the staged {name}: {e}") \
                from e
        if used:
            raise StagingError(f"the in-memory copy of the staged {name} is not empty")
    mfd = new_memfd(name) if into is None else into
    try:
        done = _copy(fd, mfd, size, name)
        fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, SEALS)
        if done != size or os.fstat(mfd).st_size != size:
            if into is None:
                os.close(mfd)
            return None
    except BaseException:
        if into is None:
            os.close(mfd)
        raise
    return mfd if into is None else os.dup(mfd)


def _copy(src: int, dst: int, size: int, name: str) -> int:
    """Copy up to ``size`` bytes from offset 0 of ``src``; returns how many were copied."""
    done = 0
    use_sendfile = True
    while done < size:
        want = min(_CHUNK, size - done)
        try:
            if use_sendfile:
                try:
                    n = os.sendfile(dst, src, done, want)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    use_sendfile = False
                    continue
            else:
                chunk = os.pread(src, want, done)
                n = len(chunk)
                if n:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(dst, view):]
        except OSError as e:
            if e.errno in (errno.ENOMEM, errno.ENOSPC):
                raise StagingError(f"no memory for the in-memory copy of the staged {name}: "
                                   f"{e}") from e
            return done  # the file on disk failed to read: the copy is short, never matches
        if n == 0:
            return done
        done += n
    return done


def seal_slot(root: Path, names: Collection[str],
              sizes: Mapping[str, int] | None = None,
              into: Mapping[str, int] | None = None) -> SealedFiles:
    """Fingerprint ``root`` with sealed copies of ``names`` (see the module docstring).

    Args:
        root: the staged tree (``staging/incoming``).
        names: relative paths of the files to copy (the health check's inputs).
        sizes: the verified size of each file; a file of another size is not copied (its
            entry never matches). None: any size (callers that verify nothing).
        into: relative path -> an empty memfd to copy that file into (one that a health
            child started ahead holds: ``updater.install._health.PendingCheck``); the
            copies in the result are duplicates of those descriptors.

    Returns:
        The copies and the fingerprint; the caller compares it and closes the copies.

    Raises:
        StagingError: no memory for a copy.
    """
    sealed = SealedFiles(root)
    wanted = set(names)
    copied, copy_s, t0, cpu0 = 0, 0.0, time.perf_counter(), time.process_time()

    def hook(rel: str, fd: int, st: os.stat_result) -> int | None:
        nonlocal copied, copy_s
        if rel not in wanted:
            return fd
        if rel in sealed.fds or (sizes is not None and sizes.get(rel) != st.st_size):
            return None
        t = time.perf_counter()
        mfd = copy_sealed(fd, st.st_size, rel, None if into is None else into.get(rel))
        copy_s += time.perf_counter() - t
        if mfd is not None:
            sealed.fds[rel] = mfd
            copied += st.st_size
        return mfd

    try:
        sealed.fingerprint = slot_fingerprint(directory_entries(root, hook))
    except BaseException:
        sealed.close()
        raise
    logger.debug("sealed copies of %d file(s), %d bytes, of %s in %.3f s (copying %.3f s, "
                 "CPU %.3f s)", len(sealed.fds), copied, root, time.perf_counter() - t0,
                 copy_s, time.process_time() - cpu0)
    return sealed


def seal_verified(root: Path, names: Collection[str], sizes: Mapping[str, int],
                  expected: str, what: str, when: str,
                  into: Mapping[str, int] | None = None) -> SealedFiles:
    """:func:`seal_slot`, refused unless the fingerprint is ``expected`` and every one of
    ``names`` was copied.

    Args:
        what: the release, for messages ("classifier 2.0.0").
        when: for messages ("before its health check").

    Raises:
        StagedFilesChangedError: the tree is not the signed one.
        StagingError: no memory for a copy.
    """
    sealed = seal_slot(root, names, sizes, into)
    if sealed.fingerprint != expected or set(sealed.fds) != set(names):
        sealed.close()
        raise StagedFilesChangedError(
            f"{what}: the files in {root} {when} have fingerprint {sealed.fingerprint}, not "
            f"the signed {expected} (changed on disk after they were verified; discarded)",
            path=str(root), expected=expected, actual=sealed.fingerprint,
        )
    return sealed
