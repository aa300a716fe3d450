"""A/B slot store: ``slots/a``, ``slots/b`` and the ``current`` symlink the app reads.

Extraction goes to ``staging/incoming`` (same file system, so moving it into a slot is a
rename): until a bundle has passed every check, nothing outside ``staging/`` is written.

``current`` is exactly the relative link ``slots/a`` or ``slots/b``: anything else (a link
elsewhere, even to a copy of a slot, an absolute link, a directory, a file) is not a slot,
and :meth:`SlotStore.activate` replaces it. A slot is a plain directory under a plain
``slots`` (``updater.install._statedir``): a symlinked slot never matches a fingerprint, and a
symlinked ``slots`` is refused with a StateDirError.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from modelward.trust._atomic import fsync_dir, symlink_atomic
from modelward.updater.errors import StateDirError
from modelward.updater.install._statedir import (
    is_plain_dir,
    open_dir,
    plain_dir,
    remove_at,
    remove_entry,
)

SLOTS = ("a", "b")
LINKS = {f"slots/{s}": s for s in SLOTS}


def slot_of_link(target: str | None) -> str | None:
    """The slot a ``current`` link target names: only ``slots/a`` or ``slots/b`` exactly."""
    return LINKS.get(target) if target is not None else None


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange_at(dirfd: int, a: str, b: str) -> bool:
    """Swap the entries ``a`` and ``b`` of ``dirfd`` atomically (renameat2 RENAME_EXCHANGE).

    Returns False when the kernel, libc or file system cannot (the caller renames instead).

    Raises:
        OSError: the exchange failed for another reason.
    """
    import ctypes  # (here: boot-check rarely swaps slots back, issue 15's lean boot)
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(dirfd, a.encode(), dirfd, b.encode(), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def _identity_at(dirfd: int, name: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the directory ``name`` of ``dirfd`` (not followed), or None
    when it is missing or not a directory."""
    try:
        st = os.lstat(name, dir_fd=dirfd)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _dir_identity(dirfd: int, name: str, path: Path) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of the directory ``name`` of ``dirfd``, opened ``O_NOFOLLOW |
    O_DIRECTORY`` (``path`` names it in messages).

    Raises:
        StateDirError: it is missing, a symlink or not a directory.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dirfd)
    except OSError as e:
        raise StateDirError(f"{path} is not a plain directory of the state directory: {e}",
                            path=str(path),
                            hint=f"remove {path} (the link itself, not what it points "
                                 "at); the agent creates it again") from e
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino


def _swapped(path: Path) -> StateDirError:
    return StateDirError(f"{path} was replaced while it was moved into a slot: nothing "
                         "installed", path=str(path),
                         hint="something else writes the state directory; stop it")


