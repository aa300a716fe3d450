"""Paths under the state directory, used without following a symlink out of it.

Everything the agent keeps lives in ``state_dir`` (the operator's choice, trusted as
configured): ``staging/`` (with ``incoming/``), ``slots/`` (with ``a/``, ``b/``),
``metadata/`` and ``trust/``. Someone who can write the disk may replace any of them by a
symlink to a directory elsewhere, or by a file. The agent then must neither read from nor
write to nor delete in that other place: every directory on the way is checked with
``lstat`` to be a real directory before it is used (:func:`plain_dir`), and removal never
follows a link (:func:`remove_entry`; ``shutil.rmtree`` works through directory fds and
refuses a symlinked top). A symlinked top-level directory is refused with a
:class:`~modelward.updater.errors.StateDirError` naming it; it is not "repaired" by deleting what
it points at.

What remains: a process that writes the state directory *while* the agent works could
swap a directory between the check and its use. Such a process runs as the agent's user
and could do anything the agent can; the checks are against a disk changed while the
device was off or between attempts, and every byte is verified again before it is used
(the slot fingerprint is re-derived from the files before the health check and the
commit).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from modelward.updater.errors import StateDirError

#: The directories directly under ``state_dir`` that the agent reads, writes and deletes in.
TOP_DIRS = ("staging", "slots", "metadata", "trust")

#: Mode of every directory the agent creates on the way to a slot, whatever the umask:
#: the inference app reads ``current/`` through the group (systemd/: ``StateDirectoryMode
#: =0750``, ``UMask=0027``, the app in group ``modelward``). Files get :data:`FILE_MODE`.
DIR_MODE = 0o750
FILE_MODE = 0o640


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISREG(mode):
        return "a file"
    return "not a directory"


def plain_dir(base: Path, rel: str, *, create: bool = False, mode: int = DIR_MODE) -> Path:
    """``base / rel``, checked to be a real directory all the way down from ``base``.

    Each component below ``base`` is opened ``O_NOFOLLOW | O_DIRECTORY`` relative to the
    one before it (:func:`open_dir`): a symlink (wherever it points), a file or anything
    else that is not a directory is refused. Missing components are created when
    ``create`` is set, with mode ``mode`` exactly.

    The path returned is a name: a component swapped after this check is followed by
    whoever uses the name. Reads, writes and deletes use :func:`open_dir` (or
    :func:`open_below` from ``base``) and work through the fd instead.

    Raises:
        StateDirError: a component is not a plain directory (names it), or is missing and
            ``create`` is not set, or cannot be created.
    """
    os.close(open_dir(base, rel, create=create, mode=mode))
    return base.joinpath(*Path(rel).parts)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(base: Path, rel: str, *, create: bool = False, mode: int = DIR_MODE) -> int:
    """An fd of the directory ``base / rel``, walked from an fd of ``base`` itself.

    ``base`` (the state directory, trusted as configured) is opened ``O_DIRECTORY``; each
    component of ``rel`` is opened ``O_NOFOLLOW | O_DIRECTORY`` relative to the fd of the
    one before it, so a component swapped for a symlink at any moment is refused, never
    followed: what is then read, written, listed or deleted through the fd (``dir_fd=``,
    ``os.scandir(fd)``) is inside ``base``. Missing components are created when
    ``create`` is set (``mkdir`` at the parent's fd, mode ``mode`` set through the new
    directory's own fd).

    Raises:
        StateDirError: a component is not a plain directory (names it), or is missing and
            ``create`` is not set, or cannot be created or opened.
    """
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise StateDirError(f"cannot open {base}: {e}", path=str(base)) from e
    path = base
    try:
        for part in Path(rel).parts:
            path = path / part
            nxt = _open_sub(fd, part, path, create, mode)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_sub(fd: int, part: str, path: Path, create: bool, mode: int) -> int:
    """The sub-directory ``part`` of ``fd`` (``path`` for messages), see :func:`open_dir`."""
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise StateDirError(f"{path} is missing", path=str(path)) from None
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise StateDirError(f"cannot open {path}: {e}", path=str(path)) from e
        st = None
        with contextlib.suppress(OSError):
            st = os.lstat(part, dir_fd=fd)
        raise _not_a_dir(path, st.st_mode if st is not None else 0) from e
    try:
        os.mkdir(part, 0o700, dir_fd=fd)
        sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
    except OSError as e:
        raise StateDirError(f"cannot create {path}: {e}", path=str(path)) from e
    try:
        os.fchmod(sub, mode)
    except OSError as e:
        os.close(sub)
        raise StateDirError(f"cannot create {path}: {e}", path=str(path)) from e
    return sub


def _not_a_dir(path: Path, mode: int) -> StateDirError:
    return StateDirError(
        f"{path} is {_kind(mode)}, not a directory of the state directory: "
        "nothing is read, written or deleted through it",
        path=str(path),
        hint=f"remove {path} (the link itself, not what it points at); the agent "
             "creates it again",
    )


def mkdir_exact(path: Path, mode: int = DIR_MODE) -> os.stat_result:
    """Create the directory ``path`` with mode ``mode`` exactly (whatever the umask).

    Made 0700, then widened through its own fd, opened ``O_NOFOLLOW | O_DIRECTORY``: if
    whoever else writes the parent swaps the new directory for a link, that open fails
    and nothing the link points at is chmod-ed (a chmod by name would follow it).

    Returns:
        the new directory's ``fstat``.

    Raises:
        OSError: it exists, cannot be made, or was replaced by something else.
    """
    os.mkdir(path, 0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
        return os.fstat(fd)
    finally:
        os.close(fd)


def mkdir_exact_at(dirfd: int, name: str, mode: int = DIR_MODE) -> os.stat_result:
    """:func:`mkdir_exact` of the entry ``name`` of the directory ``dirfd``: created
    through the fd, so a parent swapped for a link after it was opened redirects nothing.

    Raises:
        OSError: it exists, cannot be made, or was replaced by something else.
    """
    os.mkdir(name, 0o700, dir_fd=dirfd)
    fd = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
    try:
        os.fchmod(fd, mode)
        return os.fstat(fd)
    finally:
        os.close(fd)


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


def clear_for_file(path: Path) -> None:
    """Make room for a file the agent writes at ``path`` (journal, status: no trusted
    state), healing what the disk planted: a directory there (which no rename can
    replace) is removed through directory fds, never following a link inside it. A link,
    file or anything else is left for the rename over it (which replaces it, unfollowed).

    Raises:
        StateDirError: the directory at ``path`` cannot be removed (names it).
    """
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            remove_entry(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateDirError(f"{path} is a directory that cannot be removed: {e}",
                            path=str(path), hint=f"remove {path}") from e


def touch_plain(path: Path) -> None:
    """Set the mtime of the plain file ``path`` to now, creating it (a heartbeat).

    Opened ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat``: a symlink (wherever it
    points), a directory, a fifo or a file with another hard link is removed (the entry,
    never what it names) and a plain file made in its place; nothing outside the
    directory of ``path`` is created or touched.

    Raises:
        StateDirError: ``path`` cannot be made a plain file (names it).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for _ in range(3):
        try:
            fd = os.open(path, flags, FILE_MODE)
        except OSError:  # (a link: ELOOP; a directory: EISDIR; a fifo nobody reads: ENXIO)
            fd = -1
        if fd >= 0:
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    os.utime(fd)
                    return
            except OSError as e:
                raise StateDirError(f"cannot touch {path}: {e}", path=str(path)) from e
            finally:
                os.close(fd)
        try:
            remove_entry(path)
        except OSError as e:
            raise StateDirError(f"cannot replace {path}: {e}", path=str(path)) from e
    raise StateDirError(f"{path} keeps being replaced by something that is no plain file",
                        path=str(path))


def remove_entry(path: Path) -> None:
    """Remove ``path`` (file, link or directory tree) without following any link.

    The caller has checked ``path.parent`` with :func:`plain_dir`. A symlink is unlinked
    (its target is not touched); a directory is removed through directory fds, which do
    not follow the links inside it. A missing ``path`` is fine.

    Raises:
        OSError: the entry cannot be removed.
    """
    fd = os.open(path.parent, _DIR_FLAGS)
    try:
        remove_at(fd, path.name)
    finally:
        os.close(fd)


def remove_below(base: Path, rel: str) -> None:
    """Remove ``base / rel`` (see :func:`remove_entry`) through the fd of its parent,
    walked from ``base`` (:func:`open_dir`): a component swapped for a link is refused.

    Raises:
        StateDirError: a directory on the way is not a plain directory.
        OSError: the entry cannot be removed.
    """
    parent, _, name = rel.rpartition("/")
    fd = open_dir(base, parent)
    try:
        remove_at(fd, name)
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


def open_below(root: Path, rel: str, flags: int, mode: int = FILE_MODE) -> int:
    """Open ``root / rel`` without following a symlink anywhere below ``root``.

    ``root`` itself is opened ``O_NOFOLLOW | O_DIRECTORY``: only its last component is
    guarded, so callers pass the state directory (or a directory fd, :func:`open_at`) as
    ``root`` and the whole path below it as ``rel``. Then each directory of ``rel`` is
    opened relative to the one before it, and the last component with ``flags |
    O_NOFOLLOW``. With ``O_CREAT`` the file gets mode ``mode`` exactly (``fchmod`` of the
    opened fd: a new file whatever the umask, and a kept one whatever the disk set;
    boot-check refuses a slot file with other modes, see ``modelward.trust._fingerprint``).

    Raises:
        OSError: a component is a symlink (``ELOOP``/``ENOTDIR``), missing or unreadable.
    """
    fd = os.open(root, _DIR_FLAGS)
    try:
        return open_at(fd, rel, flags, mode, what=root / rel)
    finally:
        os.close(fd)


def open_at(dirfd: int, rel: str, flags: int, mode: int = FILE_MODE, *,
            what: Path | None = None) -> int:
    """Open ``rel`` below the directory ``dirfd``, each component ``O_NOFOLLOW`` (see
    :func:`open_below`; ``what`` names the file in messages).

    Raises:
        OSError: a component is a symlink (``ELOOP``/``ENOTDIR``), missing or unreadable,
            or (without ``O_DIRECTORY``) what was opened is not a plain file (regular, one
            link): a FIFO there never blocks the open, it is refused.
    """
    parts = Path(rel).parts
    fd = dirfd
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            if fd != dirfd:
                os.close(fd)
            fd = nxt
        if flags & os.O_DIRECTORY:
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
        # (a file: opened O_NONBLOCK, so a FIFO planted there fails (ENXIO) or is refused
        # below instead of blocking the agent until someone opens its other end)
        out = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                      | os.O_CLOEXEC, mode, dir_fd=fd)
        try:
            st = os.fstat(out)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # (chmod no other name)
                raise OSError(f"{what or rel} is not a plain file")
            if flags & os.O_CREAT:
                os.fchmod(out, mode)
            if not flags & os.O_NONBLOCK:
                os.set_blocking(out, True)
        except BaseException:
            os.close(out)
            raise
        return out
    finally:
        if fd != dirfd:
            os.close(fd)


