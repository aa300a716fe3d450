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
from pathlib import Path

os.environ.setdefault("TSS2_LOG", "all+NONE")


def main(argv: list[str]) -> int:
    """Entry point; ``argv`` is ``[config_path]``."""
    from modelward.agent._commands import make_gate, signed_report, update
    from modelward.agent._config import load_config
    from modelward.agent._log import LOG_FORMAT_ENV, LOG_FORMATS, report_error, setup_logging
    from modelward.agent._malloc import tune_malloc
    from modelward.trust.errors import ModelwardError
    from modelward.updater._journal import Journal
    from modelward.updater._statedir import touch_plain

    tune_malloc()
    fmt = os.environ.get(LOG_FORMAT_ENV, "auto")  # the daemon's --log-format
    fmt = setup_logging(int(os.environ.get("MODELWARD_VERBOSITY", "1")),
                        fmt if fmt in LOG_FORMATS else "auto")
    cfg = load_config(Path(argv[0]), test_kill_at=os.environ.get("MODELWARD_TEST_KILL_AT"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    beat_file = cfg.state_dir / ".heartbeat"
    last = [0.0]

    def heartbeat() -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            touch_plain(beat_file)

    code = 0
    try:
        heartbeat()
        update(cfg, make_gate(cfg, stop=stop, heartbeat=heartbeat),
               on_step=lambda _s: heartbeat())
    except ModelwardError as e:
        code = 1  # recorded in status.json by update(); reported here, once
        report_error(e, fmt=fmt, prefix="update failed",
                     logger=logging.getLogger("modelward.agent"))
    if cfg.updater.mqtt is not None:
        try:
            state = Journal(cfg.state_dir / "journal.json").read().step
            sys.stdout.write(signed_report(cfg, state).decode() + "\n")
        except ModelwardError as e:
            print(f"no status report: {e}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
