"""Idle windows: heavy work (download, verification, health check) runs only while the
device is idle by every configured signal, and pauses between chunks when it is not.

Signals are small objects with one question, ``busy() -> reason | None``; the gate asks
all of them. Tests and other environments inject their own.
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from datetime import time as dtime
from pathlib import Path

from modelward.updater.errors import LocalDeviceError

logger = logging.getLogger(__name__)


class UpdateInterrupted(LocalDeviceError):
    """The agent was asked to stop while heavy work waited for an idle window."""


class IdleSignal(abc.ABC):
    """One source of "the device is busy"."""

    @abc.abstractmethod
    def busy(self) -> str | None:
        """A reason the device is busy now, or None."""


BUSY_FILE_MAX_BYTES = 64  # a queue depth and a newline; more is not a signal
BUSY_FILE_SKEW = 2.0  # seconds an mtime may lie ahead of the clock and still count
BUSY_FILE_GRACE = 30.0  # seconds one unchanged file may hold no depth and still mean busy


@dataclass(frozen=True)
class BusyFileReading:
    """What one look at ``busy_file`` saw (no decision yet).

    Attributes:
        kind: "missing", "regular", "oversized" (a regular file longer than
            :data:`BUSY_FILE_MAX_BYTES`, not read), or what else is there ("symlink",
            "FIFO", "device", "directory", "socket", "unreadable (<errno text>)").
        mtime: the regular file's mtime (seconds), else 0.
        size: the regular file's size, else 0.
        key: (mtime_ns, size, inode) of the regular file, to skip unchanged re-reads.
        head: at most :data:`BUSY_FILE_MAX_BYTES` + 1 leading bytes of the regular file.
    """

    kind: str
    mtime: float = 0.0
    size: int = 0
    key: tuple[int, int, int] = (0, 0, 0)
    head: bytes = b""


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "regular"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISDIR(mode):
        return "directory"
    return "socket" if stat.S_ISSOCK(mode) else "special file"


def read_busy_file(path: Path, known: tuple[int, int, int] | None = None) -> BusyFileReading:
    """Look at ``path`` without following a link, blocking or reading more than a few bytes.

    ``lstat`` first, so a FIFO or device is never opened; then ``open`` with
    ``O_NOFOLLOW | O_NONBLOCK`` and ``fstat`` on what was opened (it may have been swapped
    since), then one ``read`` of at most :data:`BUSY_FILE_MAX_BYTES` + 1 bytes, skipped when
    ``known`` already matches the file (``head`` is then empty).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return BusyFileReading("missing")
    except OSError as e:
        return BusyFileReading(f"unreadable ({e.strerror})")
    if not stat.S_ISREG(st.st_mode):
        return BusyFileReading(_kind(st.st_mode))
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return BusyFileReading("missing")
    except OSError as e:
        return BusyFileReading("symlink" if e.errno == errno.ELOOP
                               else f"unreadable ({e.strerror})")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return BusyFileReading(_kind(st.st_mode))
        if st.st_size > BUSY_FILE_MAX_BYTES:
            return BusyFileReading("oversized", st.st_mtime, size=st.st_size)
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        head = b"" if key == known else os.read(fd, BUSY_FILE_MAX_BYTES + 1)
    except OSError as e:
        return BusyFileReading(f"unreadable ({e.strerror})")
    finally:
        os.close(fd)
    return BusyFileReading("regular", st.st_mtime, st.st_size, key, head)


def parse_depth(head: bytes) -> int | None:
    """The queue depth in a busy file's first bytes, or None when they are not one."""
    if len(head) > BUSY_FILE_MAX_BYTES:
        return None
    try:
        fields = head.decode("ascii").split()
        depth = int(fields[0]) if fields and fields[0].isdigit() else None
    except UnicodeDecodeError:
        return None
    return depth


