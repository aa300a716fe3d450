"""One update attempt in its own process: ``python -m modelward.agent._child CONFIG``.

The daemon stays small while idle (no TUF, TPM or HTTPS stack loaded) and gets all
memory back after each attempt; a crash here cannot take the daemon down. This process
touches ``state_dir/.heartbeat`` as it makes progress (the daemon feeds the systemd
watchdog from it), stops cleanly on SIGTERM at the next chunk, and prints the signed
status report as its last line of output.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelward.agent._config import AgentConfig

os.environ.setdefault("TSS2_LOG", "all+NONE")

#: Exit code of an attempt not started: another device command holds the device lock
#: (``agent._lock``); the daemon tries again later, without a backoff.
EXIT_BUSY = 75


def main(argv: list[str]) -> int:
    """Entry point; ``argv`` is ``[config_path]``."""
    from modelward.agent._config import load_config
    from modelward.agent._lock import device_lock
    from modelward.agent._log import LOG_FORMAT_ENV, LOG_FORMATS, setup_logging
    from modelward.agent._malloc import tune_malloc
    from modelward.agent.errors import DeviceBusyError
    from modelward.updater.install._statedir import touch_plain

    tune_malloc()
    fmt = os.environ.get(LOG_FORMAT_ENV, "auto")  # the daemon's --log-format
    fmt = setup_logging(verbosity(os.environ.get("MODELWARD_VERBOSITY")),
                        fmt if fmt in LOG_FORMATS else "auto")
    log = logging.getLogger("modelward.agent")
    try:
        cfg = load_config(Path(argv[0]),
                          test_kill_at=os.environ.get("MODELWARD_TEST_KILL_AT"))
    except Exception as e:  # noqa: BLE001 - one record, like every error of the child
        _report(e, fmt, "update failed", log)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    beat_file = cfg.state_dir / ".heartbeat"
    last = [0.0]

    def heartbeat() -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            touch_plain(beat_file)

    try:
        # the device lock for the attempt and its report (its sequence number is state)
        with device_lock(cfg.state_dir, "agent run (update attempt)"):
            return _attempt(cfg, stop, heartbeat, fmt, log)
    except DeviceBusyError:
        return EXIT_BUSY  # nothing touched: the daemon says so, once, and tries again later
    except Exception as e:  # noqa: BLE001 - the lock file cannot be made: one record
        _report(e, fmt, "update failed", log)
        return 1


#: the line before the report that names the timestamp version the attempt verified (the
#: daemon's only source for it: never a file in the state directory, never an announcement)
TIMESTAMP_LINE = "verified timestamp version "


def _attempt(cfg: AgentConfig, stop: threading.Event, heartbeat: Callable[[], None],
             fmt: str, log: logging.Logger) -> int:
    from modelward.agent._commands import make_gate, signed_report, update
    from modelward.updater.install._journal import Journal

    code = 0
    try:
        heartbeat()
        result = update(cfg, make_gate(cfg, stop=stop, heartbeat=heartbeat),
                        on_step=lambda _s: heartbeat())
        if result.timestamp_version is not None:  # (what announcements it answered)
            sys.stdout.write(f"{TIMESTAMP_LINE}{result.timestamp_version}\n")
    except Exception as e:  # noqa: BLE001 - each error is one record on the journal
        code = 1  # a ModelwardError is recorded in status.json by update(); reported here
        _report(e, fmt, "update failed", log)
    if cfg.updater.mqtt is not None:
        try:
            state = Journal(cfg.state_dir / "journal.json").read().step
            sys.stdout.write(signed_report(cfg, state).decode() + "\n")
        except Exception as e:  # noqa: BLE001 - one record, escaped and bounded
            _report(e, fmt, "no status report", log)
    return code


def _report(e: Exception, fmt: str, prefix: str, log: logging.Logger) -> None:
    """``e`` as one record of ``log``: a modelward error by its message and hint, an
    ``OSError`` by its message too, anything else as a bug, with its traceback."""
    from modelward.agent._log import report_error
    from modelward.trust.errors import ModelwardError

    if isinstance(e, ModelwardError | OSError):
        report_error(e, fmt=fmt, prefix=prefix, logger=log)
    else:
        report_error(e, fmt=fmt, prefix=f"{prefix}: internal error: {type(e).__name__}",
                     logger=log, traceback=True,
                     hint="this is a bug: report it with this record")


DEFAULT_VERBOSITY = 1  # the agent's: info
MAX_VERBOSITY = 3


def verbosity(value: str | None) -> int:
    """``$MODELWARD_VERBOSITY`` (the daemon's ``-v`` count, plus one) as a verbosity: one
    ASCII digit from 0 to :data:`MAX_VERBOSITY`, else :data:`DEFAULT_VERBOSITY` (pure).
    No value makes the child quieter than warnings: its errors are always logged."""
    if value is not None and len(value) == 1 and "0" <= value <= "9":
        return min(int(value), MAX_VERBOSITY)
    return DEFAULT_VERBOSITY


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
