"""Issue 17, no thundering herd (the pure rules, ``modelward.agent._schedule``): an
announcement's attempt waits its random share of the spread, which a flood can neither cut
short nor push back; announcements of a version the device already trusts wake nothing,
including one that came in while the attempt that trusted it ran; the spread is a checked
config key."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelward.agent._config import load_config
from modelward.agent._schedule import BACKOFF_FLOOR, Schedule
from modelward.agent.errors import ConfigError
from modelward.updater._defaults import ANNOUNCE_SPREAD

POLL = 3600.0


def run(s: Schedule, now: float, ok: bool, trusted: int | None = None) -> float:
    assert s.due() <= now
    s.started(now)
    return s.finished(ok, now + 1, 1.0, trusted)


def test_an_announcement_waits_its_share_of_the_spread() -> None:
    for share, want in [(0.0, 101.0), (0.25, 175.0), (1.0, 400.0),
                        (7.0, 400.0), (-1.0, 101.0)]:  # (a share is clamped)
        s = Schedule(POLL, min_refresh_interval=2.0, spread=300.0)
        run(s, 99, True, trusted=4)  # (ended at 100: the rate limit alone says 101)
        assert s.announce(5, now=100.0, share=share)
        assert s.due() == want, share


def test_a_flood_keeps_the_first_draw() -> None:
    s = Schedule(POLL, spread=300.0)
    run(s, 0, True, trusted=1)
    assert s.announce(2, now=10.0, share=0.5)  # due at 160
    for v in range(3, 100):  # later ones, new versions, other draws: no wake, same time
        assert not s.announce(v, now=11.0, share=0.0 if v % 2 else 1.0)
        assert s.due() == 160.0
    s.started(160.0)
    s.finished(True, 161.0, 1.0, trusted=99)
    assert s.due() == 161.0 + POLL  # the attempt trusted them all


def test_the_spread_does_not_delay_the_poll_timer_or_lengthen_a_backoff() -> None:
    s = Schedule(POLL, spread=300.0)
    run(s, 0, True, trusted=1)
    assert s.announce(2, now=POLL - 10, share=1.0)
    assert s.due() == 1 + POLL  # the timer comes first
    s = Schedule(POLL, spread=300.0)
    run(s, 0, False)
    assert s.announce(2, now=1.0, share=0.0)
    assert s.due() == 1 + BACKOFF_FLOOR


def test_a_version_already_trusted_wakes_nothing() -> None:
    s = Schedule(POLL, spread=300.0)
    run(s, 0, True, trusted=7)  # the first (poll) attempt trusted timestamp v7
    for v in (7, 6, 1):  # the retained v7 re-delivered on a reconnect; older ones
        assert not s.announce(v, now=5.0, share=0.0)
        assert s.due() == 1 + POLL
    assert s.announce(8, now=5.0, share=0.0)


def test_an_announcement_during_the_attempt_that_trusted_it_is_handled() -> None:
    """A daemon starts: its first attempt (the timer) runs while the retained announcement
    comes in. The attempt trusted that version: no second attempt for it."""
    s = Schedule(POLL, spread=300.0)
    s.started(0)
    assert s.announce(7, now=0.1, share=0.0)
    s.finished(True, 3.0, 1.0, trusted=7)
    assert s.due() == 3.0 + POLL
    s = Schedule(POLL, spread=300.0)
    s.started(0)
    assert s.announce(8, now=0.1, share=0.0)  # newer than what the attempt trusted
    s.finished(True, 3.0, 1.0, trusted=7)
    assert s.due() == 3.0


def test_a_failed_attempt_handles_nothing() -> None:
    s = Schedule(POLL)
    run(s, 0, True, trusted=6)
    assert s.announce(7)
    run(s, 5, False, trusted=7)  # (a failure's trusted version is not taken)
    assert s.announce(7)  # not handled: answered at the end of the backoff
    assert s.due() == 6 + BACKOFF_FLOOR


def _conf(tmp_path: Path, agent: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(f'device_id = "d"\nfleet = "f"\nstate_dir = "{tmp_path}/s"\n'
                 f'tcti = "swtpm:port=1"\nmodel = "m"\n[https]\n'
                 f'metadata_url = "https://o/m/"\ntargets_url = "https://o/t/"\n'
                 f"[agent]\n{agent}\n")
    return p


def test_the_spread_is_a_checked_key_with_a_fleet_sized_default(tmp_path: Path) -> None:
    assert load_config(_conf(tmp_path, "")).announce_spread == ANNOUNCE_SPREAD == 300.0
    assert load_config(_conf(tmp_path, "announce_spread = 0")).announce_spread == 0.0
    for bad in ("-1", "1e9", '"soon"', "nan"):
        with pytest.raises(ConfigError, match="announce_spread"):
            load_config(_conf(tmp_path, f"announce_spread = {bad}"))
    with pytest.raises(ConfigError, match="did you mean announce_spread"):
        load_config(_conf(tmp_path, "anounce_spread = 5"))


def test_a_forged_announcement_never_raises_the_handled_floor() -> None:
    """(a17 herd) Announced far ahead of what the refresh verified: the real next
    version still wakes the device; only a verified version is handled."""
    for forged in (6, 2**62):
        s = Schedule(POLL, spread=0.0)
        run(s, 0, True, trusted=5)
        assert s.announce(forged)
        run(s, 5, True, trusted=5)  # the repository has no such version: nothing new
        assert s.handled_version == 5
        assert s.announce(6)  # the real one (also when 6 was the forged number)
        assert s.due() <= 7


def test_a_success_that_verified_nothing_handles_nothing() -> None:
    s = Schedule(POLL)
    run(s, 0, True, trusted=None)
    assert s.handled_version is None
    assert s.announce(1)
