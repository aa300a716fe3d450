"""Local media: a ``tuf.ngclient.FetcherInterface`` over a directory (a USB stick, an SD
card) that holds a repository snapshot written by ``modelward repo export``.

The medium is as untrusted as the origin: TUF verifies whatever is read, exactly as over
HTTPS (the same :class:`~modelward.updater.install._tuf.TufSession`, TPM-anchored root,
rollback floor and health check). This module only keeps the reading itself safe from
what a medium can hold: every path component below ``DIR`` is opened relative to its
parent with ``O_NOFOLLOW`` (a symlink there is refused, never followed off the medium;
``DIR`` itself and its parents are the technician's, resolved as given: the medium's
mount point), only regular files are read (the type is looked at before the open, so a
FIFO or a device node is never opened; a file swapped in between is refused),
a read never goes past the length asked for nor past the size the file had when opened (a
file that grows while it is read is cut there), and only plain relative names under the
two base URLs map to files (no ``..``, no absolute path, no hidden or escaped names).

A file that is absent answers as an origin's 404 (``DownloadHTTPError``): ngclient's root
walk stops there, as it does over HTTPS. Everything refused is a
:class:`LocalFileRefusedError` (a ``DownloadError``) naming the file on the medium.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Generator, Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_exc

from modelward.updater.transport._fetcher import RangeFetcher
from modelward.updater.transport._ranges import Piece, Range, RangeAnswerError

#: the base URLs a :class:`~modelward.updater.install._install.Source` of a medium uses
LOCAL_METADATA_URL = "medium:///metadata/"
LOCAL_TARGETS_URL = "medium:///targets/"

READ_CHUNK = 1 << 20  # bytes of one read (and of the largest piece handed on)
MAX_DEPTH = 8  # path components below metadata/ or targets/ (the repository uses 2)
MAX_COMPONENT = 255  # bytes of one file name

#: a name component the repository tools can write: printable, no escapes or separators
_PLAIN = re.compile(r"[A-Za-z0-9_+=@,:~-][A-Za-z0-9._+=@,:~-]*")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class LocalFileRefusedError(tuf_exc.DownloadError):
    """A file on the medium is not read: a symlink, not a regular file, a name that is not
    a plain path under the medium, or larger than what may be read.

    Attributes:
        path: the file on the medium (or the URL, when it maps to no file).
        reason: why, in a few words.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason} (refused: the medium is read as plain files "
                         "only)")
        self.path, self.reason = path, reason


