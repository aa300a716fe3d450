"""``modelward agent run``: update on a poll timer and on MQTT announcements.

The daemon itself only listens, keeps time, talks to systemd and publishes status
reports; each update attempt runs in a child process (``modelward.agent._child``), so the idle
daemon stays small and gets all memory back after every attempt.

Announcements are untrusted hints: each well-formed one wakes the loop for a TUF refresh
(at most one per ``min_refresh_interval``), never more, after a random delay within
``announce_spread`` (a fleet does not hit the origin at one instant); one of a timestamp
version the device already trusts wakes nothing. Failures back off exponentially up
to the poll interval, and announcements or reconnects do not cut a backoff short
(``modelward.agent._schedule`` has the rules). The last good model keeps serving throughout.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from types import FrameType

from modelward.agent._child import EXIT_BUSY, TIMESTAMP_LINE
from modelward.agent._config import AgentConfig
from modelward.agent._notify import Notifier
from modelward.agent._rpc import Handler, RpcServer, child_handler
from modelward.agent._schedule import Schedule
from modelward.agent._status import read_status
from modelward.trust._bounded import read_json_file
from modelward.trust.errors import TransportError
from modelward.updater.install._journal import MAX_JOURNAL_BYTES
from modelward.updater.transport._mqttconn import AnnouncementListener
from modelward.updater.transport._rpc import req_topic, resp_topic

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


def verified_timestamp(lines: list[str]) -> int | None:
    """The timestamp version an attempt child says it verified (its line before the
    report, ``agent._child.TIMESTAMP_LINE``); None if it said none, or not as a version.
    The child's output is its own: the health check and the activation command write
    to pipes of their own."""
    for line in lines:
        if line.startswith(TIMESTAMP_LINE):
            digits = line[len(TIMESTAMP_LINE):].strip()
            if digits.isascii() and digits.isdigit() and len(digits) <= 19:
                v = int(digits)
                return v if 0 < v < 1 << 63 else None
    return None


class Daemon:
    """The long-running agent loop.

    Args:
        cfg: the agent configuration.
        env: environment for the attempt processes.
        min_refresh_interval: seconds between two announcement-triggered refreshes.
        notifier: systemd notification.
    """

    def __init__(self, cfg: AgentConfig, env: Mapping[str, str],
                 min_refresh_interval: float = 2.0, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.env = {k: v for k, v in env.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.notifier = notifier or Notifier({})
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.min_refresh_interval = min_refresh_interval
        self.schedule = Schedule(cfg.poll_interval, min_refresh_interval,
                                 spread=cfg.announce_spread)
        self._lock = threading.Lock()  # the schedule, between the loop and MQTT's thread
        self._listener: AnnouncementListener | None = None
        self._child: subprocess.Popen[str] | None = None
        self._busy_told = False  # the skips for another command's lock were logged
        self._told_handled: int | None = None  # the handled version last logged
        self.verified: int | None = None  # the timestamp version the last attempt verified
        #: kind -> handler of operator requests (None: ``agent._rpc.child_handler``)
        self.rpc_handlers: Mapping[str, Handler] | None = None
        self.rpc: RpcServer | None = None

    def _on_announce(self, version: int) -> None:
        share = random.random()  # noqa: S311 - a spread, not a secret
        with self._lock:
            look = self.schedule.announce(version, time.monotonic(), share)
            # (one line for the version the device verified, once: older ones and
            # repeats, however a broker alternates them, are not logged)
            told = not look and version == self.schedule.handled_version and \
                version != self._told_handled
        if look:
            logger.info("announcement of timestamp version %d: refreshing after %.1fs "
                        "(a random share of announce_spread %.0fs)", version,
                        share * self.cfg.announce_spread, self.cfg.announce_spread)
            self.wake.set()
        elif told:
            self._told_handled = version
            logger.info("announcement of timestamp version %d ignored: already trusted",
                        version)

    def _ensure_listener(self) -> None:
        mq = self.cfg.updater.mqtt
        if mq is None or self._listener is not None:
            return
        rpc = self._ensure_rpc()
        try:
            self._listener = AnnouncementListener(mq, self._on_announce, rpc.on_message,
                                                  rpc.topic)
        except TransportError as e:
            logger.warning("cannot listen for announcements yet: %s", e)

    def _ensure_rpc(self) -> RpcServer:
        """The server of operator requests (attest, audit), answering on this device's own
        response topic through the listener connection."""
        if self.rpc is not None:
            return self.rpc
        mq = self.cfg.updater.mqtt
        assert mq is not None
        prefix = mq.topic("").rstrip("/")
        resp = resp_topic(prefix, self.cfg.device_id)

        def send(payload: bytes, correlation: bytes) -> None:
            listener = self._listener
            if listener is None:
                return
            try:
                listener.answer(resp, payload, correlation)
            except TransportError as e:
                logger.warning("cannot answer the operator: %s", e)

        handlers = self.rpc_handlers
        if handlers is None:
            h = child_handler(self.cfg.path, self.env)
            handlers = {"attest": h, "audit": h}
        self.rpc = RpcServer(req_topic(prefix, self.cfg.device_id), send, handlers)
        return self.rpc

    def request_stop(self, signum: int = 0, _frame: FrameType | None = None) -> None:
        """Stop after the current step (SIGTERM/SIGINT handler)."""
        self.stop.set()
        self.wake.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

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

    def attempt(self) -> tuple[int, bytes]:
        """Run one update attempt in a child; returns (exit code, signed report).
        :attr:`verified` is then the timestamp version it verified (None: not said)."""
        beat_file = self.cfg.state_dir / ".heartbeat"
        self.notifier.status("update: checking")
        child = subprocess.Popen(
            [sys.executable, "-I", "-m", "modelward.agent._child", str(self.cfg.path)],
            stdout=subprocess.PIPE, text=True, env=self.env,
        )
        self._child = child
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.extend(child.stdout or []), daemon=True)
        reader.start()
        limit = self.notifier.watchdog or 60.0
        shown = ""
        while True:
            try:
                code = child.wait(timeout=min(0.5, limit / 2))
                break
            except subprocess.TimeoutExpired:
                try:
                    beat = os.lstat(beat_file)  # (a link's target is not the beat)
                    fresh = stat.S_ISREG(beat.st_mode) and \
                        -1.0 < time.time() - beat.st_mtime < limit  # (future: stale)
                except OSError:
                    fresh = False
                if fresh:  # the attempt makes progress: keep systemd's watchdog fed
                    self.notifier.beat()
                step = self._journal_line()
                if step != shown:
                    shown = step
                    self.notifier.status(f"update: {step}")
        reader.join(5)
        self._child = None
        report = out[-1].strip().encode() if out and out[-1].startswith("{") else b""
        self.verified = verified_timestamp(out)
        return code, report

    def _journal_line(self) -> str:
        """The child's journaled step, for STATUS= (the journal is the progress record)."""
        try:
            j = read_json_file(self.cfg.state_dir / "journal.json", MAX_JOURNAL_BYTES,
                               max_depth=1)
        except (OSError, ValueError):  # UnsafeFileError, UntrustedJsonError
            return "checking"
        if not isinstance(j, dict):
            return "checking"
        return " ".join(v for k in ("step", "model", "version")
                        if isinstance(v := j.get(k), str)).strip()[:200] or "checking"

    def _result_line(self) -> str:
        doc = read_status(self.cfg.state_dir / "status.json")
        err = doc.get("last_error")
        if err:
            return f"last attempt failed: {err['type']}"[:200]
        return str((doc.get("last_result") or {}).get("message") or "idle")[:200]

    def _skipped(self, wait: float) -> None:
        """Say (once while it lasts) that the attempt was skipped for another command."""
        from modelward.agent._lock import holder

        h = holder(self.cfg.state_dir)
        what = h.describe() if h is not None else "another device command"
        self.notifier.status(f"update skipped: {what} is running"[:200])
        if not self._busy_told:
            self._busy_told = True
            logger.info("update attempt skipped: %s is running; trying again every %.0fs "
                        "until it ends", what, wait)

    def publish_status(self, report: bytes) -> None:
        """Publish the child's signed status report, retained."""
        mq = self.cfg.updater.mqtt
        if mq is None or self._listener is None or not report:
            return
        try:
            self._listener.publish(mq.topic(f"devices/{self.cfg.device_id}/status"), report,
                                   retain=True)
        except TransportError as e:
            logger.warning("cannot publish the status report: %s", e)

    def run(self) -> None:
        """Loop until :meth:`request_stop`."""
        self.notifier.ready(f"started; model {self.cfg.updater.model}")
        while not self.stop.is_set():
            self._ensure_listener()
            self.wake.clear()
            with self._lock:
                due = self.schedule.due()
            left = due - time.monotonic()
            if left > 0:
                self._sleep(left, self.wake)  # an announcement or stop: look again
                continue
            with self._lock:
                self.schedule.started(time.monotonic())
                answers = self.schedule.running
            if answers is not None:
                logger.info("update attempt for announced timestamp version %d", answers)
            code, report = self.attempt()
            try:
                self.publish_status(report)
            except Exception:  # noqa: BLE001 - the daemon outlives any status-report bug
                logger.exception("cannot publish the status report")
            # The timer carries jitter so a fleet does not refresh in lockstep.
            jitter = random.uniform(0.9, 1.1)  # noqa: S311
            if code == EXIT_BUSY:  # another device command runs: skipped, not failed
                with self._lock:
                    wait = self.schedule.skipped(time.monotonic(), jitter)
                self._skipped(wait)
                continue
            self._busy_told = False
            with self._lock:
                wait = self.schedule.finished(code == 0, time.monotonic(), jitter,
                                              self.verified if code == 0 else None)
            if code == 0:
                self.notifier.status(self._result_line())
            else:
                self.notifier.status(f"{self._result_line()} (exit {code}); "
                                     f"retrying in {wait:.0f}s")
            logger.debug("next refresh in %.0fs", wait,
                         extra={"backoff": self.schedule.backoff})
        self.notifier.stopping()
        if self._listener is not None:
            self._listener.close()
        if self.rpc is not None:
            self.rpc.close()


def run_daemon(cfg: AgentConfig, env: Mapping[str, str]) -> None:
    """Run the daemon in the foreground with SIGTERM/SIGINT handling.

    Args:
        cfg: the configuration.
        env: the process environment (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``; the rest is
            passed to the attempt processes).
    """
    from modelward.agent._owner import check_state_owner

    check_state_owner(cfg.state_dir, "agent run")
    lower_priority()
    d = Daemon(cfg, env, notifier=Notifier(env))
    signal.signal(signal.SIGTERM, d.request_stop)
    signal.signal(signal.SIGINT, d.request_stop)
    logger.info("agent started for %s (model %s, transports %s)", cfg.device_id,
                cfg.updater.model, ",".join(cfg.updater.transports))
    d.run()
    logger.info("agent stopped")
