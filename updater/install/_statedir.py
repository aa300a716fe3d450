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

import os
import stat
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

    Each component below ``base`` is ``lstat``-ed: a symlink (wherever it points), a file
    or anything else that is not a directory is refused. Missing components are created
    when ``create`` is set, with mode ``mode`` exactly (set through the new directory's
    fd, so neither the umask nor a swapped-in link changes it).

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
                st = mkdir_exact(path, mode)
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


def open_below(root: Path, rel: str, flags: int, mode: int = FILE_MODE) -> int:
    """Open ``root / rel`` without following a symlink anywhere below ``root``.

    ``root`` itself is opened ``O_NOFOLLOW | O_DIRECTORY``, then each directory of ``rel``
    relative to the one before it, then the last component with ``flags | O_NOFOLLOW``.
    With ``O_CREAT`` the file gets mode ``mode`` exactly (``fchmod`` of the opened fd: a
    new file whatever the umask, and a kept one whatever the disk set; boot-check refuses
    a slot file with other modes, see ``modelward.trust._fingerprint``).

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
        out = os.open(parts[-1], flags | os.O_NOFOLLOW, mode, dir_fd=fd)
        if flags & os.O_CREAT:
            try:
                st = os.fstat(out)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # (chmod no other name)
                    raise OSError(f"{root / rel} is not a plain file")
                os.fchmod(out, mode)
            except BaseException:
                os.close(out)
                raise
        return out
    finally:
        os.close(fd)
