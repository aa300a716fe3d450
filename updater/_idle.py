"""Idle windows: heavy work (download, verification, health check) runs only while the
device is idle by every configured signal, and pauses between chunks when it is not.

Signals are small objects with one question, ``busy() -> reason | None``; the gate asks
all of them. Tests and other environments inject their own.
"""

from __future__ import annotations

import abc
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from datetime import time as dtime
from pathlib import Path

from updater.errors import LocalDeviceError

logger = logging.getLogger(__name__)


class UpdateInterrupted(LocalDeviceError):
    """The agent was asked to stop while heavy work waited for an idle window."""


class IdleSignal(abc.ABC):
    """One source of "the device is busy"."""

    @abc.abstractmethod
    def busy(self) -> str | None:
        """A reason the device is busy now, or None."""


class BusyFileSignal(IdleSignal):
    """The inference application's queue depth, written to a file.

    Busy when the depth exceeds ``max_depth`` or the file is unreadable; a file not
    rewritten for ``stale_after`` seconds is ignored (the application is gone), so a
    crashed application cannot block updates forever.
    """

    def __init__(self, path: Path, max_depth: int = 0, stale_after: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path, self.max_depth, self.stale_after, self._clock = path, max_depth, \
            stale_after, clock
        self._key: tuple[int, int] | None = None
        self._depth: int | None = 0

    def busy(self) -> str | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        if self._clock() - st.st_mtime > self.stale_after:
            return None
        key = (st.st_mtime_ns, st.st_size)
        if key != self._key:
            self._key = key
            try:
                self._depth = int(self.path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                self._depth = None
        if self._depth is None:
            return f"application busy signal {self.path} is unreadable"
        if self._depth > self.max_depth:
            return f"application queue depth {self._depth} > {self.max_depth}"
        return None


def _read_cpu() -> tuple[float, float]:
    """(total, idle) jiffies from /proc/stat, in seconds."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    vals = [int(v) for v in fields]
    hz = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals[:8]) / hz, idle / hz


class CpuIdleSignal(IdleSignal):
    """Share of CPU time idle over ``window`` seconds, not counting modelward's own use."""

    def __init__(self, min_idle: float = 0.5, window: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.min_idle, self.window, self._clock = min_idle, window, clock
        self._last: tuple[float, float, float, float] | None = None
        self._reason: str | None = None

    def busy(self) -> str | None:
        now = self._clock()
        if self._last is not None and now - self._last[0] < self.window:
            return self._reason
        total, idle = _read_cpu()
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        if self._last is not None:
            _, t0, i0, o0 = self._last
            dt = total - t0
            if dt > 0:
                share = min(1.0, (idle - i0 + own - o0) / dt)
                self._reason = (f"CPU idle {share:.0%} < {self.min_idle:.0%}"
                                if share < self.min_idle else None)
        self._last = (now, total, idle, own)
        return self._reason


class LoadSignal(IdleSignal):
    """1-minute load average above ``max_load``."""

    def __init__(self, max_load: float) -> None:
        self.max_load = max_load

    def busy(self) -> str | None:
        load = os.getloadavg()[0]
        return f"load average {load:.2f} > {self.max_load}" if load > self.max_load else None


class MainsPowerSignal(IdleSignal):
    """Busy while running on battery (a battery present and no mains supply online)."""

    def __init__(self, root: Path = Path("/sys/class/power_supply")) -> None:
        self.root = root

    def busy(self) -> str | None:
        if not self.root.is_dir():
            return None
        kinds: dict[str, bool] = {}
        for sup in self.root.iterdir():
            try:
                kind = (sup / "type").read_text().strip()
                online = (sup / "online").read_text().strip() == "1" \
                    if (sup / "online").exists() else False
            except OSError:
                continue
            kinds[kind] = kinds.get(kind, False) or online
        if "Battery" in kinds and not (kinds.get("Mains") or kinds.get("USB")):
            return "running on battery"
        return None


@dataclass(frozen=True)
class TimeRange:
    """A local-time range ``HH:MM-HH:MM``; may wrap past midnight."""

    start: dtime
    end: dtime

    @classmethod
    def parse(cls, text: str) -> TimeRange:
        """Parse ``HH:MM-HH:MM``.

        Raises:
            ValueError: not that form.
        """
        a, sep, b = text.partition("-")
        if not sep:
            raise ValueError(f"maintenance window {text!r} is not HH:MM-HH:MM")
        return cls(dtime.fromisoformat(a.strip()), dtime.fromisoformat(b.strip()))

    def contains(self, t: dtime) -> bool:
        """Whether ``t`` falls in the range."""
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end


class MaintenanceWindowSignal(IdleSignal):
    """Busy outside the configured local-time windows."""

    def __init__(self, windows: Sequence[TimeRange],
                 now: Callable[[], datetime] = datetime.now) -> None:
        self.windows, self._now = list(windows), now

    def busy(self) -> str | None:
        t = self._now().time()
        if any(w.contains(t) for w in self.windows):
            return None
        return "outside the maintenance windows"


class Gate:
    """Asks every signal before and during heavy work, and waits while any says busy.

    Args:
        signals: the configured signals (none: always idle).
        poll: seconds between checks while paused.
        stop: set to abandon a pause (raises :class:`UpdateInterrupted`).
        heartbeat: called while paused (systemd watchdog keep-alive).
    """

    def __init__(
        self,
        signals: Sequence[IdleSignal] = (),
        poll: float = 1.0,
        stop: threading.Event | None = None,
        heartbeat: Callable[[], None] = lambda: None,
    ) -> None:
        self.signals = list(signals)
        self.poll = poll
        self.stop = stop or threading.Event()
        self.heartbeat = heartbeat
        self.pauses = 0

    def reasons(self) -> list[str]:
        """Why the device is busy now (empty: idle)."""
        return [r for s in self.signals if (r := s.busy()) is not None]

    def checkpoint(self, what: str) -> None:
        """Between two chunks of heavy work: return at once if idle, else wait."""
        self.heartbeat()
        if self.signals:
            self.wait_idle(what)

    def wait_idle(self, what: str) -> None:
        """Block until every signal says idle.

        Raises:
            UpdateInterrupted: ``stop`` was set while waiting.
        """
        reasons = self.reasons()
        if not reasons:
            return
        self.pauses += 1
        logger.info("pausing %s: %s", what, "; ".join(reasons),
                    extra={"paused": what, "reasons": reasons})
        started = time.monotonic()
        while reasons:
            self.heartbeat()
            if self.stop.wait(self.poll):
                raise UpdateInterrupted(f"stopped while {what} waited for an idle window")
            reasons = self.reasons()
        logger.info("resuming %s after %.1fs", what, time.monotonic() - started,
                    extra={"resumed": what})
