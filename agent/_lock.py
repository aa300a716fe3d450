"""One state-changing device command at a time: the lock file ``state_dir/agent.lock``.

Every command that changes the device's state (``agent update``, the daemon's attempt,
``agent boot-check``, ``agent provision``) reads the trust record, the TPM counter, the
journal and the stage, and builds on them. Two at once on one state directory take each
other's staged files, both pass the commit's counter check and move the counter twice,
or one completes (or discards) the other's half-made commit. So each takes an exclusive
lock for its whole run, before it stages, connects or writes the TPM:

- the lock is an open-file-description lock (``F_OFD_SETLK``, whole file, write) on
  ``state_dir/agent.lock``, opened relative to an fd of the state directory with
  ``O_NOFOLLOW | O_CLOEXEC`` (never through a symlink; an attempt's sandboxed child
  does not inherit it), mode 0600, owned by the user running the command (who owns the
  state directory: ``modelward.agent._owner``). The kernel drops it when its holder
  exits, however it exits: a crashed holder leaves no stale lock.
- An entry there that is not a plain file of this user with mode 0600 (a symlink, a
  directory, a FIFO, a device node, a hard link, another user's file, a file readable by
  others: the disk's doing) is removed and a new file made, so the disk cannot block
  every command for good. What is there is looked at (``fstatat``, no follow) before
  anything is opened, and only a plain file is opened: a planted device node is never
  opened. A file of another mode is replaced, never chmodded and reused: another
  process may have opened it while its mode allowed, and hold a lock on it. After
  locking, the holder checks the name still is the file it locked (else it locks again).
- The holder writes ``pid N: COMMAND`` into the file; whoever finds it locked reads at
  most :data:`HOLDER_MAX` bytes of it, as untrusted text, escaped, to name it. The
  holder removes the file as it lets go (still locked; a command that opened it just
  before finds, once it has the lock, that the name no longer is its file, and starts
  again), so a finished or refused command leaves the state directory as it was.
- A missing state directory is made (mode 0750) and locked at once, before the command
  does anything else: a command started on a fresh device, before ``agent provision``
  made the directory, never runs unlocked beside one started after (the provision is
  then refused while it runs; it makes the directory the same way, then locks).
- What a second command does (README "Device commands"): ``agent update`` and ``agent
  provision`` are refused (:class:`DeviceBusyError`, one line naming the holder, exit
  75); ``agent boot-check`` waits up to :data:`BOOT_WAIT` seconds (saying so once), then
  is refused; the daemon skips its attempt and tries again later (``_daemon.py``).
  ``agent status`` takes no lock: it is read-only and says "an update is in progress"
  (:func:`holder`).

Within one process the lock is re-entrant: the daemon's attempt child holds it for the
update and its status report, and ``update()`` inside it does not lock again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from modelward.agent.errors import DeviceBusyError
from modelward.trust._display import escape
from modelward.trust._plain import Frozen
from modelward.updater.errors import StateDirError

logger = logging.getLogger("modelward.agent")

LOCK_NAME = "agent.lock"
LOCK_MODE = 0o600
HOLDER_MAX = 256  # bytes of the holder line read (untrusted: the disk may write anything)
BOOT_WAIT = 120.0  # seconds boot-check waits for a running command
_POLL = 0.1

# struct flock (the C layout of this platform; "0q": padded to the alignment of off_t)
_FLOCK = "@hhqqi0q"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY

#: The state directories this process holds the lock of (re-entrance), and their fds.
_held: dict[Path, int] = {}


class Holder(Frozen):
    """Who holds the lock, as its file says (escaped, bounded; not to be believed
    beyond display)."""

    __slots__ = ("pid", "command")
    pid: int | None
    command: str

    def __init__(self, pid: int | None, command: str) -> None:
        self._set(pid, command)

    def describe(self) -> str:
        who = self.command or "another device command"
        return f"{who} (pid {self.pid})" if self.pid is not None else who


def _flock(kind: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _locked_by_other(fd: int) -> bool:
    """Whether another open file description holds a lock on ``fd``'s file (nothing
    taken: ``F_OFD_GETLK``)."""
    out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK))
    return int(struct.unpack(_FLOCK, out)[0]) != fcntl.F_UNLCK


def _parse(raw: bytes) -> Holder:
    text = raw[:HOLDER_MAX].decode("utf-8", "replace").split("\n", 1)[0]
    head, _, command = text.partition(": ")
    pid: int | None = None
    if head.startswith("pid ") and head[4:].isdigit() and len(head) <= 14:
        pid = int(head[4:])
    else:
        command = text
    return Holder(pid, escape(command.strip(), 80))


def _read_holder(fd: int) -> Holder:
    try:
        return _parse(os.pread(fd, HOLDER_MAX, 0))
    except OSError:
        return Holder(None, "")


def _plain_own(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()


def _open_lock(dirfd: int, path: Path) -> int:
    """The lock file's fd, a plain file of this user, mode 0600 (module docstring:
    anything else there is replaced, never opened).

    What is at the name is looked at first (``fstatat``, never following a link): only a
    plain file of this user with mode 0600 is opened (without ``O_CREAT``), and the fd is
    then checked to be that same inode; a missing name is made afresh (``O_EXCL``). A
    device node, FIFO or socket planted there is never opened. A file of another mode is
    replaced, not chmodded in place: whoever opened it while its mode allowed may hold an
    fd and a lock on it.

    Raises:
        StateDirError: it cannot be opened, made or replaced.
    """
    for _ in range(8):
        try:
            seen: os.stat_result | None = os.stat(LOCK_NAME, dir_fd=dirfd,
                                                  follow_symlinks=False)
        except FileNotFoundError:
            seen = None
        except OSError as e:
            raise StateDirError(f"cannot inspect the lock file {path}: {e.strerror}",
                                path=str(path)) from e
        if seen is not None and not _usable(seen):
            _replace(dirfd, path, seen)
            continue
        flags = _FILE_FLAGS if seen is not None else _FILE_FLAGS | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(LOCK_NAME, flags, LOCK_MODE, dir_fd=dirfd)
        except (FileNotFoundError, FileExistsError):
            continue  # (removed or made meanwhile: look again)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES,
                               errno.EPERM, errno.ENOTDIR):
                raise StateDirError(f"cannot open the lock file {path}: {e.strerror}",
                                    path=str(path)) from e
            _replace(dirfd, path, None)
            continue
        try:
            st = os.fstat(fd)
            if seen is None and _plain_own(st):  # (made just now: umask-proof mode)
                os.fchmod(fd, LOCK_MODE)
                st = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            raise StateDirError(f"cannot inspect the lock file {path}: {e.strerror}",
                                path=str(path)) from e
        if _usable(st) and (seen is None or _same(st, seen)):
            os.set_blocking(fd, True)
            return fd
        os.close(fd)
        if not _usable(st):
            _replace(dirfd, path, st)
    raise StateDirError(f"cannot make the lock file {path}: it keeps being replaced",
                        path=str(path))


def _usable(st: os.stat_result) -> bool:
    return _plain_own(st) and stat.S_IMODE(st.st_mode) == LOCK_MODE


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _replace(dirfd: int, path: Path, seen: os.stat_result | None) -> None:
    """Remove what is at the lock file's name if it still is ``seen`` (or, None, not a
    plain file), never following a link."""
    from modelward.updater.install._statedir import remove_at

    try:
        st = os.lstat(LOCK_NAME, dir_fd=dirfd)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateDirError(f"cannot inspect the lock file {path}: {e.strerror}",
                            path=str(path)) from e
    same = seen is not None and (st.st_dev, st.st_ino) == (seen.st_dev, seen.st_ino)
    if same or (seen is None and not _plain_own(st)):
        logger.warning("replacing %s: it was not a plain file of this user", path)
        try:
            remove_at(dirfd, LOCK_NAME)
        except OSError as e:
            raise StateDirError(f"cannot replace the lock file {path}: {e.strerror}",
                                path=str(path)) from e


def _still_named(dirfd: int, fd: int) -> bool:
    try:
        st = os.lstat(LOCK_NAME, dir_fd=dirfd)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _open_state_dir(state_dir: Path) -> int:
    """An fd of the state directory, or -1 if it does not exist."""
    try:
        return os.open(state_dir, _DIR_FLAGS)
    except FileNotFoundError:
        return -1
    except OSError as e:
        raise StateDirError(f"cannot open the state directory {state_dir}: {e.strerror}",
                            path=str(state_dir)) from e


def _make_state_dir(state_dir: Path) -> None:
    """Create the missing state directory (mode 0750, as ``agent provision`` does), so
    that its lock is taken before anything else is put there.

    Raises:
        StateDirError: it cannot be made.
    """
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as e:
        raise StateDirError(f"cannot create the state directory {state_dir}: {e.strerror}",
                            path=str(state_dir)) from e


def _refusal(command: str, path: Path, h: Holder) -> DeviceBusyError:
    return DeviceBusyError(
        f"`{command}` not started: {h.describe()} is running on this device "
        f"(it holds {path})", path=str(path), holder=h.describe(), pid=h.pid,
        hint="run it again once that command has finished")


@contextlib.contextmanager
def device_lock(state_dir: Path, command: str, *, wait: float = 0.0,
                clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], None] = time.sleep) -> Iterator[None]:
    """Hold the device lock of ``state_dir`` while the block runs (module docstring).

    Args:
        state_dir: the state directory. Missing, it is made here (mode 0750, parents as
            needed) and locked at once: every command that locks may create it (an
            update heals a lost one, provision makes it), and one started before the
            directory exists must not run unlocked once another has made it.
        command: what is running, written for others to see ("agent update").
        wait: seconds to wait for a running command before refusing (0: refuse at once).

    Raises:
        DeviceBusyError: another command holds it (after ``wait``); nothing was touched.
        StateDirError: the state directory or the lock file cannot be opened.
    """
    key = Path(os.path.abspath(state_dir))
    if key in _held:
        yield
        return
    path = state_dir / LOCK_NAME
    dirfd = _open_state_dir(state_dir)
    if dirfd < 0:  # no state directory yet: made here, then locked before it is used
        _make_state_dir(state_dir)
        dirfd = _open_state_dir(state_dir)
        if dirfd < 0:
            raise StateDirError(f"cannot create the state directory {state_dir}: it was "
                                "removed as it was made", path=str(state_dir))
    try:
        fd = _acquire(dirfd, path, command, wait, clock, sleep)
    except BaseException:
        os.close(dirfd)
        raise
    _held[key] = fd
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {command}\n".encode(), 0)
    except OSError as e:  # (a full disk: the lock holds all the same)
        logger.debug("cannot write the holder into %s: %s", path, e)
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):  # (still locked: whoever opened it retries)
            if _still_named(dirfd, fd):
                os.unlink(LOCK_NAME, dir_fd=dirfd)
        os.close(fd)  # (releases the lock)
        os.close(dirfd)


def _acquire(dirfd: int, path: Path, command: str, wait: float,
             clock: Callable[[], float], sleep: Callable[[float], None]) -> int:
    deadline = clock() + wait
    told = False
    while True:
        fd = _open_lock(dirfd, path)
        try:
            got = _try_lock(fd)
        except OSError as e:
            os.close(fd)
            raise StateDirError(f"cannot lock {path}: {e.strerror}", path=str(path)) from e
        if got:
            if _still_named(dirfd, fd):
                return fd
            os.close(fd)  # (replaced meanwhile: lock what is there now)
            continue
        h = _read_holder(fd)
        os.close(fd)
        if clock() >= deadline:
            raise _refusal(command, path, h)
        if not told:
            told = True
            logger.warning("`%s` waits up to %.0fs: %s is running", command, wait,
                           h.describe())
        sleep(min(_POLL, max(0.0, deadline - clock())))


def holder(state_dir: Path) -> Holder | None:
    """Who holds the device lock now, or None (read-only: nothing is locked, created or
    written; a missing or unsafe lock file is taken as not held)."""
    try:
        dirfd = os.open(state_dir, _DIR_FLAGS)
    except OSError:
        return None
    try:  # (looked at first, never followed: only a plain file is opened)
        seen = os.stat(LOCK_NAME, dir_fd=dirfd, follow_symlinks=False)
        if not stat.S_ISREG(seen.st_mode):
            return None
        fd = os.open(LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                     | os.O_NOCTTY, dir_fd=dirfd)
    except OSError:
        return None
    finally:
        os.close(dirfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _same(st, seen) or not _locked_by_other(fd):
            return None
        return _read_holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
