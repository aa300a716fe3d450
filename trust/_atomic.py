"""Atomic file replacement: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, gid: int | None = None,
                 *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file.

    Every step after the directory is opened works through descriptors, never a name
    that could be looked up again: the temporary file is created next to ``path``
    (``O_EXCL | O_NOFOLLOW``, a fresh random name), its mode set with ``fchmod`` on the
    open file, and it is renamed, removed on failure and made durable relative to the
    directory's fd. Whoever else may write the directory (its owner, when root writes
    there) can swap or rename the names in it, but never make this write, chmod, rename or
    unlink land on a file outside it: a link put in place of the temporary file is renamed
    or removed itself, never followed.

    Args:
        path: the file to replace.
        data: its new contents.
        mode: permission bits of the new file (exactly: the umask does not apply).
        gid: the new file's group (``fchown`` before its mode is set), or None: the
            writer's.
        durable: False: no fsync (readers see the old or the new file, but after a power
            loss the file may be old, empty or missing): only for telemetry whose reader
            checks what it reads, on a path where the ~10 ms of two fsyncs count (boot).

    Raises:
        OSError: the directory is not writable, the disk is full, or ``gid`` may not be
            given; ``path`` is unchanged.
    """
    with _temp_beside(path, mode, gid, durable=durable) as f:
        f.write(data)


def copy_atomic(src: Path, dst: Path, mode: int = 0o644) -> None:
    """Replace ``dst`` with a copy of the file ``src``, as :func:`write_atomic` does.

    Raises:
        OSError: ``src`` cannot be read, or as :func:`write_atomic`.
    """
    import shutil  # (with bz2 and lzma, 3 ms: not on the boot path, issue 15)

    with src.open("rb") as s, _temp_beside(dst, mode) as f:
        shutil.copyfileobj(s, f, _COPY_CHUNK)


_COPY_CHUNK = 1 << 20


@contextlib.contextmanager
def _temp_beside(path: Path, mode: int, gid: int | None = None, *,
                 durable: bool = True) -> Iterator[BinaryIO]:
    """A new file next to ``path`` (mode ``mode``), renamed over ``path`` once the body
    has written it and it is on disk; removed (the name, not followed) if the body or the
    rename fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        name, fd = _create_at(dfd, path)
        try:
            with os.fdopen(fd, "wb") as f:
                if gid is not None:
                    os.fchown(f.fileno(), -1, gid)
                os.fchmod(f.fileno(), mode)  # (the open file: a swapped-in link is not followed)
                yield f
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(name, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dfd)
            raise
        if durable:
            os.fsync(dfd)
    finally:
        os.close(dfd)


def _create_at(dfd: int, path: Path) -> tuple[str, int]:
    """A fresh ``.<name>.<random>.tmp`` in the directory ``dfd``, created exclusively
    (a name the disk planted is never opened, whatever it is), mode 0600 until
    :func:`_temp_beside` sets its own."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        name = f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            return name, os.open(name, flags, 0o600, dir_fd=dfd)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def rename_atomic(src: Path, dst: Path) -> None:
    """Rename ``src`` over ``dst`` and make it durable."""
    os.replace(src, dst)
    fsync_dir(dst.parent)


def symlink_atomic(target: str, link: Path) -> None:
    """Point the symlink ``link`` at ``target`` atomically (create + rename over).

    The new link is made under a fresh random name next to ``link`` (never an existing
    entry: whatever the disk planted at a predictable name is neither removed nor in the
    way), then renamed over ``link`` (a link or file there is replaced, never followed).

    Raises:
        OSError: the directory is not writable, or ``link`` is a directory.
    """
    for _ in range(100):
        tmp = link.with_name(f".{link.name}.{secrets.token_hex(8)}.tmp")
        try:
            os.symlink(target, tmp)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name next to {link}")
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(link.parent)
