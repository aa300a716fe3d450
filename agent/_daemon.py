"""``modelward agent run``: update on a poll timer and on MQTT announcements.

Announcements are untrusted hints: each well-formed one wakes the loop for a TUF
refresh (at most one per ``min_refresh_interval``), never more. Failures back off
exponentially up to the poll interval. The last good model keeps serving throughout.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Mapping
from types import FrameType

from agent._commands import make_gate, signed_report, update
from agent._config import AgentConfig
from agent._notify import Notifier
from trust.errors import ModelwardError, TransportError
from updater import AnnouncementListener

logger = logging.getLogger("modelward.agent")


def lower_priority() -> None:
    """Nice 10 and best-effort I/O class, lowest level: heavy work yields to inference.

    systemd's Nice=/IOSchedulingClass= do the same for the unit; this covers other
    launchers. ioprio_set has no Python wrapper, so it is the raw syscall.
    """
    try:
        os.nice(10)
    except OSError as e:
        logger.debug("cannot lower CPU priority: %s", e)
    nr = {"x86_64": 251, "aarch64": 30, "armv7l": 314}.get(os.uname().machine)
    if nr is None:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ioprio = (2 << 13) | 7  # IOPRIO_CLASS_BE, level 7
    if libc.syscall(nr, 1, 0, ioprio) != 0:  # IOPRIO_WHO_PROCESS, this process
        logger.debug("cannot lower I/O priority: errno %d", ctypes.get_errno())


class Daemon:
    """The long-running agent loop.

    Args:
        cfg: the agent configuration.
        min_refresh_interval: seconds between two announcement-triggered refreshes.
    """

    def __init__(self, cfg: AgentConfig, min_refresh_interval: float = 2.0,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier({})
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

    def _sleep(self, seconds: float, event: threading.Event) -> None:
        """Wait for ``event`` up to ``seconds``, beating the watchdog in between."""
        end = time.monotonic() + seconds
        step = self.notifier.watchdog / 2 if self.notifier.watchdog else seconds
        while not event.is_set():
            self.notifier.beat()
            left = end - time.monotonic()
            if left <= 0:
                return
            event.wait(min(step, left))

    def run(self) -> None:
        """Loop until :meth:`request_stop`."""
        backoff = 0.0
        last_run = 0.0
        self.notifier.ready(f"started; model {self.cfg.updater.model}")
        while not self.stop.is_set():
            self._ensure_listener()
            since = time.monotonic() - last_run
            if since < self.min_refresh_interval:
                self._sleep(self.min_refresh_interval - since, self.stop)
            self.wake.clear()
            last_run = time.monotonic()
            gate = make_gate(self.cfg, stop=self.stop, heartbeat=self.notifier.beat)
            try:
                result = update(self.cfg, gate, on_step=self._on_step)
                backoff = 0.0
                self.notifier.status(result.message)
            except ModelwardError as e:
                backoff = min(max(2 * backoff, 5.0), self.cfg.poll_interval)
                self.notifier.status(f"last attempt failed: {type(e).__name__}; "
                                     f"retrying in {backoff:.0f}s")
            self.publish_status()
            # The poll timer carries jitter so a fleet does not refresh in lockstep.
            wait = backoff or self.cfg.poll_interval * random.uniform(0.9, 1.1)  # noqa: S311
            logger.debug("next refresh in %.0fs unless announced", wait)
            self._sleep(wait, self.wake)
        self.notifier.stopping()
        if self._listener is not None:
            self._listener.close()

    def publish_status(self) -> None:
        """Publish the signed status report, retained, if MQTT is configured."""
        mq = self.cfg.updater.mqtt
        if mq is None or self._listener is None:
            return
        from updater._journal import Journal

        state = Journal(self.cfg.state_dir / "journal.json").read().step
        try:
            payload = signed_report(self.cfg, state)
            self._listener.publish(mq.topic(f"devices/{self.cfg.device_id}/status"), payload,
                                   retain=True)
        except ModelwardError as e:
            logger.warning("cannot publish the status report: %s", e)

    def _on_step(self, step: str) -> None:
        self.notifier.beat()
        self.notifier.status(f"update: {step}")


def run_daemon(cfg: AgentConfig, env: Mapping[str, str]) -> None:
    """Run the daemon in the foreground with SIGTERM/SIGINT handling.

    Args:
        cfg: the configuration.
        env: the process environment (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``).
    """
    lower_priority()
    d = Daemon(cfg, notifier=Notifier(env))
    signal.signal(signal.SIGTERM, d.request_stop)
    signal.signal(signal.SIGINT, d.request_stop)
    logger.info("agent started for %s (model %s, transports %s)", cfg.device_id,
                cfg.updater.model, ",".join(cfg.updater.transports))
    d.run()
    logger.info("agent stopped")
