"""Log capture helpers of the unit tests (one copy for the logging test files)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def captured(formatter: logging.Formatter, name: str
             ) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """The logger ``name`` writing through ``formatter`` into a buffer only (not
    propagated), for the ``with`` block: (logger, buffer)."""
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(formatter)
    log = logging.getLogger(name)
    log.addHandler(h)
    log.propagate = False
    try:
        yield log, buf
    finally:
        log.removeHandler(h)
        log.propagate = True


@contextlib.contextmanager
def root_logging_kept() -> Iterator[None]:
    """The root logger's handlers and level as they were, after the block."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def journal_stderr(path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """stderr becomes the file ``path``, which $JOURNAL_STREAM names by device and inode,
    as systemd does for a unit's journal stream."""
    f = path.open("w")
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    monkeypatch.setattr(sys, "stderr", f)
    return path
