"""A directory of the state directory and its files, opened never through a symlink.

The audit trail (``audit/``) and the measurement event log (``measure/``) keep their
files here: a disk attacker who plants a symlink (or a file, or a FIFO) in the state
directory gets a typed error naming it, never a write elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

#: ``(message, *, path, hint="")`` -> an exception (AuditLogError, MeasureLogError).
ErrorClass = Callable[..., Exception]


@contextlib.contextmanager
def open_subdir(path: Path, create: bool, what: str, err: ErrorClass) -> Iterator[int]:
    """An ``O_NOFOLLOW`` descriptor of ``path`` (created 0700 when ``create``).

    Raises:
        FileNotFoundError: it does not exist and ``create`` is false.
        err: it is a symlink or not a directory, or cannot be opened.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(path, 0o700)  # (fails on a planted symlink: it exists)
        except OSError as e:
            raise err(f"cannot create the {what} {path}: {e}", path=str(path)) from e
        st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise err(f"{path} is not a directory (a symlink or a file planted there); refusing "
                  "to follow it", path=str(path), hint=f"remove it: the agent creates the {what}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise err(f"cannot open the {what} {path}: {e}", path=str(path)) from e
    try:
        yield fd
    finally:
        os.close(fd)


def open_at(dfd: int, path: Path, name: str, flags: int, err: ErrorClass) -> int:
    """``name`` in the directory ``dfd`` (``path``), a regular file, never a symlink.

    Raises:
        FileNotFoundError: it does not exist and ``flags`` has no ``O_CREAT``.
        err: a symlink, not a regular file, or another OS error.
    """
    try:  # (O_NONBLOCK: a FIFO planted there must not block the open; none on files)
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600,
                     dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.ENOENT and not flags & os.O_CREAT:
            raise
        why = ("a symlink, refused" if e.errno == errno.ELOOP
               else "not a regular file (a FIFO with no reader)" if e.errno == errno.ENXIO
               else str(e))
        raise err(f"cannot open {path / name}: {why}", path=str(path / name)) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise err(f"{path / name} is not a regular file", path=str(path / name))
    return fd


def read_at(dfd: int, path: Path, name: str, limit: int, err: ErrorClass) -> bytes | None:
    """The whole of ``name`` (None: absent), refused over ``limit`` bytes."""
    try:
        fd = open_at(dfd, path, name, os.O_RDONLY, err)
    except FileNotFoundError:
        return None
    try:
        chunks, size = [], 0
        while size <= limit:
            b = os.read(fd, limit + 1 - size)
            if not b:
                break
            chunks.append(b)
            size += len(b)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise err(f"{path / name} is over {limit} bytes", path=str(path / name))
    return data