class LocalFetcher(RangeFetcher):
    """Reads ``medium:///metadata/…`` and ``medium:///targets/…`` from ``root``.

    Args:
        root: the medium's directory (``metadata/`` and ``targets/`` below it); it must
            not itself be a symlink.

    Attributes:
        stable_pieces: the pieces :meth:`fetch_ranges` yields are fresh ``bytes``.
    """

    stable_pieces: bool = True

    def __init__(self, root: Path) -> None:
        self.root = root

    # --- mapping ----------------------------------------------------------------------

    def relative(self, url: str) -> list[str]:
        """The path components of ``url`` below the medium's root.

        Raises:
            LocalFileRefusedError: not under the two base URLs, or a component that is
                not a plain name (``..``, ``.``, empty, hidden, escaped, too long).
        """
        if url.startswith(LOCAL_METADATA_URL):
            top, rest = "metadata", url[len(LOCAL_METADATA_URL):]
        elif url.startswith(LOCAL_TARGETS_URL):
            top, rest = "targets", url[len(LOCAL_TARGETS_URL):]
        else:
            raise LocalFileRefusedError(url[:200], "not a path under the medium")
        parts = rest.split("/")
        if len(parts) > MAX_DEPTH:
            raise LocalFileRefusedError(f"{top}/{rest[:200]}", "too deep a path")
        for part in parts:
            if not _PLAIN.fullmatch(part) or len(part.encode()) > MAX_COMPONENT:
                raise LocalFileRefusedError(
                    f"{top}/{rest[:200]!r}", f"the component {part[:60]!r} is not a plain "
                    "file name")
        return [top, *parts]

    def describe(self, parts: list[str]) -> str:
        return str(self.root.joinpath(*parts))

    # --- opening ----------------------------------------------------------------------

    def _open(self, url: str) -> tuple[int, int, str]:
        """A descriptor of the regular file ``url`` maps to, its size when opened and its
        path for messages; never through a symlink.

        Raises:
            tuf.api.exceptions.DownloadHTTPError: 404, the file (or a directory on its
                way) is absent.
            LocalFileRefusedError: a symlink or a non-regular file on the way.
        """
        parts = self.relative(url)
        where = self.describe(parts)
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except OSError as e:
            raise self._refused(str(self.root), e, directory=True) from e
        try:
            for i, part in enumerate(parts[:-1]):
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    raise self._refused(self.describe(parts[:i + 1]), e, directory=True,
                                        dir_fd=fd, name=part) from e
                os.close(fd)
                fd = nfd
            try:  # (a FIFO or a device node is never opened: its driver's open runs)
                before = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISREG(before.st_mode) and not stat.S_ISLNK(before.st_mode):
                    raise LocalFileRefusedError(where, "not a regular file")
                ffd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
            except OSError as e:
                raise self._refused(where, e, dir_fd=fd, name=parts[-1]) from e
        finally:
            os.close(fd)
        try:
            st = os.fstat(ffd)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (
                    before.st_dev, before.st_ino):
                raise LocalFileRefusedError(where, "not a regular file (or swapped while "
                                            "it was opened)")
        except BaseException:
            os.close(ffd)
            raise
        return ffd, st.st_size, where

    def _refused(self, where: str, e: OSError, *, directory: bool = False,
                 dir_fd: int | None = None, name: str = "") -> tuf_exc.DownloadError:
        if e.errno == errno.ENOENT:
            return tuf_exc.DownloadHTTPError(f"{where}: not on the medium", 404)
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            link = False
            with contextlib.suppress(OSError):
                st = (os.stat(name, dir_fd=dir_fd, follow_symlinks=False) if name
                      else os.lstat(where))
                link = stat.S_ISLNK(st.st_mode)
            return LocalFileRefusedError(where, "a symlink (not followed)" if link else
                                         "not a directory" if directory else
                                         "not a regular file")
        return tuf_exc.DownloadError(f"{where}: cannot be read: {e.strerror or e}")

    # --- FetcherInterface -------------------------------------------------------------

    def _fetch(self, url: str) -> Iterator[bytes]:
        fd, size, where = self._open(url)
        return self._stream(fd, size, where, 0, size)

    def _stream(self, fd: int, size: int, where: str, offset: int,
                length: int) -> Iterator[bytes]:
        """``length`` bytes from ``offset`` of ``fd`` (closed at the end), in reads of at
        most :data:`READ_CHUNK`; never past ``size`` (its size when opened)."""
        try:
            pos, end = offset, min(offset + length, size)
            while pos < end:
                try:
                    chunk = os.pread(fd, min(READ_CHUNK, end - pos), pos)
                except OSError as e:
                    raise tuf_exc.DownloadError(f"{where}: read failed at byte {pos}: "
                                                f"{e.strerror or e}") from e
                if not chunk:  # (shrunk meanwhile: the consumer finds it short)
                    return
                self.bytes_received += len(chunk)
                pos += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """Metadata into memory: refused unread when the file is over ``max_length``
        bytes; at most ``max_length`` bytes are read.

        Raises:
            tuf.api.exceptions.DownloadLengthMismatchError: over ``max_length``.
            tuf.api.exceptions.DownloadError: absent (404), refused, unreadable.
        """
        self.last_url = url
        fd, size, where = self._open(url)
        if size > max_length:
            os.close(fd)
            raise tuf_exc.DownloadLengthMismatchError(
                f"{where}: {size} bytes, over the maximum allowed length of {max_length}")
        return b"".join(self._stream(fd, size, where, 0, max_length))

    def _fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes | memoryview], int]:
        fd, size, where = self._open(url)
        return self._stream(fd, size, where, offset, max(0, size - offset)), offset

    def _fetch_ranges(self, url: str, ranges: list[Range]) -> Iterator[Piece]:
        """Each range read where it lies (``pread``), nothing between them.

        Raises:
            RangeAnswerError: the file ends before a range does.
        """
        fd, size, where = self._open(url)
        with contextlib.closing(self._pieces(fd, size, where, ranges)) as pieces:
            yield from pieces

    def _pieces(self, fd: int, size: int, where: str,
                ranges: list[Range]) -> Generator[Piece, None, None]:
        try:
            for off, length in ranges:
                if off + length > size:
                    raise RangeAnswerError(f"{where} is {size} bytes, the range "
                                           f"{off}+{length} ends past it")
                for chunk in self._stream(os.dup(fd), size, where, off, length):
                    yield off, chunk
                    off += len(chunk)
                    length -= len(chunk)
                if length:
                    raise RangeAnswerError(f"{where} ended {length} bytes before the end "
                                           "of a range")
        finally:
            os.close(fd)
