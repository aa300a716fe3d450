"""Attack 15 (the agent user against root): write_atomic's chmod follows a swapped link.

``trust/_atomic.py:write_atomic`` makes its temporary file with mkstemp, writes and fsyncs
it, then ``os.chmod(tmp, mode)`` BY NAME. The state directory (/var/lib/modelward) and
/run/modelward belong to the agent user; whoever runs a modelward command there as root
(`sudo modelward agent provision`, which nothing refuses, or `agent update`/`boot-check`
by hand) lets that user, the owner of the directory, rename the temporary file away during
the fsync and put a symlink in its place: root's chmod then gives the link's target (say
/etc/shadow) mode 0644 or 0640. fchmod on the open descriptor would not follow anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelward.agent._observe import Metrics
from modelward.trust import _atomic


def _swap_on_fsync(monkeypatch: pytest.MonkeyPatch, directory: Path, victim: Path) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        for p in directory.glob(".*.tmp"):
            if not p.is_symlink():  # the directory's owner swaps the temporary file
                p.unlink()
                p.symlink_to(victim)

    monkeypatch.setattr(_atomic.os, "fsync", fsync)


def test_write_atomic_chmod_does_not_follow_swapped_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    state, elsewhere = tmp_path / "state", tmp_path / "etc"
    state.mkdir()
    elsewhere.mkdir()
    victim = elsewhere / "shadow"
    victim.write_text("root:$6$secret:::\n")
    victim.chmod(0o600)
    _swap_on_fsync(monkeypatch, state, victim)
    Metrics().write_textfile(state / "metrics.prom")  # mode 0644, as root would write it
    assert victim.stat().st_mode & 0o777 == 0o600
