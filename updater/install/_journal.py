"""The update journal: every state transition, written atomically before it happens.

``state_dir/journal.json`` holds the step an attempt reached and what it is about. After
a crash or power loss the next start reads it and resumes (staged bytes are kept) or
rolls back (an unfinished extraction is discarded); ``current`` never points at a slot the
trust record does not vouch for, because it moves only after the commit.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from modelward.trust._atomic import write_atomic
from modelward.trust._bounded import read_json_file
from modelward.trust._plain import Frozen
from modelward.updater.install._statedir import clear_for_file

# In order. "idle" is the resting state between attempts.
STEPS = (
    "checking",
    "downloading",
    "staged",
    "verified",
    "health-checked",
    "committing",
    "committed",
    "active",
)
RESTING = ("idle", "active", "failed")
MAX_JOURNAL_BYTES = 64 * 1024  # an entry is a few hundred bytes


class JournalEntry(Frozen):
    """One journaled state."""

    __slots__ = ("step", "model", "version", "fingerprint", "target", "detail", "at")
    step: str
    model: str
    version: str
    fingerprint: str
    target: str
    detail: str
    at: str

    def __init__(self, step: str, model: str = "", version: str = "", fingerprint: str = "",
                 target: str = "", detail: str = "", at: str = "") -> None:
        self._set(step, model, version, fingerprint, target, detail, at)


class Journal:
    """Atomic, one-entry journal of the current update attempt.

    Args:
        path: the journal file.
        kill_at: test hook - SIGKILL this process right after journaling that step
            (read from ``MODELWARD_TEST_KILL_AT`` at the entry point only).
    """

    def __init__(self, path: Path, kill_at: str | None = None) -> None:
        self.path = path
        self.kill_at = kill_at

    def read(self) -> JournalEntry:
        """The last journaled state (``idle`` if none or unreadable)."""
        try:
            doc = read_json_file(self.path, MAX_JOURNAL_BYTES, max_depth=1)
        except (OSError, ValueError):  # UnsafeFileError, UntrustedJsonError
            return JournalEntry("idle")
        if not isinstance(doc, dict) or not isinstance(doc.get("step"), str):
            return JournalEntry("idle")
        return JournalEntry(**{k: v for k, v in doc.items()
                               if k in JournalEntry.__slots__ and isinstance(v, str)})

    def enter(self, step: str, **fields: str) -> None:
        """Record ``step`` durably (temp file, fsync, rename, fsync dir).

        A directory planted at the journal's path is removed first (the journal is no
        trusted state; see :func:`modelward.updater.install._statedir.clear_for_file`).

        Raises:
            StateDirError: the journal's path holds a directory that cannot be removed.
            OSError: the journal cannot be written (disk full).
        """
        if step not in STEPS and step not in RESTING:
            raise ValueError(f"unknown journal step {step!r}")
        entry = JournalEntry(step, at=datetime.now(UTC).isoformat(timespec="milliseconds"),
                             **fields)
        clear_for_file(self.path)
        write_atomic(self.path, json.dumps(entry.asdict(), sort_keys=True).encode())
        if self.kill_at == step:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)  # test hook: power loss right here
