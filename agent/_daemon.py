"""``modelward agent run``: update on a poll timer and on MQTT announcements.

Announcements are untrusted hints: each well-formed one wakes the loop for a TUF
refresh (at most one per ``min_refresh_interval``), never more. Failures back off
exponentially up to the poll interval. The last good model keeps serving throughout.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from types import FrameType

from agent._commands import make_gate, update
from agent._config import AgentConfig
from trust.errors import ModelwardError, TransportError
from updater import AnnouncementListener

logger = logging.getLogger("modelward.agent")


class Daemon:
    """The long-running agent loop.

    Args:
        cfg: the agent configuration.
        min_refresh_interval: seconds between two announcement-triggered refreshes.
    """

    def __init__(self, cfg: AgentConfig, min_refresh_interval: float = 2.0) -> None:
        self.cfg = cfg
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.min_refresh_interval = min_refresh_interval
        self._listener: AnnouncementListener | None = None
        self._announced = 0

    def _on_announce(self, version: int) -> None:
        self._announced = version
        self.wake.set()

    def _ensure_listener(self) -> None:
        mq = self.cfg.updater.mqtt
        if mq is None or self._listener is not None:
            return
        try:
            self._listener = AnnouncementListener(mq, self._on_announce)
        except TransportError as e:
            logger.warning("cannot listen for announcements yet: %s", e)

    def request_stop(self, signum: int = 0, _frame: FrameType | None = None) -> None:
        """Stop after the current step (SIGTERM/SIGINT handler)."""
        self.stop.set()
        self.wake.set()

    def run(self) -> None:
        """Loop until :meth:`request_stop`."""
        backoff = 0.0
        last_run = 0.0
        while not self.stop.is_set():
            self._ensure_listener()
            since = time.monotonic() - last_run
            if since < self.min_refresh_interval:
                self.stop.wait(self.min_refresh_interval - since)
            self.wake.clear()
            last_run = time.monotonic()
            try:
                update(self.cfg, make_gate(self.cfg, stop=self.stop))
                backoff = 0.0
            except ModelwardError:
                backoff = min(max(2 * backoff, 5.0), self.cfg.poll_interval)
            # The poll timer carries jitter so a fleet does not refresh in lockstep.
            wait = backoff or self.cfg.poll_interval * random.uniform(0.9, 1.1)  # noqa: S311
            logger.debug("next refresh in %.0fs unless announced", wait)
            self.wake.wait(wait)
        if self._listener is not None:
            self._listener.close()


def run_daemon(cfg: AgentConfig) -> None:
    """Run the daemon in the foreground with SIGTERM/SIGINT handling."""
    d = Daemon(cfg)
    signal.signal(signal.SIGTERM, d.request_stop)
    signal.signal(signal.SIGINT, d.request_stop)
    logger.info("agent started for %s (model %s, transports %s)", cfg.device_id,
                cfg.updater.model, ",".join(cfg.updater.transports))
    d.run()
    logger.info("agent stopped")
