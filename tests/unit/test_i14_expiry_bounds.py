"""Lifetimes that would stop devices are refused (issue 14 "Expiry hygiene"), and a
corrupt ``KEYS/expiry.json`` can be replaced by `repo set-expiry`, as its error says."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

from modelward.publisher._expiry import (
    REFRESH_INTERVAL,
    Expiry,
    load_expiry,
    load_expiry_to_replace,
)
from modelward.publisher.errors import RepositoryStateError
from modelward.trust.errors import OperatorInputError

DAY = timedelta(days=1)


@pytest.mark.parametrize(("lifetimes", "windows", "match"), [
    ({"root": 6 * DAY}, {"root": DAY}, "root lifetime 6d is out of bounds: 7d .*offline"),
    ({"targets": timedelta(hours=2)}, {"targets": timedelta(hours=1)},
     "targets lifetime 2h is out of bounds: 7d .*offline"),
    ({"snapshot": timedelta(hours=11)}, {"snapshot": timedelta(hours=1)},
     "snapshot lifetime 11h is out of bounds: 12h .*every 6h"),
    ({"snapshot": timedelta(hours=13), "timestamp": 2 * DAY}, {"snapshot": timedelta(hours=6)},
     "snapshot lifetime 13h is shorter than the timestamp lifetime 2d"),
])
def test_i14_lifetimes_that_stop_devices_are_refused(
        lifetimes: dict[str, timedelta], windows: dict[str, timedelta], match: str) -> None:
    with pytest.raises(OperatorInputError, match=match):
        Expiry().changed(lifetimes, windows)


def test_i14_lifetimes_at_the_bounds_are_accepted() -> None:
    e = Expiry().changed({"root": 7 * DAY, "targets": 7 * DAY, "snapshot": 2 * REFRESH_INTERVAL,
                          "timestamp": 2 * REFRESH_INTERVAL},
                         {"root": DAY, "targets": DAY, "snapshot": REFRESH_INTERVAL,
                          "timestamp": REFRESH_INTERVAL})
    assert e.snapshot == e.timestamp == 2 * REFRESH_INTERVAL


def test_i14_corrupt_expiry_file_is_replaced_by_set_expiry(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "expiry.json").write_bytes(b"{")
    with pytest.raises(RepositoryStateError) as e:
        load_expiry(tmp_path)
    assert "set-expiry" in e.value.hint
    with caplog.at_level(logging.WARNING):
        assert load_expiry_to_replace(tmp_path) == Expiry()
    assert "expiry.json" in caplog.text and "replacing it" in caplog.text