def make_dirs_at(dirfd: int, rel: str, what: Path) -> None:
    """Create the directories ``rel`` below ``dirfd`` (a member's parent), refusing any
    link on the way (``what`` names ``dirfd`` in messages).

    Raises:
        StateDirError: a component exists and is not a plain directory, or cannot be made.
    """
    fd = os.dup(dirfd)
    path = what
    try:
        for part in Path(rel).parts:
            path = path / part
            nxt = _open_sub(fd, part, path, True, DIR_MODE)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


def write_at(dirfd: int, name: str, data: bytes | Iterable[bytes],
             mode: int = FILE_MODE) -> None:
    """Replace the file ``name`` of the directory ``dirfd`` by ``data`` (bytes, or pieces
    written one after the other) atomically: a
    fresh temporary (``O_EXCL | O_NOFOLLOW``) beside it, written, fsync-ed, renamed over
    it within ``dirfd`` and the directory fsync-ed. Nothing is written outside ``dirfd``
    whatever its path names by now.

    Raises:
        OSError: the disk refused.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(16):
        tmp = f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=dirfd)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name for {name}")
    try:
        try:
            os.fchmod(fd, mode)
            for piece in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dirfd)
        raise
    os.fsync(dirfd)


def read_at(dirfd: int, name: str, limit: int) -> bytes | None:
    """The bytes of the plain file (regular, one link, not a link) ``name`` of ``dirfd``,
    at most ``limit``; None when it is missing, not plain or larger.

    Raises:
        OSError: an I/O error.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dirfd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > limit:
            return None
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return data if len(data) <= limit else None


