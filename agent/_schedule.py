"""When the daemon runs its next update attempt: the poll timer, announcements, backoff.

Pure: time comes in as arguments (``time.monotonic()`` in the daemon), so the rules are
tested without sleeping (house style 1 and 11). The rules:

* without failures, an attempt runs every ``poll_interval`` (with the caller's jitter),
  and an announcement brings the next one forward to at most one per
  ``min_refresh_interval``: a cheap metadata refresh, since a release this device
  rejected is not downloaded again (``modelward.updater.install._rejections``);
* announcement-triggered attempts come in a burst of at most :data:`BURST`, then one per
  :data:`REFILL` seconds (a token bucket): a broker flooding new versions costs a few
  refreshes, then one every half minute, not one every two seconds forever;
* an announcement that repeats the timestamp version of the last successful attempt
  (the broker re-delivering a retained message on every reconnect) wakes nothing;
* after a failed attempt, the next one waits ``backoff`` seconds: 5 s, doubling on each
  failure in a row, up to ``poll_interval``. Announcements do not cut it short: they
  can only make the attempt due at the end of the backoff (instead of at the next poll).
  A broker, or anyone who can publish there, so cannot make a failing device hammer the
  origin, nor reset its backoff by a flood. A success ends the backoff;
* an attempt that could not start (another device command holds the device lock, such
  as a manual ``agent update``) is neither: the next one is :data:`BUSY_RETRY` seconds
  later (at most ``poll_interval``), the backoff unchanged, and the announcements it
  would have answered stay pending.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BACKOFF_FLOOR = 5.0  # seconds after the first failure in a row
BURST = 10  # announcement-triggered attempts in a row before they are spaced out
REFILL = 30.0  # seconds to earn one more announcement-triggered attempt
BUSY_RETRY = 30.0  # seconds after an attempt skipped because another command ran


@dataclass
class Schedule:
    """The daemon's timer state.

    Args:
        poll_interval: seconds between two attempts without announcements; also the
            longest backoff.
        min_refresh_interval: seconds between two announcement-triggered attempts.
    """

    poll_interval: float
    min_refresh_interval: float = 2.0
    backoff: float = 0.0  # seconds waited after the last failure (0: no failure)
    _next_poll: float = -math.inf  # the timer's next attempt (start: at once)
    _not_before: float = -math.inf  # end of the backoff
    _last_start: float = -math.inf
    _pending: int | None = None  # the newest version announced since the last start
    _running: int | None = None  # the announced version the running attempt answers
    _done: int | None = None  # the announced version the last successful attempt saw
    _tokens: float = BURST  # announcement-triggered attempts available now...
    _tokens_at: float = -math.inf  # ...as of this time

    def announce(self, version: int) -> bool:
        """An announcement of timestamp ``version``; True if the loop should look again
        (only when the next attempt may move earlier: a flood wakes the loop once)."""
        if self._pending is not None:
            self._pending = max(self._pending, version)
            return False
        if version == self._done:
            return False
        self._pending = version
        return True

    def due(self) -> float:
        """When the next attempt may start (monotonic seconds; -inf: at once)."""
        if self._pending is None:
            return self._next_poll
        soon = max(self._not_before, self._last_start + self.min_refresh_interval)
        if self._tokens < 1:
            soon = max(soon, self._tokens_at + (1 - self._tokens) * REFILL)
        return min(self._next_poll, soon)

    def started(self, now: float) -> None:
        """An attempt starts at ``now``: it answers every announcement so far."""
        if self._pending is not None and now < self._next_poll:  # brought forward: a token
            self._tokens = min(BURST, self._tokens + (now - self._tokens_at) / REFILL) - 1
            self._tokens_at = now
        self._last_start = now
        self._running, self._pending = self._pending, None

    def finished(self, ok: bool, now: float, jitter: float = 1.0) -> float:
        """The attempt ended at ``now``; returns the seconds until the timer's next one.

        Args:
            ok: the attempt succeeded (installed, or found nothing to do).
            now: monotonic seconds.
            jitter: factor on the wait (0.9-1.1), so a fleet does not move in lockstep.
        """
        if ok:
            self.backoff = 0.0
            self._not_before = now
            if self._running is not None:
                self._done = self._running
            wait = self.poll_interval * jitter
        else:
            self.backoff = min(max(2 * self.backoff, BACKOFF_FLOOR), self.poll_interval)
            wait = self.backoff * jitter
            self._not_before = now + wait
        self._running = None
        self._next_poll = now + wait
        return wait

    def skipped(self, now: float, jitter: float = 1.0) -> float:
        """The attempt did not start (another command held the device lock); returns
        the seconds until the next one."""
        if self._running is not None:
            self._pending = max(self._pending or self._running, self._running)
        self._running = None
        wait = min(BUSY_RETRY, self.poll_interval) * jitter
        self._next_poll = now + wait
        self._not_before = max(self._not_before, now + wait)
        return wait
