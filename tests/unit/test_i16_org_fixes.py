"""fixorg: the delta's plan is capped at the whole bundle's requests; refused deltas are
remembered per release; a whole download in progress is resumed, not lost to the delta."""

from __future__ import annotations

import random

import pytest

from modelward.updater._config import MqttConfig
from modelward.updater.install import _delta
from modelward.updater.install._delta import Range, cap_requests, coalesce


def _requests(ranges: list[Range], unit: int = _delta.REQUEST_BYTES) -> int:
    return sum(-(-r.length // unit) for r in ranges)


def test_the_request_unit_is_the_mqtt_block() -> None:
    assert MqttConfig.block_size == _delta.REQUEST_BYTES


def test_a_contiguous_fine_tune_is_not_merged() -> None:
    """(Goal (a): one range of the changed bytes stays that range.)"""
    r = coalesce([(100 << 20, 20 << 20)])
    assert cap_requests(r, 200 << 20) == r


@pytest.mark.parametrize("seed", range(30))
def test_capped_ranges_cover_the_spans_within_the_whole_bundles_requests(seed: int) -> None:
    rnd = random.Random(seed)
    length = rnd.randrange(1, 40) << 20
    unit = rnd.choice([1 << 16, 1 << 20])
    spans, pos = [], rnd.randrange(0, 1 << 14)
    while True:
        n = rnd.randrange(1 << 14, 1 << 18)
        if pos + n > length:
            break
        spans.append((pos, n))
        pos += n + rnd.choice([0, 100, _delta.MAX_GAP + 1, 1 << 16, 1 << 20])
    if not spans:
        return
    ranges = coalesce(spans)
    out = cap_requests(ranges, length, unit)
    if _requests(ranges, unit) <= -(-length // unit):
        assert out == ranges
    else:
        assert _requests(out, unit) <= -(-length // unit)
    ends = 0
    for r in out:  # sorted, disjoint, inside the bundle
        assert r.offset >= ends and r.offset + r.length <= length
        ends = r.offset + r.length
    for off, n in spans:  # every span inside one range
        assert any(r.offset <= off and off + n <= r.offset + r.length for r in out)
    assert sum(r.length - r.gap_bytes for r in out) == sum(n for _, n in spans)
    assert sum(r.length for r in out) <= length


def test_merging_keeps_the_largest_gaps() -> None:
    """Three ranges, limit two requests: the smallest gap is merged, the big one kept."""
    u = 1 << 20
    r = [Range(0, 1000), Range(2000, 1000), Range(10 * u, 1000)]
    out = cap_requests(r, 11 * u, 6 * u)  # (a bundle of 2 units: 2 requests)
    assert out == [Range(0, 3000, 1000), Range(10 * u, 1000)]