def plain_stats_at(dirfd: int, max_entries: int, max_depth: int = 64
                   ) -> dict[str, os.stat_result] | None:
    """The ``lstat`` of every plain file (regular, one link) below the directory
    ``dirfd``, by path, walked through directory fds (``os.scandir(fd)``, each
    sub-directory opened ``O_NOFOLLOW`` at its parent's fd, at most two fds at a time);
    None when the tree has more than ``max_entries`` entries that are not directories
    (as the fingerprint counts: a slot or stage has at most that many files), or more
    than ``max_entries * max_depth`` directories (each file of a release brings at most
    ``max_depth`` directories on its way), or cannot be read: the walk stops there,
    whatever was planted.
    """
    out: dict[str, os.stat_result] = {}
    seen = 0
    dirs_seen = 0
    pending = ["."]
    try:
        while pending:
            rel = pending.pop()
            fd = dirfd if rel == "." else open_at(dirfd, rel, os.O_RDONLY | os.O_DIRECTORY)
            try:
                with os.scandir(fd) as it:
                    for entry in it:
                        path = entry.name if rel == "." else f"{rel}/{entry.name}"
                        st = os.lstat(entry.name, dir_fd=fd)
                        if stat.S_ISDIR(st.st_mode) and path.count("/") < max_depth:
                            dirs_seen += 1
                            if dirs_seen > max_entries * max_depth:
                                return None
                            pending.append(path)
                            continue
                        seen += 1  # (a directory too deep is an entry, as fingerprinted)
                        if seen > max_entries:
                            return None
                        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                            out[path] = st
            finally:
                if fd != dirfd:
                    os.close(fd)
    except OSError:
        return None
    return out