class SlotStore:
    """The model slots under a state directory.

    The trust record says which slot is active; ``current`` is kept pointing at it
    (``current -> slots/<x>``) so the inference application has a stable path.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.root = state_dir / "slots"
        self.current = state_dir / "current"
        self.incoming = state_dir / "staging" / "incoming"

    def path(self, slot: str) -> Path:
        """Directory of ``slot``."""
        return self.root / slot

    @staticmethod
    def other(slot: str | None) -> str:
        """The slot that is not ``slot`` (``a`` when nothing is active)."""
        return "b" if slot == "a" else "a"

    def check(self) -> None:
        """Refuse a ``slots`` that is a symlink or not a directory (a missing one is fine).

        Raises:
            StateDirError: names ``slots``.
        """
        if os.path.lexists(self.root):
            plain_dir(self.state_dir, "slots")

    def slot_dir(self, slot: str) -> Path | None:
        """``slots/<slot>`` if it is a plain directory under a plain ``slots``, else None.

        Raises:
            StateDirError: ``slots`` itself is a symlink or not a directory.
        """
        self.check()
        path = self.path(slot)
        return path if is_plain_dir(path) else None

    def incoming_dir(self) -> Path | None:
        """``staging/incoming`` if it and ``staging`` are plain directories, else None."""
        staging = self.incoming.parent
        if is_plain_dir(staging) and is_plain_dir(self.incoming):
            return self.incoming
        return None

    def current_target(self) -> str | None:
        """What ``current`` is: its link target, or None when it is missing or no link."""
        try:
            st = os.lstat(self.current)
        except OSError:
            return None
        if not stat.S_ISLNK(st.st_mode):
            return None
        try:
            return os.readlink(self.current)
        except OSError:
            return None

    def current_slot(self) -> str | None:
        """Slot that ``current`` points at (exactly ``slots/a`` or ``slots/b``), or None."""
        return slot_of_link(self.current_target())

    def install_incoming(self, slot: str) -> None:
        """Move the verified incoming directory into ``slot`` (which must not be active).

        Raises:
            StateDirError: ``slots`` or ``staging`` is not a plain directory.
        """
        # (renamed through fds of staging/ and slots/ walked from state_dir: a directory
        # swapped for a link after these opens moves nothing from or into another place;
        # the entry renamed is checked, just before and after, to be the directory opened)
        src = open_dir(self.state_dir, "staging")
        try:
            name = self.incoming.name
            want = _dir_identity(src, name, self.incoming)
            dst = open_dir(self.state_dir, "slots", create=True)
            try:
                old = f".old-{slot}"
                remove_at(dst, old)
                moved_old = False
                with contextlib.suppress(FileNotFoundError):  # (a link: renamed itself)
                    os.replace(slot, old, src_dir_fd=dst, dst_dir_fd=dst)
                    moved_old = True
                try:
                    if _identity_at(src, name) != want:
                        raise _swapped(self.incoming)
                    os.replace(name, slot, src_dir_fd=src, dst_dir_fd=dst)
                    if _identity_at(dst, slot) != want:  # (swapped in between: take it out)
                        remove_at(dst, slot)
                        raise _swapped(self.incoming)
                except BaseException:
                    if moved_old and _identity_at(dst, slot) is None:
                        with contextlib.suppress(OSError):
                            os.replace(old, slot, src_dir_fd=dst, dst_dir_fd=dst)
                    raise
                os.fsync(dst)
                remove_at(dst, old)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def move_back(self, found: str, slot: str) -> None:
        """Put the directory found at ``slots/<found>`` back at ``slots/<slot>`` by rename.

        Whatever is at ``slots/<slot>`` goes to ``slots/<found>`` (the two are exchanged
        atomically where the kernel can; else by three renames through ``slots/.swap``).
        No byte is copied and nothing trusted is written: the trust record keeps naming
        the slots it named.

        Raises:
            StateDirError: ``slots`` is not a plain directory.
            OSError: a rename failed.
        """
        fd = open_dir(self.state_dir, "slots")  # (every rename within this fd)
        at = {"src_dir_fd": fd, "dst_dir_fd": fd}
        try:
            try:
                os.lstat(slot, dir_fd=fd)
            except FileNotFoundError:
                os.rename(found, slot, **at)
            else:
                if not _exchange_at(fd, found, slot):
                    remove_at(fd, ".swap")
                    os.rename(slot, ".swap", **at)
                    os.rename(found, slot, **at)
                    os.rename(".swap", found, **at)
            os.fsync(fd)
        finally:
            os.close(fd)

    def activate(self, slot: str) -> None:
        """Point ``current`` at ``slot`` atomically (replacing whatever ``current`` is).

        Raises:
            StateDirError: ``current`` cannot be replaced (names it).
        """
        try:
            try:
                st = os.lstat(self.current)
            except FileNotFoundError:
                st = None
            aside = None
            if st is not None and stat.S_ISDIR(st.st_mode):  # no link replaces a directory
                aside = self.state_dir / f".current.{secrets.token_hex(8)}.bad"
                os.replace(self.current, aside)  # (a fresh name: nothing is replaced)
            symlink_atomic(f"slots/{slot}", self.current)
            if aside is not None:
                with contextlib.suppress(OSError):  # (what cannot go stays aside, unused)
                    remove_entry(aside)
        except OSError as e:
            raise StateDirError(f"cannot point {self.current} at slots/{slot}: {e}",
                                path=str(self.current)) from e

    def deactivate(self) -> None:
        """Remove ``current`` (whatever it is; a link is removed, never followed)."""
        try:
            st = os.lstat(self.current)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self.activate("a")  # moves the directory aside and removes it
            st = os.lstat(self.current)
        os.unlink(self.current)
        fsync_dir(self.state_dir)
