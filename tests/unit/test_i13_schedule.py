"""Issue 13 finding 10: the daemon's backoff holds across announcements and reconnects."""

from __future__ import annotations

import math

from modelward.agent._schedule import BACKOFF_FLOOR, BURST, REFILL, Schedule

POLL = 3600.0


def run(s: Schedule, now: float, ok: bool) -> float:
    assert s.due() <= now
    s.started(now)
    return s.finished(ok, now + 1, 1.0)


def test_first_attempt_at_once_then_the_poll_timer() -> None:
    s = Schedule(POLL)
    assert s.due() == -math.inf
    assert run(s, 0, True) == POLL
    assert s.due() == 1 + POLL


def test_announcement_after_success_refreshes_soon_but_rate_limited() -> None:
    s = Schedule(POLL, min_refresh_interval=2.0)
    run(s, 0, True)
    assert s.announce(7)
    assert s.due() == 2.0  # last start + min_refresh_interval
    run(s, 2.0, True)
    assert s.due() == 3 + POLL


def test_announcement_flood_does_not_cut_the_backoff_short() -> None:
    s = Schedule(POLL)
    run(s, 0, False)
    end = 1 + BACKOFF_FLOOR
    for v in range(100):  # a broker spams announcements, new versions each time
        assert s.announce(1000 + v) == (v == 0)  # the loop is woken once, not 100 times
        assert s.due() == end
    run(s, end, False)  # still failing: the backoff doubles, announcements or not
    assert s.backoff == 2 * BACKOFF_FLOOR
    s.announce(5000)
    assert s.due() == end + 1 + 2 * BACKOFF_FLOOR


def test_backoff_doubles_up_to_the_poll_interval_and_success_ends_it() -> None:
    s = Schedule(60.0)
    now = 0.0
    waits = []
    for _ in range(6):
        now = max(now, s.due())
        waits.append(run(s, now, False))
        now += 1
    assert waits == [5, 10, 20, 40, 60, 60]
    now = s.due()
    run(s, now, True)
    assert s.backoff == 0
    s.announce(9)
    assert s.due() == now + 2.0


def test_reconnect_redelivering_the_retained_announcement_wakes_nothing() -> None:
    s = Schedule(POLL)
    run(s, 0, True)
    assert s.announce(7)
    assert s.due() <= 5
    s.started(5)
    s.finished(True, 6, 1.0, trusted=7)  # (the attempt verified timestamp v7)
    for _ in range(5):  # every reconnect re-delivers the retained message
        assert not s.announce(7)
        assert s.due() == 6 + POLL
    assert s.announce(8)  # a real new one does


def test_announcement_seen_by_a_failed_attempt_is_not_forgotten() -> None:
    s = Schedule(POLL)
    run(s, 0, True)
    s.announce(7)
    run(s, 5, False)  # the origin was down
    assert s.announce(7)  # the retry at the end of the backoff still answers it
    assert s.due() == 6 + BACKOFF_FLOOR


def test_announcement_during_an_attempt_brings_the_next_one_forward() -> None:
    s = Schedule(POLL)
    s.started(0)
    assert s.announce(3)  # arrives mid-attempt: the attempt may have missed it
    s.finished(True, 10, 1.0)
    assert s.due() == 10  # as soon as it ended (2 s after its start have passed)


def test_jitter_applies_to_timer_and_backoff() -> None:
    s = Schedule(POLL)
    s.started(0)
    assert s.finished(False, 0, 1.1) == BACKOFF_FLOOR * 1.1
    s.started(10)
    assert s.finished(True, 10, 0.9) == POLL * 0.9


def test_flood_of_new_versions_is_spaced_out_after_a_burst() -> None:
    s = Schedule(POLL)
    run(s, 0, True)
    now, starts = 1.0, []
    for v in range(BURST + 5):  # the broker announces a new version all the time
        s.announce(100 + v)
        now = max(now, s.due())
        starts.append(now)
        run(s, now, True)
        now += 1
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(g <= 3 for g in gaps[: BURST - 1])  # a burst of quick refreshes
    assert all(g >= REFILL - 1 for g in gaps[BURST:])  # then one per REFILL seconds
    # quiet for a while: the bucket fills again, and a genuine announcement is quick
    now += BURST * REFILL
    for v in range(BURST):
        s.announce(9000 + v)
        assert s.due() <= now
        run(s, now, True)
        now += 2