class BusyFileSignal(IdleSignal):
    """The inference application's queue depth, written to a regular file.

    Busy when the depth exceeds ``max_depth``, or while the file is fresh but holds no
    depth (an application mid-write), for at most :data:`BUSY_FILE_GRACE` seconds while it
    stays unchanged (a file that never parses, such as a misconfigured ``/proc`` path whose
    mtime is always recent, is then ignored). A file not rewritten for ``stale_after`` seconds, or
    whose mtime lies in the future, is ignored: a crashed application, or a clock or file
    set forward, cannot block updates forever. Anything that is not a regular file (a
    symlink, FIFO, device, directory) is not a signal the application writes: it is
    ignored with one warning, so it can neither hang the gate nor block updates; so is a
    file longer than :data:`BUSY_FILE_MAX_BYTES`, which is never read (no depth is that
    long). At most :data:`BUSY_FILE_MAX_BYTES` + 1 bytes are ever read.

    Ignoring a broken signal is the safe side: it can at most let heavy work run while
    the application is busy (it runs niced and paced), whereas trusting it could stop
    updates for good or hang the agent until the watchdog kills it.
    """

    def __init__(self, path: Path, max_depth: int = 0, stale_after: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path, self.max_depth, self.stale_after, self._clock = path, max_depth, \
            stale_after, clock
        self._key: tuple[int, int, int] | None = None
        self._depth: int | None = 0
        self._bad_since = 0.0  # when the current unparsable content was first seen
        self._warned: str | None = None

    def _ignore(self, problem: str) -> None:
        if problem != self._warned:
            logger.warning("ignoring busy_file %s: %s", self.path, problem,
                           extra={"busy_file": str(self.path), "problem": problem})
            self._warned = problem

    def busy(self) -> str | None:
        r = read_busy_file(self.path, self._key)
        if r.kind == "missing":
            self._warned = None
            return None
        if r.kind == "oversized":
            self._ignore(f"it holds {r.size} bytes, more than a queue depth "
                         f"({BUSY_FILE_MAX_BYTES} at most)")
            return None
        if r.kind != "regular":
            self._ignore(f"it is a {r.kind}, not a regular file"
                         if not r.kind.startswith("unreadable") else f"it is {r.kind}")
            return None
        now = self._clock()
        age = now - r.mtime
        if age < -BUSY_FILE_SKEW:
            self._ignore("its mtime is in the future (counted as stale)")
            return None
        if age > self.stale_after:
            return None
        if r.key != self._key:
            self._key = r.key
            self._depth = parse_depth(r.head)
            self._bad_since = now
        if self._depth is None:
            if now - self._bad_since > BUSY_FILE_GRACE:
                self._ignore(f"it has held no queue depth for {BUSY_FILE_GRACE:.0f} s")
                return None
            return f"application busy signal {self.path} is unreadable"
        self._warned = None
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


_RANGE = re.compile(r"\s*([0-9]{1,2}):([0-9]{2})\s*-\s*([0-9]{1,2}):([0-9]{2})\s*", re.ASCII)


@dataclass(frozen=True)
class TimeRange:
    """A local-time range ``HH:MM-HH:MM``; may wrap past midnight."""

    start: dtime
    end: dtime

    @classmethod
    def parse(cls, text: str) -> TimeRange:
        """Parse ``HH:MM-HH:MM`` (local time, no seconds, no UTC offset: the gate compares
        naive local times); ``HH:MM-HH:MM`` with both ends equal is refused (it would be
        an empty window, or all day: say which by leaving ``windows`` out).

        Raises:
            ValueError: not that form, a time out of range, or an empty window.
        """
        m = _RANGE.fullmatch(text)
        if m is None:
            raise ValueError("not HH:MM-HH:MM (24-hour local time, no seconds, no UTC offset)")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            raise ValueError("a time out of range (00:00 to 23:59)")
        if (h1, m1) == (h2, m2):
            raise ValueError("start and end are equal: an empty window (for always, leave "
                             "windows out)")
        return cls(dtime(h1, m1), dtime(h2, m2))

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
