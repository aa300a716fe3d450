"""Atomic file replacement: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file.

    Args:
        path: the file to replace.
        data: its new contents.
        mode: permission bits of the new file.

    Raises:
        OSError: the directory is not writable or the disk is full; ``path`` is unchanged.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
