"""One repository-changing command at a time.

Every command that changes the repository (``repo`` actions other than ``status``,
``publish``, ``rollout``, the refresh timer's ``repo refresh``) reads the published state,
builds on it and writes the next versions. Two at once (two terminals, a CI job, the refresh
timer during a publish) both build on the same state: one's release is overwritten by the
other's. They take an exclusive ``flock`` on the ``REPO/metadata`` directory itself (every
writer can open it, the online refresh unit included; no file is added to what is served)
for the whole command; a second one waits, saying so.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelward.publisher.errors import RepositoryStateError

logger = logging.getLogger(__name__)


@contextmanager
def repository_lock(repo_dir: Path) -> Iterator[None]:
    """Hold the repository's lock (module docstring); none before ``repo init`` made
    ``REPO/metadata``.

    Raises:
        RepositoryStateError: ``REPO/metadata`` is not a directory.
    """
    metadata = repo_dir / "metadata"
    try:
        fd = os.open(metadata, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield  # `repo init`: nothing published yet
        return
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise RepositoryStateError(f"{metadata} is not a directory: {e.strerror}",
                                       hint=f"restore {metadata}") from e
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("waiting for %s: another repository-changing command is running",
                           metadata)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
