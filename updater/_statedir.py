"""Paths under the state directory, used without following a symlink out of it.

Everything the agent keeps lives in ``state_dir`` (the operator's choice, trusted as
configured): ``staging/`` (with ``incoming/``), ``slots/`` (with ``a/``, ``b/``),
``metadata/`` and ``trust/``. Someone who can write the disk may replace any of them by a
symlink to a directory elsewhere, or by a file. The agent then must neither read from nor
write to nor delete in that other place: every directory on the way is checked with
``lstat`` to be a real directory before it is used (:func:`plain_dir`), and removal never
follows a link (:func:`remove_entry`; ``shutil.rmtree`` works through directory fds and
refuses a symlinked top). A symlinked top-level directory is refused with a
:class:`~updater.errors.StateDirError` naming it; it is not "repaired" by deleting what
it points at.

What remains: a process that writes the state directory *while* the agent works could
swap a directory between the check and its use. Such a process runs as the agent's user
and could do anything the agent can; the checks are against a disk changed while the
device was off or between attempts, and every byte is verified again before it is used
(the slot fingerprint is re-derived from the files before the health check and the
commit).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from updater.errors import StateDirError

#: The directories directly under ``state_dir`` that the agent reads, writes and deletes in.
TOP_DIRS = ("staging", "slots", "metadata", "trust")


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISREG(mode):
        return "a file"
    return "not a directory"


def plain_dir(base: Path, rel: str, *, create: bool = False) -> Path:
    """``base / rel``, checked to be a real directory all the way down from ``base``.

    Each component below ``base`` is ``lstat``-ed: a symlink (wherever it points), a file
    or anything else that is not a directory is refused. Missing components are created
    (mode 0700) when ``create`` is set.

    Raises:
        StateDirError: a component is not a plain directory (names it), or is missing and
            ``create`` is not set, or cannot be created.
    """
    path = base
    for part in Path(rel).parts:
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise StateDirError(f"{path} is missing", path=str(path)) from None
            try:
                os.mkdir(path, 0o700)
                st = os.lstat(path)
            except OSError as e:
                raise StateDirError(f"cannot create {path}: {e}", path=str(path)) from e
        except OSError as e:
            raise StateDirError(f"cannot inspect {path}: {e}", path=str(path)) from e
        if not stat.S_ISDIR(st.st_mode):
            raise StateDirError(
                f"{path} is {_kind(st.st_mode)}, not a directory of the state directory: "
                "nothing is read, written or deleted through it",
                path=str(path),
                hint=f"remove {path} (the link itself, not what it points at); the agent "
                     "creates it again",
            )
    return path


def check_state_dirs(state_dir: Path, names: tuple[str, ...] = TOP_DIRS) -> None:
    """Refuse a state directory whose ``staging``, ``slots``, ``metadata`` or ``trust``
    (or those of ``names``) is not a plain directory (a missing one is fine: it is
    created when needed).

    Raises:
        StateDirError: names the first entry at fault.
    """
    for name in names:
        if os.path.lexists(state_dir / name):
            plain_dir(state_dir, name)


def is_plain_dir(path: Path) -> bool:
    """Whether ``path`` itself (not followed) is a directory."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def remove_entry(path: Path) -> None:
    """Remove ``path`` (file, link or directory tree) without following any link.

    The caller has checked ``path.parent`` with :func:`plain_dir`. A symlink is unlinked
    (its target is not touched); a directory is removed through directory fds, which do
    not follow the links inside it. A missing ``path`` is fine.

    Raises:
        OSError: the entry cannot be removed.
    """
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_at(fd, path.name)
    finally:
        os.close(fd)


def remove_at(dirfd: int, name: str) -> None:
    """Remove the entry ``name`` of the directory ``dirfd`` (see :func:`remove_entry`).

    A tree is removed without recursion and with two fds at a time, however deep it is
    (a planted chain of thousands of directories must not exhaust the stack or the fds):
    each sub-directory found is first moved up into the tree's top, then emptied.

    Raises:
        OSError: the entry cannot be removed.
    """
    try:
        st = os.lstat(name, dir_fd=dirfd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dirfd)
        return
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    top = os.open(name, flags, dir_fd=dirfd)
    try:
        pending = ["."]
        moved = 0
        while pending:
            cur = pending.pop()
            fd = top if cur == "." else os.open(cur, flags, dir_fd=top)
            try:
                for entry in os.listdir(fd):
                    est = os.lstat(entry, dir_fd=fd)
                    if stat.S_ISDIR(est.st_mode):
                        moved += 1
                        flat = f".rm-{moved}"
                        while _exists_at(top, flat):
                            moved += 1
                            flat = f".rm-{moved}"
                        os.rename(entry, flat, src_dir_fd=fd, dst_dir_fd=top)
                        pending.append(flat)
                    else:
                        os.unlink(entry, dir_fd=fd)
            finally:
                if fd != top:
                    os.close(fd)
        for entry in os.listdir(top):  # only the emptied, flattened directories are left
            os.rmdir(entry, dir_fd=top)
    finally:
        os.close(top)
    os.rmdir(name, dir_fd=dirfd)


def _exists_at(dirfd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dirfd)
    except FileNotFoundError:
        return False
    return True


def make_dirs(base: Path, rel: str) -> Path:
    """Create ``base / rel`` (a member's parent inside ``incoming``) refusing any link.

    Raises:
        StateDirError: a component exists and is not a plain directory.
    """
    return plain_dir(base, rel, create=True)


def open_below(root: Path, rel: str, flags: int, mode: int = 0o600) -> int:
    """Open ``root / rel`` without following a symlink anywhere below ``root``.

    ``root`` itself is opened ``O_NOFOLLOW | O_DIRECTORY``, then each directory of ``rel``
    relative to the one before it, then the last component with ``flags | O_NOFOLLOW``.

    Raises:
        OSError: a component is a symlink (``ELOOP``/``ENOTDIR``), missing or unreadable.
    """
    parts = Path(rel).parts
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW, mode, dir_fd=fd)
    finally:
        os.close(fd)