def open_root(base: Path | None, root: Path) -> int:
    """An fd of the directory ``root``: walked from ``base`` (the state directory)
    component by component when ``root`` lies below it (:func:`open_dir`), else (no
    ``base``, or ``root`` elsewhere) opened ``O_NOFOLLOW | O_DIRECTORY``.

    Raises:
        StateDirError: a directory on the way is not a plain directory.
        OSError: ``root`` cannot be opened.
    """
    if base is not None:
        try:
            rel = root.relative_to(base)
        except ValueError:
            pass
        else:
            return open_dir(base, str(rel))
    return os.open(root, _DIR_FLAGS)


def walk_at(dirfd: int, max_depth: int = 64) -> Iterator[tuple[str, list[str], list[str], int]]:
    """:func:`modelward.trust._fingerprint.walk_tree` from the directory fd ``dirfd``:
    ``(rel, dirs, others, fd)`` top-down, each sub-directory opened ``O_NOFOLLOW`` from
    ``dirfd`` component by component (one swapped for a link is not entered; a
    sub-directory that cannot be opened is skipped). ``fd`` is valid until the next step;
    ``dirs`` may be pruned by the caller.
    """
    stack = ["."]
    while stack:
        rel = stack.pop()
        if rel == ".":
            fd = dirfd
        else:
            try:
                fd = open_at(dirfd, rel, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
        try:
            depth = 0 if rel == "." else rel.count("/") + 1
            dirs: list[str] = []
            others: list[str] = []
            with os.scandir(fd) as it:
                names = sorted(e.name for e in it)
            for name in names:
                try:
                    st = os.lstat(name, dir_fd=fd)
                except FileNotFoundError:
                    continue
                (dirs if stat.S_ISDIR(st.st_mode) and depth < max_depth else others
                 ).append(name)
            yield rel, dirs, others, fd
        finally:
            if fd != dirfd:
                os.close(fd)
        stack.extend(name if rel == "." else f"{rel}/{name}" for name in reversed(dirs))
