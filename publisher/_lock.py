"""One repository-changing command at a time.

Every command that changes the repository (``repo`` actions other than ``status``,
``publish``, ``rollout``, the refresh timer's ``repo refresh``) reads the published state,
builds on it and writes the next versions. Two at once (two terminals, a CI job, the refresh
timer during a publish) both build on the same state: one's release is overwritten by the
other's while both exit 0. They take an exclusive ``flock`` on ``REPO/metadata/.modelward.lock``
(the directory every writer may write, the online refresh unit included; opened read-only,
never through a symlink, a regular file only) for the whole command; a second one waits,
saying so.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelward.publisher.errors import RepositoryStateError

logger = logging.getLogger(__name__)

LOCK_FILE = ".modelward.lock"  # in REPO/metadata (no client fetches it)


@contextmanager
def repository_lock(repo_dir: Path) -> Iterator[None]:
    """Hold the repository's lock (module docstring); none before ``repo init`` made
    ``REPO/metadata``.

    Raises:
        RepositoryStateError: the lock path is not a regular file (a symlink, a FIFO).
        OSError: it cannot be opened (permissions).
    """
    metadata = repo_dir / "metadata"
    if not metadata.is_dir():
        yield
        return
    path = metadata / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RepositoryStateError(f"{path} is a symlink, not the repository's lock",
                                       hint=f"remove {path}") from e
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RepositoryStateError(f"{path} is not a regular file, not the repository's "
                                       "lock", hint=f"remove {path}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("waiting for %s: another repository-changing command is running",
                           path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
