"""Phased rollout selection (issue #5 must-show 5, the pure part)."""

from __future__ import annotations

from modelward.updater.rollout import choose_release, rollout_bucket
from tests._helpers import R, v

IDS = [f"device-{i:04d}" for i in range(200)]


def test_ten_percent_of_200_devices_is_20_plus_minus_8_and_deterministic() -> None:
    chosen = [d for d in IDS if rollout_bucket(d, "classifier", "2.0.0") < 10]
    assert 12 <= len(chosen) <= 28, len(chosen)
    assert chosen == [d for d in IDS if rollout_bucket(d, "classifier", "2.0.0") < 10]


def test_raising_the_percentage_only_adds_devices() -> None:
    at = {p: {d for d in IDS if rollout_bucket(d, "m", "1.2.3") < p} for p in (5, 10, 50, 100)}
    assert at[5] <= at[10] <= at[50] <= at[100] == set(IDS)


def test_each_release_draws_its_own_devices() -> None:
    a = {d for d in IDS if rollout_bucket(d, "m", "1.0.0") < 10}
    b = {d for d in IDS if rollout_bucket(d, "m", "2.0.0") < 10}
    assert a != b


def test_selection_rules() -> None:
    one, two = R("m", v("1.0.0")), R("m", v("2.0.0"))
    assert choose_release([one, two], "d", "stable").release is two  # type: ignore[union-attr]
    assert choose_release([one, two], "d", "beta") is None  # other channel
    halted = R("m", v("2.0.0"), halted=True)
    assert choose_release([one, halted], "d", "stable").release is one  # type: ignore[union-attr]
    pinned = R("m", v("1.0.0"), pinned=True)
    c = choose_release([pinned, two], "d", "stable")
    assert c is not None and c.release is pinned and c.pinned
    nobody = R("m", v("3.0.0"), percent=0.0)
    assert choose_release([two, nobody], "d", "stable").release is two  # type: ignore[union-attr]
