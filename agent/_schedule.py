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
* an announcement starts its attempt after a random share of ``spread`` seconds (the
  caller draws it): a retained announcement reaching a whole fleet at once does not make
  every device hit the origin in the same second;
* an announcement of a timestamp version this device has already handled (at most the
  version its last successful attempt verified: the broker re-delivering a retained
  message on every reconnect, or after a restart) wakes nothing. Only a verified version
  counts, never an announced one (a forged announcement of version 2**62 must not make
  every real one after it look handled);
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
        spread: the most seconds an announcement's attempt waits (its random share is
            drawn by the caller of :meth:`announce`).
    """

    poll_interval: float
    min_refresh_interval: float = 2.0
    spread: float = 0.0
    backoff: float = 0.0  # seconds waited after the last failure (0: no failure)
    _next_poll: float = -math.inf  # the timer's next attempt (start: at once)
    _not_before: float = -math.inf  # end of the backoff
    _last_start: float = -math.inf
    _pending: int | None = None  # the newest version announced since the last start
    _running: int | None = None  # the announced version the running attempt answers
    _done: int | None = None  # the newest timestamp version a successful attempt verified
    _spread_until: float = -math.inf  # the pending announcement's attempt not before this
    _tokens: float = BURST  # announcement-triggered attempts available now...
    _tokens_at: float = -math.inf  # ...as of this time

    def announce(self, version: int, now: float = -math.inf, share: float = 0.0) -> bool:
        """An announcement of timestamp ``version`` at ``now``; True if the loop should
        look again (only when the next attempt may move earlier: a flood wakes the loop
        once).

        Args:
            share: the announcement's random draw in [0, 1]: its attempt waits that share
                of ``spread``. Later announcements while one is pending keep its delay
                (a flood can neither cut it short nor push it back).
        """
        if self.is_handled(version):
            return False
        if self._pending is not None:
            self._pending = max(self._pending, version)
            return False
        self._pending = version
        self._spread_until = now + min(max(share, 0.0), 1.0) * self.spread
        return True

    def is_handled(self, version: int) -> bool:
        """``version`` is one announcements of wake nothing (already trusted)."""
        return self._done is not None and version <= self._done

    @property
    def handled_version(self) -> int | None:
        """The newest timestamp version a successful attempt verified (None: none yet)."""
        return self._done

    @property
    def running(self) -> int | None:
        """The announced version the running attempt answers (None: the timer's)."""
        return self._running

    def handled(self, version: int) -> None:
        """``version`` is already trusted (the device's TUF timestamp, read at start):
        announcements of it or older wake nothing."""
        self._done = version if self._done is None else max(self._done, version)

    def due(self) -> float:
        """When the next attempt may start (monotonic seconds; -inf: at once)."""
        if self._pending is None:
            return self._next_poll
        soon = max(self._not_before, self._last_start + self.min_refresh_interval,
                   self._spread_until)
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

    def finished(self, ok: bool, now: float, jitter: float = 1.0,
                 trusted: int | None = None) -> float:
        """The attempt ended at ``now``; returns the seconds until the timer's next one.

        Args:
            ok: the attempt succeeded (installed, or found nothing to do).
            now: monotonic seconds.
            jitter: factor on the wait (0.9-1.1), so a fleet does not move in lockstep.
            trusted: the timestamp version the attempt verified, if known: announcements
                up to it (also one that came in while the attempt ran) are handled. The
                announced version itself never is: an announcement is an untrusted hint,
                and one forged far ahead must not make the real next one look handled.
        """
        if ok:
            self.backoff = 0.0
            self._not_before = now
            if trusted is not None:  # (never the announced number: anyone may announce)
                self.handled(trusted)
            if self._pending is not None and self._done is not None and \
                    self._pending <= self._done:
                self._pending = None
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
